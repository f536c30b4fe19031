// Embedding, RMSNorm, RoPE, SwiGLU, casts.

// out[t, :] = wte[idx[t], :]   (fp32 rows)
extern "C" __global__ void embedding_fwd(const int* __restrict__ idx, const float* __restrict__ wte,
                                         float* __restrict__ out, int rows, int n) {
    const int t = blockIdx.x;
    if (t >= rows) return;
    const float* src = wte + (size_t)idx[t] * n;
    float* dst = out + (size_t)t * n;
    if ((n & 3) == 0) {
        for (int c = threadIdx.x * 4; c < n; c += blockDim.x * 4)
            *reinterpret_cast<float4*>(dst + c) = *reinterpret_cast<const float4*>(src + c);
    } else {
        for (int c = threadIdx.x; c < n; c += blockDim.x) dst[c] = src[c];
    }
}

// dwte[idx[t], :] += dout[t, :]
extern "C" __global__ void embedding_bwd(const int* __restrict__ idx, const float* __restrict__ dout,
                                         float* __restrict__ dwte, int rows, int n) {
    const int t = blockIdx.x;
    if (t >= rows) return;
    float* dst = dwte + (size_t)idx[t] * n;
    const float* src = dout + (size_t)t * n;
    for (int c = threadIdx.x; c < n; c += blockDim.x) atomicAdd(dst + c, src[c]);
}

// y = x * rsqrt(mean(x^2) + eps) * gamma * scale, fp32 math, bf16 out. One block per row.
extern "C" __global__ void rmsnorm_fwd(const float* __restrict__ x, const float* __restrict__ gamma,
                                       bf16* __restrict__ y, float* __restrict__ rstd_out,
                                       int rows, int n, float eps, float scale) {
    __shared__ float scratch[32];
    const int r = blockIdx.x;
    if (r >= rows) return;
    const float* xr = x + (size_t)r * n;
    bf16* yr = y + (size_t)r * n;
    float ss = 0.f;
    if ((n & 3) == 0) {
        for (int c = threadIdx.x * 4; c < n; c += blockDim.x * 4) {
            float4 v = *reinterpret_cast<const float4*>(xr + c);
            ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
        }
    } else {
        for (int c = threadIdx.x; c < n; c += blockDim.x) ss += xr[c] * xr[c];
    }
    ss = block_sum(ss, scratch);
    const float rstd = rsqrtf(ss / (float)n + eps);
    if (rstd_out != nullptr && threadIdx.x == 0) rstd_out[r] = rstd;
    if ((n & 3) == 0) {
        for (int c = threadIdx.x * 4; c < n; c += blockDim.x * 4) {
            float4 v = *reinterpret_cast<const float4*>(xr + c);
            float4 g = *reinterpret_cast<const float4*>(gamma + c);
            bf162 a = __floats2bfloat162_rn(v.x * rstd * g.x * scale, v.y * rstd * g.y * scale);
            bf162 b = __floats2bfloat162_rn(v.z * rstd * g.z * scale, v.w * rstd * g.w * scale);
            *reinterpret_cast<bf162*>(yr + c) = a;
            *reinterpret_cast<bf162*>(yr + c + 2) = b;
        }
    } else {
        for (int c = threadIdx.x; c < n; c += blockDim.x) yr[c] = tobf(xr[c] * rstd * gamma[c] * scale);
    }
}

// Backward of rmsnorm_fwd. dy is the bf16 gradient of y. Per row:
//   dxhat = dy * gamma * scale;  dx = rstd * (dxhat - xhat * mean(dxhat * xhat))
//   dres = (accumulate ? dres : 0) + dx   (fp32), dres_bf = bf16(dres)
//   dgamma[c] += sum_rows dy * xhat * scale   (block partials in shared memory, then atomics)
//   h_out (optional, may be dy itself) = bf16(x * rstd * gamma), the forward output again,
//   for the weight gradient of the product that consumed it (saves a recompute pass).
// Grid-stride over rows; dynamic shared memory holds n floats of dgamma partials.
// dy and h_out may alias: each element of dy is read (twice) by one thread before that
// thread overwrites it, so neither pointer is __restrict__.
extern "C" __global__ void rmsnorm_bwd(const float* __restrict__ x, const float* __restrict__ gamma,
                                       const float* __restrict__ rstd_in, const bf16* dy,
                                       float* __restrict__ dres, bf16* __restrict__ dres_bf,
                                       float* __restrict__ dgamma, int rows, int n, float scale,
                                       int accumulate, bf16* h_out) {
    extern __shared__ float dg[];
    __shared__ float scratch[32];
    for (int c = threadIdx.x; c < n; c += blockDim.x) dg[c] = 0.f;
    const bool vec = (n & 3) == 0;
    for (int r = blockIdx.x; r < rows; r += gridDim.x) {
        const float* xr = x + (size_t)r * n;
        const bf16* dyr = dy + (size_t)r * n;
        float* dr = dres + (size_t)r * n;
        bf16* drb = dres_bf + (size_t)r * n;
        const float rstd = rstd_in[r];
        float dot = 0.f;
        if (vec) {
            for (int c = threadIdx.x * 4; c < n; c += blockDim.x * 4) {
                const float4 xv = *reinterpret_cast<const float4*>(xr + c);
                const float4 gv = *reinterpret_cast<const float4*>(gamma + c);
                const float2 d01 = __bfloat1622float2(*reinterpret_cast<const bf162*>(dyr + c));
                const float2 d23 = __bfloat1622float2(*reinterpret_cast<const bf162*>(dyr + c + 2));
                dot += d01.x * gv.x * xv.x + d01.y * gv.y * xv.y + d23.x * gv.z * xv.z + d23.y * gv.w * xv.w;
                dg[c] += d01.x * xv.x * rstd * scale;
                dg[c + 1] += d01.y * xv.y * rstd * scale;
                dg[c + 2] += d23.x * xv.z * rstd * scale;
                dg[c + 3] += d23.y * xv.w * rstd * scale;
            }
        } else {
            for (int c = threadIdx.x; c < n; c += blockDim.x) {
                const float d = bf(dyr[c]);
                dot += d * gamma[c] * xr[c];
                dg[c] += d * xr[c] * rstd * scale;
            }
        }
        dot = block_sum(dot, scratch) * rstd * scale / (float)n;
        if (vec) {
            for (int c = threadIdx.x * 4; c < n; c += blockDim.x * 4) {
                const float4 xv = *reinterpret_cast<const float4*>(xr + c);
                const float4 gv = *reinterpret_cast<const float4*>(gamma + c);
                const float2 d01 = __bfloat1622float2(*reinterpret_cast<const bf162*>(dyr + c));
                const float2 d23 = __bfloat1622float2(*reinterpret_cast<const bf162*>(dyr + c + 2));
                float4 o;
                o.x = rstd * (d01.x * gv.x * scale - xv.x * rstd * dot);
                o.y = rstd * (d01.y * gv.y * scale - xv.y * rstd * dot);
                o.z = rstd * (d23.x * gv.z * scale - xv.z * rstd * dot);
                o.w = rstd * (d23.y * gv.w * scale - xv.w * rstd * dot);
                if (accumulate) {
                    const float4 p = *reinterpret_cast<const float4*>(dr + c);
                    o.x += p.x;
                    o.y += p.y;
                    o.z += p.z;
                    o.w += p.w;
                }
                *reinterpret_cast<float4*>(dr + c) = o;
                *reinterpret_cast<bf162*>(drb + c) = __floats2bfloat162_rn(o.x, o.y);
                *reinterpret_cast<bf162*>(drb + c + 2) = __floats2bfloat162_rn(o.z, o.w);
                if (h_out != nullptr) {  // the same expression as rmsnorm_fwd's output
                    bf16* hr = h_out + (size_t)r * n;
                    *reinterpret_cast<bf162*>(hr + c) = __floats2bfloat162_rn(xv.x * rstd * gv.x, xv.y * rstd * gv.y);
                    *reinterpret_cast<bf162*>(hr + c + 2) = __floats2bfloat162_rn(xv.z * rstd * gv.z, xv.w * rstd * gv.w);
                }
            }
        } else {
            for (int c = threadIdx.x; c < n; c += blockDim.x) {
                const float xh = xr[c] * rstd;
                const float dxh = bf(dyr[c]) * gamma[c] * scale;
                float v = rstd * (dxh - xh * dot);
                if (accumulate) v += dr[c];
                dr[c] = v;
                drb[c] = tobf(v);
                if (h_out != nullptr) h_out[(size_t)r * n + c] = tobf(xr[c] * rstd * gamma[c]);
            }
        }
    }
    __syncthreads();
    for (int c = threadIdx.x; c < n; c += blockDim.x) atomicAdd(dgamma + c, dg[c]);
}

// Register-resident RMSNorm for n % 4 == 0 and n <= 4·blockDim·V (ops.rs picks V and the block
// size: rmsnorm_chunks): each thread keeps its V float4 chunks of the row (chunk k = threadIdx.x + i·blockDim)
// in registers across the reduction, so x, dy and gamma are read from memory once per row.
// Same math as rmsnorm_fwd / rmsnorm_bwd above; the backward also keeps gamma and its dgamma
// partials in registers over its grid-stride rows.
// Four floats as four bf16 (round to nearest) in one 8-byte store.
__device__ __forceinline__ void store_bf16x4(bf16* dst, float a, float b, float c, float d) {
    bf162 lo = __floats2bfloat162_rn(a, b), hi = __floats2bfloat162_rn(c, d);
    uint2 packed;
    packed.x = *reinterpret_cast<u32*>(&lo);
    packed.y = *reinterpret_cast<u32*>(&hi);
    *reinterpret_cast<uint2*>(dst) = packed;
}

// The rest of a register-resident RMSNorm forward row, once each thread holds its chunks xv
// and their sum of squares ss: rstd, then y = bf16(x·rstd·gamma·scale), and x itself into
// x_out unless that is null.
template <int V>
__device__ __forceinline__ void rmsnorm_regs_finish(const float4 (&xv)[V], float ss, float* scratch, int r, int n,
                                                    float eps, float scale, const float* __restrict__ gamma,
                                                    bf16* yr, float* x_out_r, float* __restrict__ rstd_out) {
    ss = block_sum(ss, scratch);
    const float rstd = rsqrtf(ss / (float)n + eps);
    if (rstd_out != nullptr && threadIdx.x == 0) rstd_out[r] = rstd;
#pragma unroll
    for (int i = 0; i < V; i++) {
        const int c = (threadIdx.x + i * blockDim.x) * 4;
        if (c >= n) break;
        const float4 v = xv[i];
        if (x_out_r != nullptr) *reinterpret_cast<float4*>(x_out_r + c) = v;
        const float4 g = *reinterpret_cast<const float4*>(gamma + c);
        store_bf16x4(yr + c, v.x * rstd * g.x * scale, v.y * rstd * g.y * scale, v.z * rstd * g.z * scale,
                     v.w * rstd * g.w * scale);
    }
}

template <int V>
__device__ __forceinline__ void rmsnorm_fwd_regs(const float* __restrict__ x, const float* __restrict__ gamma,
                                                 bf16* __restrict__ y, float* __restrict__ rstd_out, int rows,
                                                 int n, float eps, float scale) {
    __shared__ float scratch[32];
    const int r = blockIdx.x;
    if (r >= rows) return;
    const float* xr = x + (size_t)r * n;
    bf16* yr = y + (size_t)r * n;
    float4 xv[V];
    float ss = 0.f;
#pragma unroll
    for (int i = 0; i < V; i++) {
        const int c = (threadIdx.x + i * blockDim.x) * 4;
        xv[i] = c < n ? *reinterpret_cast<const float4*>(xr + c) : make_float4(0.f, 0.f, 0.f, 0.f);
        ss += xv[i].x * xv[i].x + xv[i].y * xv[i].y + xv[i].z * xv[i].z + xv[i].w * xv[i].w;
    }
    rmsnorm_regs_finish<V>(xv, ss, scratch, r, n, eps, scale, gamma, yr, nullptr, rstd_out);
}

// The residual add of a branch and the next norm in one pass: x_out = x_in + rs·delta (fp32;
// delta is the branch output in bf16, as ArchScale's autocast Linear leaves it), then
// y = rmsnorm(x_out). The branch's product then writes bf16 instead of reading and writing
// the fp32 residual in its epilogue. x_out may be x_in (evaluation updates in place) and y
// may be delta: each thread reads its chunks before it writes them.
template <int V>
__device__ __forceinline__ void rmsnorm_fwd_add_regs(const float* x_in, const bf16* delta, float rs, float* x_out,
                                                     const float* __restrict__ gamma, bf16* y,
                                                     float* __restrict__ rstd_out, int rows, int n, float eps,
                                                     float scale) {
    __shared__ float scratch[32];
    const int r = blockIdx.x;
    if (r >= rows) return;
    const size_t base = (size_t)r * n;
    float4 xv[V];
    float ss = 0.f;
#pragma unroll
    for (int i = 0; i < V; i++) {
        const int c = (threadIdx.x + i * blockDim.x) * 4;
        if (c < n) {
            const float4 x = *reinterpret_cast<const float4*>(x_in + base + c);
            const uint2 raw = *reinterpret_cast<const uint2*>(delta + base + c);
            const float2 d01 = __bfloat1622float2(*reinterpret_cast<const bf162*>(&raw.x));
            const float2 d23 = __bfloat1622float2(*reinterpret_cast<const bf162*>(&raw.y));
            xv[i] = make_float4(x.x + rs * d01.x, x.y + rs * d01.y, x.z + rs * d23.x, x.w + rs * d23.y);
        } else {
            xv[i] = make_float4(0.f, 0.f, 0.f, 0.f);
        }
        ss += xv[i].x * xv[i].x + xv[i].y * xv[i].y + xv[i].z * xv[i].z + xv[i].w * xv[i].w;
    }
    rmsnorm_regs_finish<V>(xv, ss, scratch, r, n, eps, scale, gamma, y + base, x_out + base, rstd_out);
}

template <int V>
__device__ __forceinline__ void rmsnorm_bwd_regs(const float* __restrict__ x, const float* __restrict__ gamma,
                                                 const float* __restrict__ rstd_in, const bf16* dy,
                                                 float* __restrict__ dres, bf16* __restrict__ dres_bf,
                                                 float* __restrict__ dgamma, int rows, int n, float scale,
                                                 int accumulate, bf16* h_out) {
    __shared__ float scratch[32];
    float4 gv[V], dgv[V];
#pragma unroll
    for (int i = 0; i < V; i++) {
        const int c = (threadIdx.x + i * blockDim.x) * 4;
        gv[i] = c < n ? *reinterpret_cast<const float4*>(gamma + c) : make_float4(0.f, 0.f, 0.f, 0.f);
        dgv[i] = make_float4(0.f, 0.f, 0.f, 0.f);
    }
    for (int r = blockIdx.x; r < rows; r += gridDim.x) {
        const float* xr = x + (size_t)r * n;
        const bf16* dyr = dy + (size_t)r * n;
        const float rstd = rstd_in[r];
        float* dr = dres + (size_t)r * n;
        float4 xv[V], dv[V], pv[V];
        float dot = 0.f;
#pragma unroll
        for (int i = 0; i < V; i++) {
            const int c = (threadIdx.x + i * blockDim.x) * 4;
            // the accumulated gradient is loaded with x and dy, before the reduction needs them
            pv[i] = accumulate && c < n ? *reinterpret_cast<const float4*>(dr + c) : make_float4(0.f, 0.f, 0.f, 0.f);
            if (c < n) {
                xv[i] = *reinterpret_cast<const float4*>(xr + c);
                const uint2 raw = *reinterpret_cast<const uint2*>(dyr + c);
                const float2 d01 = __bfloat1622float2(*reinterpret_cast<const bf162*>(&raw.x));
                const float2 d23 = __bfloat1622float2(*reinterpret_cast<const bf162*>(&raw.y));
                dv[i] = make_float4(d01.x, d01.y, d23.x, d23.y);
            } else {
                xv[i] = make_float4(0.f, 0.f, 0.f, 0.f);
                dv[i] = xv[i];
            }
            dot += dv[i].x * gv[i].x * xv[i].x + dv[i].y * gv[i].y * xv[i].y + dv[i].z * gv[i].z * xv[i].z +
                   dv[i].w * gv[i].w * xv[i].w;
            dgv[i].x += dv[i].x * xv[i].x * rstd * scale;
            dgv[i].y += dv[i].y * xv[i].y * rstd * scale;
            dgv[i].z += dv[i].z * xv[i].z * rstd * scale;
            dgv[i].w += dv[i].w * xv[i].w * rstd * scale;
        }
        dot = block_sum(dot, scratch) * rstd * scale / (float)n;
        bf16* drb = dres_bf + (size_t)r * n;
#pragma unroll
        for (int i = 0; i < V; i++) {
            const int c = (threadIdx.x + i * blockDim.x) * 4;
            if (c >= n) break;
            const float4 xq = xv[i], gq = gv[i], d = dv[i];
            float4 o;
            o.x = rstd * (d.x * gq.x * scale - xq.x * rstd * dot);
            o.y = rstd * (d.y * gq.y * scale - xq.y * rstd * dot);
            o.z = rstd * (d.z * gq.z * scale - xq.z * rstd * dot);
            o.w = rstd * (d.w * gq.w * scale - xq.w * rstd * dot);
            o.x += pv[i].x;  // 0 without accumulate
            o.y += pv[i].y;
            o.z += pv[i].z;
            o.w += pv[i].w;
            *reinterpret_cast<float4*>(dr + c) = o;
            store_bf16x4(drb + c, o.x, o.y, o.z, o.w);
            if (h_out != nullptr)  // the same expression as rmsnorm_fwd's output
                store_bf16x4(h_out + (size_t)r * n + c, xq.x * rstd * gq.x, xq.y * rstd * gq.y, xq.z * rstd * gq.z,
                             xq.w * rstd * gq.w);
        }
    }
#pragma unroll
    for (int i = 0; i < V; i++) {
        const int c = (threadIdx.x + i * blockDim.x) * 4;
        if (c >= n) break;
        atomicAdd(dgamma + c, dgv[i].x);
        atomicAdd(dgamma + c + 1, dgv[i].y);
        atomicAdd(dgamma + c + 2, dgv[i].z);
        atomicAdd(dgamma + c + 3, dgv[i].w);
    }
}

#define RMSNORM_REGS(V)                                                                                         \
    extern "C" __global__ void rmsnorm_fwd_add_r##V(const float* x_in, const bf16* delta, float rs, float* x_out,   \
                                                    const float* __restrict__ gamma, bf16* y,                        \
                                                    float* __restrict__ rstd_out, int rows, int n, float eps,        \
                                                    float scale) {                                                   \
        rmsnorm_fwd_add_regs<V>(x_in, delta, rs, x_out, gamma, y, rstd_out, rows, n, eps, scale);                   \
    }                                                                                                           \
    extern "C" __global__ void rmsnorm_fwd_r##V(const float* __restrict__ x, const float* __restrict__ gamma,  \
                                                bf16* __restrict__ y, float* __restrict__ rstd_out, int rows,  \
                                                int n, float eps, float scale) {                               \
        rmsnorm_fwd_regs<V>(x, gamma, y, rstd_out, rows, n, eps, scale);                                       \
    }                                                                                                           \
    extern "C" __global__ void rmsnorm_bwd_r##V(const float* __restrict__ x, const float* __restrict__ gamma,  \
                                                const float* __restrict__ rstd_in, const bf16* dy,             \
                                                float* __restrict__ dres, bf16* __restrict__ dres_bf,          \
                                                float* __restrict__ dgamma, int rows, int n, float scale,      \
                                                int accumulate, bf16* h_out) {                                 \
        rmsnorm_bwd_regs<V>(x, gamma, rstd_in, dy, dres, dres_bf, dgamma, rows, n, scale, accumulate, h_out); \
    }
RMSNORM_REGS(1)
RMSNORM_REGS(2)
RMSNORM_REGS(3)
RMSNORM_REGS(4)

// NeoX rotate-half RoPE in place on the fused grouped QKV buffer
// [rows, G, (qpg + 2), hs]: rotates the qpg query slots and the key slot of every group.
// Position of row r is r % T. cos/sin: bf16 [T, hs/2]. sign = +1 forward, -1 backward.
// One block per row; 8 pairs per thread by 16-byte loads when hs/2 is a multiple of 8.
extern "C" __global__ void rope_qkv(bf16* __restrict__ qkv, const bf16* __restrict__ cos_t,
                                    const bf16* __restrict__ sin_t, int rows, int T, int groups,
                                    int qpg, int hs, float sign) {
    const int r = blockIdx.x;
    if (r >= rows) return;
    const int half = hs / 2;
    const int heads = groups * (qpg + 1);  // rotated slots per row
    const int t = r % T;
    bf16* row = qkv + (size_t)r * groups * (qpg + 2) * hs;
    const bf16* ct = cos_t + (size_t)t * half;
    const bf16* st = sin_t + (size_t)t * half;
    if ((half & 7) == 0) {
        const int vecs = half / 8;
        for (int i = threadIdx.x; i < heads * vecs; i += blockDim.x) {
            const int slot = i / vecs, p = (i - slot * vecs) * 8;
            const int g = slot / (qpg + 1), j = slot - g * (qpg + 1);
            bf16* base = row + (g * (qpg + 2) + j) * hs;
            uint4 c8 = *reinterpret_cast<const uint4*>(ct + p), s8 = *reinterpret_cast<const uint4*>(st + p);
            uint4 a8 = *reinterpret_cast<const uint4*>(base + p);
            uint4 b8 = *reinterpret_cast<const uint4*>(base + p + half);
            const bf162* c2 = reinterpret_cast<const bf162*>(&c8);
            const bf162* s2 = reinterpret_cast<const bf162*>(&s8);
            bf162* a2 = reinterpret_cast<bf162*>(&a8);
            bf162* b2 = reinterpret_cast<bf162*>(&b8);
#pragma unroll
            for (int k = 0; k < 4; k++) {
                const float2 c = __bfloat1622float2(c2[k]), sn = __bfloat1622float2(s2[k]);
                const float2 x1 = __bfloat1622float2(a2[k]), x2 = __bfloat1622float2(b2[k]);
                const float sx = sn.x * sign, sy = sn.y * sign;
                a2[k] = __floats2bfloat162_rn(x1.x * c.x - x2.x * sx, x1.y * c.y - x2.y * sy);
                b2[k] = __floats2bfloat162_rn(x2.x * c.x + x1.x * sx, x2.y * c.y + x1.y * sy);
            }
            *reinterpret_cast<uint4*>(base + p) = a8;
            *reinterpret_cast<uint4*>(base + p + half) = b8;
        }
        return;
    }
    for (int i = threadIdx.x; i < heads * half; i += blockDim.x) {
        const int slot = i / half, p = i - slot * half;
        const int g = slot / (qpg + 1), j = slot - g * (qpg + 1);
        bf16* base = row + (g * (qpg + 2) + j) * hs;
        const float c = bf(ct[p]);
        const float s = bf(st[p]) * sign;
        const float x1 = bf(base[p]), x2 = bf(base[p + half]);
        base[p] = tobf(x1 * c - x2 * s);
        base[p + half] = tobf(x2 * c + x1 * s);
    }
}

__device__ __forceinline__ float silu_f(float g) { return g / (1.f + __expf(-g)); }

// a = silu(g) * u with gu = [rows, 2I] (g first half, u second half), fp32 math, bf16 out.
// One block per row.
// 8 bf16 <-> 8 floats, for 16-byte loads and stores.
__device__ __forceinline__ void unpack8(uint4 v, float* f) {
    const bf162* p = reinterpret_cast<const bf162*>(&v);
#pragma unroll
    for (int i = 0; i < 4; i++) { const float2 t = __bfloat1622float2(p[i]); f[2 * i] = t.x; f[2 * i + 1] = t.y; }
}
__device__ __forceinline__ uint4 pack8(const float* f) {
    uint4 v;
    bf162* p = reinterpret_cast<bf162*>(&v);
#pragma unroll
    for (int i = 0; i < 4; i++) p[i] = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
    return v;
}
// Whether rows of width I (and 2I) at these bases can go by 16-byte accesses.
__device__ __forceinline__ bool by16(const void* x, const void* y, int I) {
    return (I & 7) == 0 && ((reinterpret_cast<size_t>(x) | reinterpret_cast<size_t>(y)) & 15) == 0;
}

// a = silu(g) * u on rows [g ‖ u] of width 2I. One block per row; 16-byte accesses when
// they fit (the kernel is bandwidth-bound: 6 bytes per output element).
extern "C" __global__ void swiglu_fwd(const bf16* __restrict__ gu, bf16* __restrict__ a, int rows, int I) {
    const int r = blockIdx.x;
    if (r >= rows) return;
    const bf16* gr = gu + (size_t)r * 2 * I;
    const bf16* ur = gr + I;
    bf16* ar = a + (size_t)r * I;
    if (by16(gu, a, I)) {
        for (int c = threadIdx.x * 8; c < I; c += blockDim.x * 8) {
            float g[8], u[8], o[8];
            unpack8(*reinterpret_cast<const uint4*>(gr + c), g);
            unpack8(*reinterpret_cast<const uint4*>(ur + c), u);
#pragma unroll
            for (int i = 0; i < 8; i++) o[i] = silu_f(g[i]) * u[i];
            *reinterpret_cast<uint4*>(ar + c) = pack8(o);
        }
    } else if ((I & 1) == 0) {
        for (int c = threadIdx.x * 2; c < I; c += blockDim.x * 2) {
            const float2 g = __bfloat1622float2(*reinterpret_cast<const bf162*>(gr + c));
            const float2 u = __bfloat1622float2(*reinterpret_cast<const bf162*>(ur + c));
            *reinterpret_cast<bf162*>(ar + c) = __floats2bfloat162_rn(silu_f(g.x) * u.x, silu_f(g.y) * u.y);
        }
    } else {
        for (int c = threadIdx.x; c < I; c += blockDim.x) ar[c] = tobf(silu_f(bf(gr[c])) * bf(ur[c]));
    }
}

// In place on both buffers: gu <- d(gu) given da, and da <- a = silu(g)*u, the forward
// output that W3's weight gradient needs (recomputed here rather than in a pass of its
// own, which would read g and u again). dg = da*u*sig*(1+g*(1-sig)), du = da*silu(g).
// One block per row.
__device__ __forceinline__ void swiglu_bwd1(float g, float u, float d, float& dg, float& du, float& a) {
    const float sig = 1.f / (1.f + __expf(-g));
    const float silu = g * sig;
    dg = d * u * sig * (1.f + g * (1.f - sig));
    du = d * silu;
    a = silu * u;
}
extern "C" __global__ void swiglu_bwd(bf16* __restrict__ gu, bf16* __restrict__ da_a, int rows, int I) {
    const int r = blockIdx.x;
    if (r >= rows) return;
    bf16* gr = gu + (size_t)r * 2 * I;
    bf16* ur = gr + I;
    bf16* dr = da_a + (size_t)r * I;
    if (by16(gu, da_a, I)) {
        for (int c = threadIdx.x * 8; c < I; c += blockDim.x * 8) {
            float g[8], u[8], d[8], dg[8], du[8], a[8];
            unpack8(*reinterpret_cast<const uint4*>(gr + c), g);
            unpack8(*reinterpret_cast<const uint4*>(ur + c), u);
            unpack8(*reinterpret_cast<const uint4*>(dr + c), d);
#pragma unroll
            for (int i = 0; i < 8; i++) swiglu_bwd1(g[i], u[i], d[i], dg[i], du[i], a[i]);
            *reinterpret_cast<uint4*>(gr + c) = pack8(dg);
            *reinterpret_cast<uint4*>(ur + c) = pack8(du);
            *reinterpret_cast<uint4*>(dr + c) = pack8(a);
        }
    } else {
        for (int c = threadIdx.x; c < I; c += blockDim.x) {
            float dg, du, a;
            swiglu_bwd1(bf(gr[c]), bf(ur[c]), bf(dr[c]), dg, du, a);
            gr[c] = tobf(dg);
            ur[c] = tobf(du);
            dr[c] = tobf(a);
        }
    }
}

extern "C" __global__ void cast_f32_bf16(const float* __restrict__ x, bf16* __restrict__ y, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        y[i] = tobf(x[i]);
}

extern "C" __global__ void cast_bf16_f32(const bf16* __restrict__ x, float* __restrict__ y, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        y[i] = bf(x[i]);
}
