// Hybrid-family pieces: LayerNorm (phi4), the Gated Memory Unit gate, the Differential
// Attention λ / combine / per-pair RMSNorm / (1 − λ_init) scale, and bias add / bias grad.

// Fast form (ex2 and rcp approximations; IEEE division took ~10 instructions and a slow-path
// branch per element in the GMU gate).
__device__ __forceinline__ float sigmoid_h(float x) { return __fdividef(1.f, 1.f + __expf(-x)); }

// ------------------------------------------------------------------------------------------
// LayerNorm: y = bf16((x − μ)·rstd·γ + β), fp32 math, biased variance. One block per row.
extern "C" __global__ void layernorm_fwd(const float* __restrict__ x, const float* __restrict__ gamma,
                                         const float* __restrict__ beta, bf16* __restrict__ y,
                                         float* __restrict__ mean_out, float* __restrict__ rstd_out, int rows,
                                         int n, float eps) {
    __shared__ float scratch[32];
    const int r = blockIdx.x;
    if (r >= rows) return;
    const float* xr = x + (size_t)r * n;
    bf16* yr = y + (size_t)r * n;
    float s = 0.f;
    for (int c = threadIdx.x; c < n; c += blockDim.x) s += xr[c];
    const float mean = block_sum(s, scratch) / (float)n;
    float v = 0.f;
    for (int c = threadIdx.x; c < n; c += blockDim.x) {
        const float d = xr[c] - mean;
        v += d * d;
    }
    const float rstd = rsqrtf(block_sum(v, scratch) / (float)n + eps);
    if (threadIdx.x == 0) {
        if (mean_out != nullptr) mean_out[r] = mean;
        if (rstd_out != nullptr) rstd_out[r] = rstd;
    }
    for (int c = threadIdx.x; c < n; c += blockDim.x) yr[c] = tobf((xr[c] - mean) * rstd * gamma[c] + beta[c]);
}

// LayerNorm backward from the bf16 dy: dx = rstd·(ĝ − mean(ĝ) − x̂·mean(ĝ·x̂)), ĝ = dy·γ;
// dres = (accumulate ? dres : 0) + dx (fp32), dres_bf = bf16(dres) (may be null);
// dgamma += Σ dy·x̂, dbeta += Σ dy. Grid-stride over rows; dynamic shared memory 2n floats.
extern "C" __global__ void layernorm_bwd(const float* __restrict__ x, const float* __restrict__ gamma,
                                         const float* __restrict__ mean_in, const float* __restrict__ rstd_in,
                                         const bf16* __restrict__ dy, float* __restrict__ dres,
                                         bf16* __restrict__ dres_bf, float* __restrict__ dgamma,
                                         float* __restrict__ dbeta, int rows, int n, int accumulate) {
    extern __shared__ float part[];
    float* pg = part;
    float* pb = part + n;
    __shared__ float scratch[32];
    for (int c = threadIdx.x; c < n; c += blockDim.x) {
        pg[c] = 0.f;
        pb[c] = 0.f;
    }
    for (int r = blockIdx.x; r < rows; r += gridDim.x) {
        const float* xr = x + (size_t)r * n;
        const bf16* dyr = dy + (size_t)r * n;
        const float mean = mean_in[r], rstd = rstd_in[r];
        float sg = 0.f, sgx = 0.f;
        for (int c = threadIdx.x; c < n; c += blockDim.x) {
            const float d = bf(dyr[c]);
            const float xh = (xr[c] - mean) * rstd;
            const float gh = d * gamma[c];
            sg += gh;
            sgx += gh * xh;
            pg[c] += d * xh;
            pb[c] += d;
        }
        const float mg = block_sum(sg, scratch) / (float)n;
        const float mgx = block_sum(sgx, scratch) / (float)n;
        float* dr = dres + (size_t)r * n;
        for (int c = threadIdx.x; c < n; c += blockDim.x) {
            const float xh = (xr[c] - mean) * rstd;
            float v = rstd * (bf(dyr[c]) * gamma[c] - mg - xh * mgx);
            if (accumulate) v += dr[c];
            dr[c] = v;
            if (dres_bf != nullptr) dres_bf[(size_t)r * n + c] = tobf(v);
        }
    }
    __syncthreads();
    for (int c = threadIdx.x; c < n; c += blockDim.x) {
        atomicAdd(dgamma + c, pg[c]);
        atomicAdd(dbeta + c, pb[c]);
    }
}

// ------------------------------------------------------------------------------------------
// GMU gate. A thread owns GMU_VEC = 8 consecutive elements of a row (blockIdx.x·blockDim.x +
// threadIdx.x picks them) and walks rows blockIdx.y, + gridDim.y, ...; with `vec` (every
// row of every tensor 16-byte aligned, the host checks) a full group moves as one 16-byte
// load or store per bf16 tensor (two float4 for fp32 dm), a row's last partial group and
// every group without `vec` element by element.
#define GMU_VEC 8

__device__ __forceinline__ float2 unpack_bf2(u32 w) {
    return make_float2(__uint_as_float(w << 16), __uint_as_float(w & 0xffff0000u));
}
__device__ __forceinline__ u32 pack_bf2(float a, float b) {
    const bf162 p = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<const u32*>(&p);
}

// out[r, i] = bf16(m[r, i]·silu(g[r, i])) over rows × width (row strides per tensor).
extern "C" __global__ void gmu_fwd(const bf16* __restrict__ m, int sm, const bf16* __restrict__ g, int sg,
                                   bf16* __restrict__ out, int so, int rows, int width, int vec) {
    const int c0 = (blockIdx.x * blockDim.x + threadIdx.x) * GMU_VEC;
    if (c0 >= width) return;
    const bool full = vec && c0 + GMU_VEC <= width;
    for (int r = blockIdx.y; r < rows; r += gridDim.y) {
        const bf16* mr = m + (size_t)r * sm + c0;
        const bf16* gr = g + (size_t)r * sg + c0;
        bf16* orow = out + (size_t)r * so + c0;
        if (full) {
            const uint4 mv = *reinterpret_cast<const uint4*>(mr);
            const uint4 gv = *reinterpret_cast<const uint4*>(gr);
            const u32 mw[4] = {mv.x, mv.y, mv.z, mv.w}, gw[4] = {gv.x, gv.y, gv.z, gv.w};
            u32 ow[4];
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                const float2 a = unpack_bf2(mw[k]), b = unpack_bf2(gw[k]);
                ow[k] = pack_bf2(a.x * b.x * sigmoid_h(b.x), a.y * b.y * sigmoid_h(b.y));
            }
            *reinterpret_cast<uint4*>(orow) = make_uint4(ow[0], ow[1], ow[2], ow[3]);
        } else {
            for (int k = 0; k < GMU_VEC && c0 + k < width; ++k) {
                const float gv = bf(gr[k]);
                orow[k] = tobf(bf(mr[k]) * gv * sigmoid_h(gv));
            }
        }
    }
}

// GMU backward: dm[r, i] += dout·silu(g) (fp32, [rows, width]: the shared memory's gradient
// sums over every GMU layer); dg = bf16(dout·m·silu'(g)) (written, row stride sdg).
extern "C" __global__ void gmu_bwd(const bf16* __restrict__ m, int sm, const bf16* __restrict__ g, int sg,
                                   const bf16* __restrict__ dout, int sdo, float* __restrict__ dm,
                                   bf16* __restrict__ dg, int sdg, int rows, int width, int vec) {
    const int c0 = (blockIdx.x * blockDim.x + threadIdx.x) * GMU_VEC;
    if (c0 >= width) return;
    const bool full = vec && c0 + GMU_VEC <= width;
    for (int r = blockIdx.y; r < rows; r += gridDim.y) {
        const bf16* mr = m + (size_t)r * sm + c0;
        const bf16* gr = g + (size_t)r * sg + c0;
        const bf16* dr = dout + (size_t)r * sdo + c0;
        float* dmr = dm + (size_t)r * width + c0;
        bf16* dgr = dg + (size_t)r * sdg + c0;
        if (full) {
            const uint4 mv = *reinterpret_cast<const uint4*>(mr);
            const uint4 gv = *reinterpret_cast<const uint4*>(gr);
            const uint4 dv = *reinterpret_cast<const uint4*>(dr);
            float4 acc[2] = {reinterpret_cast<const float4*>(dmr)[0], reinterpret_cast<const float4*>(dmr)[1]};
            const u32 mw[4] = {mv.x, mv.y, mv.z, mv.w}, gw[4] = {gv.x, gv.y, gv.z, gv.w},
                      dw[4] = {dv.x, dv.y, dv.z, dv.w};
            float* a = reinterpret_cast<float*>(acc);
            u32 ow[4];
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                const float2 mf = unpack_bf2(mw[k]), gf = unpack_bf2(gw[k]), df = unpack_bf2(dw[k]);
                const float s0 = sigmoid_h(gf.x), s1 = sigmoid_h(gf.y);
                a[2 * k] += df.x * gf.x * s0;
                a[2 * k + 1] += df.y * gf.y * s1;
                ow[k] = pack_bf2(df.x * mf.x * s0 * (1.f + gf.x * (1.f - s0)),
                                 df.y * mf.y * s1 * (1.f + gf.y * (1.f - s1)));
            }
            reinterpret_cast<float4*>(dmr)[0] = acc[0];
            reinterpret_cast<float4*>(dmr)[1] = acc[1];
            *reinterpret_cast<uint4*>(dgr) = make_uint4(ow[0], ow[1], ow[2], ow[3]);
        } else {
            for (int k = 0; k < GMU_VEC && c0 + k < width; ++k) {
                const float gv = bf(gr[k]), d = bf(dr[k]);
                const float s = sigmoid_h(gv);
                dmr[k] += d * gv * s;
                dgr[k] = tobf(d * bf(mr[k]) * s * (1.f + gv * (1.f - s)));
            }
        }
    }
}

// ------------------------------------------------------------------------------------------
// Differential attention.
// lam[0..3] = (λ, exp(λq1·λk1), exp(λq2·λk2)), λ = l1 − l2 + λ_init. One block.
extern "C" __global__ void da_lambda_fwd(const float* __restrict__ q1, const float* __restrict__ k1,
                                         const float* __restrict__ q2, const float* __restrict__ k2,
                                         float* __restrict__ lam, int hs, float lambda_init) {
    __shared__ float scratch[32];
    float a = 0.f, b = 0.f;
    for (int i = threadIdx.x; i < hs; i += blockDim.x) {
        a += q1[i] * k1[i];
        b += q2[i] * k2[i];
    }
    a = block_sum(a, scratch);
    b = block_sum(b, scratch);
    if (threadIdx.x == 0) {
        const float l1 = expf(a), l2 = expf(b);
        lam[0] = l1 - l2 + lambda_init;
        lam[1] = l1;
        lam[2] = l2;
    }
}

// Adds the λ-vector gradients from dλ (lam[3], accumulated by diff_combine_bwd).
extern "C" __global__ void da_lambda_bwd(const float* __restrict__ q1, const float* __restrict__ k1,
                                         const float* __restrict__ q2, const float* __restrict__ k2,
                                         const float* __restrict__ lam, float* __restrict__ dq1,
                                         float* __restrict__ dk1, float* __restrict__ dq2,
                                         float* __restrict__ dk2, int hs) {
    const float dl = lam[3], l1 = lam[1], l2 = lam[2];
    for (int i = threadIdx.x; i < hs; i += blockDim.x) {
        dq1[i] += dl * l1 * k1[i];
        dk1[i] += dl * l1 * q1[i];
        dq2[i] -= dl * l2 * k2[i];
        dk2[i] -= dl * l2 * q2[i];
    }
}

#define DA_MAXQ 16  // width ≤ 32·DA_MAXQ = 512

// Per vector v of width w (= 2hs; vectors are (row, pair), contiguous):
//   diff = o1 − λ·o2;  rstd = rsqrt(mean(diff²) + eps);  out = bf16(diff·rstd·γ·post),
// post = 1 − λ_init. One warp per vector; rstd saved (fp32, [vectors]).
extern "C" __global__ void diff_combine_fwd(const bf16* __restrict__ o1, const bf16* __restrict__ o2,
                                            const float* __restrict__ lam, const float* __restrict__ gamma,
                                            bf16* __restrict__ out, float* __restrict__ rstd_out, int vectors,
                                            int w, float eps, float post) {
    const int lane = threadIdx.x & 31;
    const int v = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (v >= vectors) return;
    const float l = lam[0];
    const bf16* a = o1 + (size_t)v * w;
    const bf16* b = o2 + (size_t)v * w;
    float d[DA_MAXQ];
    float ss = 0.f;
#pragma unroll
    for (int q = 0; q < DA_MAXQ; ++q) {
        const int e = lane + 32 * q;
        d[q] = e < w ? bf(a[e]) - l * bf(b[e]) : 0.f;
        ss += d[q] * d[q];
    }
    const float rstd = rsqrtf(warp_sum(ss) / (float)w + eps);
    if (lane == 0) rstd_out[v] = rstd;
    bf16* o = out + (size_t)v * w;
#pragma unroll
    for (int q = 0; q < DA_MAXQ; ++q) {
        const int e = lane + 32 * q;
        if (e < w) o[e] = tobf(d[q] * rstd * gamma[e] * post);
    }
}

// Backward of diff_combine_fwd: ĝ = dout·post·γ; ddiff = rstd·(ĝ − x̂·mean(ĝ·x̂));
// do1 = bf16(ddiff), do2 = bf16(−λ·ddiff); dgamma += Σ dout·post·x̂; lam[3] += −Σ ddiff·o2.
// Warps grid-stride over vectors; block partials in shared memory, then atomics.
extern "C" __global__ void diff_combine_bwd(const bf16* __restrict__ o1, const bf16* __restrict__ o2,
                                            float* __restrict__ lam, const float* __restrict__ gamma,
                                            const float* __restrict__ rstd_in, const bf16* __restrict__ dout,
                                            bf16* __restrict__ do1, bf16* __restrict__ do2,
                                            float* __restrict__ dgamma, int vectors, int w, float post) {
    __shared__ float sg[8][32 * DA_MAXQ];
    __shared__ float sl[8];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    const float l = lam[0];
    float pg[DA_MAXQ];
#pragma unroll
    for (int q = 0; q < DA_MAXQ; ++q) pg[q] = 0.f;
    float pl = 0.f;
    for (int v = blockIdx.x * nw + warp; v < vectors; v += gridDim.x * nw) {
        const bf16* a = o1 + (size_t)v * w;
        const bf16* b = o2 + (size_t)v * w;
        const bf16* dv = dout + (size_t)v * w;
        const float rstd = rstd_in[v];
        float xh[DA_MAXQ], gh[DA_MAXQ], ob[DA_MAXQ];
        float dot = 0.f;
#pragma unroll
        for (int q = 0; q < DA_MAXQ; ++q) {
            const int e = lane + 32 * q;
            if (e < w) {
                ob[q] = bf(b[e]);
                xh[q] = (bf(a[e]) - l * ob[q]) * rstd;
                const float dd = bf(dv[e]) * post;
                gh[q] = dd * gamma[e];
                pg[q] += dd * xh[q];
            } else {
                ob[q] = xh[q] = gh[q] = 0.f;
            }
            dot += gh[q] * xh[q];
        }
        dot = warp_sum(dot) / (float)w;
#pragma unroll
        for (int q = 0; q < DA_MAXQ; ++q) {
            const int e = lane + 32 * q;
            if (e < w) {
                const float dd = rstd * (gh[q] - xh[q] * dot);
                do1[(size_t)v * w + e] = tobf(dd);
                do2[(size_t)v * w + e] = tobf(-l * dd);
                pl -= dd * ob[q];
            }
        }
    }
#pragma unroll
    for (int q = 0; q < DA_MAXQ; ++q) sg[warp][lane + 32 * q] = pg[q];
    pl = warp_sum(pl);
    if (lane == 0) sl[warp] = pl;
    __syncthreads();
    for (int e = threadIdx.x; e < w; e += blockDim.x) {
        float s = 0.f;
        for (int q = 0; q < nw; ++q) s += sg[q][e];
        atomicAdd(dgamma + e, s);
    }
    if (threadIdx.x == 0) {
        float s = 0.f;
        for (int q = 0; q < nw; ++q) s += sl[q];
        atomicAdd(lam + 3, s);
    }
}

// ------------------------------------------------------------------------------------------
// Bias. y[r, c] = bf16(y[r, c] + bias[c]) in place (row stride sy).
extern "C" __global__ void bias_add_bf16(bf16* __restrict__ y, int sy, const float* __restrict__ bias, int rows,
                                         int n) {
    const long long total = (long long)rows * n;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const long long r = i / n, c = i - r * n;
        y[r * sy + c] = tobf(bf(y[r * sy + c]) + bias[c]);
    }
}

// y[r, c] += scale·bias[c] (fp32 residual stream, contiguous rows of n).
extern "C" __global__ void bias_add_f32(float* __restrict__ y, const float* __restrict__ bias, float scale, int rows,
                                        int n) {
    const long long total = (long long)rows * n;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x)
        y[i] += scale * bias[i % n];
}

#define BIAS_RUN 128
// dbias[c] += scale·Σ_r dy[r, c] (bf16 dy, row stride sdy). Block: 32 columns × 8 warps, each
// warp sums BIAS_RUN rows. Grid: (ceil(n/32), ceil(rows / (8·BIAS_RUN))).
extern "C" __global__ void __launch_bounds__(256) bias_grad(const bf16* __restrict__ dy, int sdy,
                                                            float* __restrict__ dbias, float scale, int rows,
                                                            int n) {
    __shared__ float red[8][33];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int c = blockIdx.x * 32 + lane;
    const int r0 = (blockIdx.y * 8 + warp) * BIAS_RUN;
    float s = 0.f;
    if (c < n) {
        const int r1 = min(r0 + BIAS_RUN, rows);
        for (int r = r0; r < r1; ++r) s += bf(dy[(size_t)r * sdy + c]);
    }
    red[warp][lane] = s;
    __syncthreads();
    if (warp == 0 && c < n) {
        float t = 0.f;
#pragma unroll
        for (int q = 0; q < 8; ++q) t += red[q][lane];
        atomicAdd(dbias + c, scale * t);
    }
}

// ------------------------------------------------------------------------------------------
// Head gather / scatter (differential attention's pair layouts): for every row r and head h,
// dst[r*dst_rs + dst_off[h] + e] = (accumulate ? dst[..] : 0) + src[r*src_rs + src_off[h] + e]
// for e < width (bf16, the sum in fp32). One launch must not write an element twice.
extern "C" __global__ void copy_heads(const bf16* __restrict__ src, int src_rs, const int* __restrict__ src_off,
                                      bf16* __restrict__ dst, int dst_rs, const int* __restrict__ dst_off, int rows,
                                      int heads, int width, int accumulate) {
    const long long n = (long long)rows * heads * width;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const long long rh = i / width;
        const int e = (int)(i - rh * width);
        const long long r = rh / heads;
        const int h = (int)(rh - r * heads);
        const float v = bf(src[r * src_rs + src_off[h] + e]);
        bf16* d = dst + r * dst_rs + dst_off[h] + e;
        *d = tobf(accumulate ? bf(*d) + v : v);
    }
}

// ------------------------------------------------------------------------------------------
// YOCO K/V gradient between the cross-attention layers and their exporter, columns
// [c0, c0 + w) of rows of n (the fused QKV layout; Q's columns are not touched):
//   mode 0: acc[r, c] += dqkv[r, c]      (a cross-attention layer's dK/dV, fp32 sum)
//   mode 1: acc[r, c]  = dqkv[r, c]      (the first of them in the backward pass)
//   mode 2: dqkv[r, c] = bf16(dqkv[r, c] + acc[r, c])   (the exporter's own dK/dV joins)
// Eight columns per thread when n, c0 and w are multiples of 8 (16-byte rows), else one.
extern "C" __global__ void kv_grad_add(bf16* __restrict__ dqkv, float* __restrict__ acc, int n, int c0, int w,
                                       int rows, int mode) {
    const bool vec = ((n | c0 | w) & 7) == 0;
    const int per = vec ? 8 : 1, wq = w / per;
    const long long total = (long long)rows * wq;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const long long r = i / wq;
        const long long e = r * n + c0 + (i - r * wq) * per;
        if (vec) {
            uint4 raw = *reinterpret_cast<const uint4*>(dqkv + e);
            bf16* v = reinterpret_cast<bf16*>(&raw);
            float4* a = reinterpret_cast<float4*>(acc + e);
            float4 lo = a[0], hi = a[1];
            float* f0 = reinterpret_cast<float*>(&lo);
            float* f1 = reinterpret_cast<float*>(&hi);
            if (mode == 2) {
#pragma unroll
                for (int k = 0; k < 4; ++k) {
                    v[k] = tobf(bf(v[k]) + f0[k]);
                    v[k + 4] = tobf(bf(v[k + 4]) + f1[k]);
                }
                *reinterpret_cast<uint4*>(dqkv + e) = raw;
            } else {
#pragma unroll
                for (int k = 0; k < 4; ++k) {
                    f0[k] = (mode == 1 ? 0.f : f0[k]) + bf(v[k]);
                    f1[k] = (mode == 1 ? 0.f : f1[k]) + bf(v[k + 4]);
                }
                a[0] = lo;
                a[1] = hi;
            }
        } else if (mode == 2) {
            dqkv[e] = tobf(bf(dqkv[e]) + acc[e]);
        } else {
            acc[e] = (mode == 1 ? 0.f : acc[e]) + bf(dqkv[e]);
        }
    }
}
