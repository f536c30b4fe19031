// Flash attention forward and backward: causal, optional sliding window, GQA, head_dim
// 64 or 128, bf16 operands, fp32 accumulation on tensor cores (mma.sync m16n8k16).
// Never materialises T x T.
//
// Layout: token rows of batch b are rows b*T .. b*T+T-1. Query head h belongs to group
// g = h / qpg; its vector at row r is q[r*q_rs + g*q_gs + (h%qpg)*D]. Key/value of group g:
// k[r*kv_rs + g*kv_gs], v[r*kv_rs + g*kv_gs]. Output o[r*o_rs + h*D]. lse[(b*H + h)*T + t]
// (natural log). Query t sees keys j with j <= t and (window == 0 or j > t - window) and, in
// varlen mode (seg non-null), j >= seg[b*T + t], the start of t's document within its row.
// Mask bounds, the bf16 pack and both epilogues are shared with flash_sm90_ws.cu
// (flash_common.cuh, prepended).

#define BR 64
#define BC 64
#define NWARPS 4
#define NTHREADS (NWARPS * 32)

__device__ __forceinline__ u32 smem_u32(const void* p) { return (u32)__cvta_generic_to_shared(p); }

__device__ __forceinline__ void ldsm_x4(u32& r0, u32& r1, u32& r2, u32& r3, const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(smem_u32(p)));
}

__device__ __forceinline__ void ldsm_x4_t(u32& r0, u32& r1, u32& r2, u32& r3, const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(smem_u32(p)));
}

__device__ __forceinline__ void mma16816(float* c, const u32* a, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
    const int n = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)), "l"(gmem), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// The m16k16 A fragment (bf16) of two adjacent n8 accumulator blocks c0, c1 (the mma
// accumulator layout of a 16 x 16 block is the A-fragment layout).
__device__ __forceinline__ void acc_to_a(u32 (&a)[4], const float (&c0)[4], const float (&c1)[4]) {
    a[0] = pack_bf16(c0[0], c0[1]);
    a[1] = pack_bf16(c0[2], c0[3]);
    a[2] = pack_bf16(c1[0], c1[1]);
    a[3] = pack_bf16(c1[2], c1[3]);
}

// acc[0 .. N/8) += A B^T: a (16 x 16, registers) against N rows of B at `b`, columns k0 ..
// k0 + 15 (shared memory, row stride LD).
template <int N, int LD>
__device__ __forceinline__ void mma_abt(float (*acc)[4], const u32* a, const bf16* b, int k0, int lane) {
#pragma unroll
    for (int np = 0; np < N / 16; np++) {
        u32 b0, b1, b2, b3;
        ldsm_x4(b0, b1, b2, b3, b + (np * 16 + (lane & 7) + ((lane >> 4) << 3)) * LD + k0 + ((lane >> 3) & 1) * 8);
        mma16816(acc[2 * np], a, b0, b1);
        mma16816(acc[2 * np + 1], a, b2, b3);
    }
}

// acc[0 .. N/8) += A B: a (16 x 16, registers) against rows k0 .. k0 + 15 of B at `b`, N
// columns (shared memory, row stride LD, read transposed).
template <int N, int LD>
__device__ __forceinline__ void mma_ab(float (*acc)[4], const u32* a, const bf16* b, int k0, int lane) {
#pragma unroll
    for (int dp = 0; dp < N / 16; dp++) {
        u32 b0, b1, b2, b3;
        ldsm_x4_t(b0, b1, b2, b3, b + (k0 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + dp * 16 + (lane >> 4) * 8);
        mma16816(acc[2 * dp], a, b0, b1);
        mma16816(acc[2 * dp + 1], a, b2, b3);
    }
}

// Copies ROWS x D bf16 rows starting at token row0 (zero rows past T) into smem [ROWS][D+8].
template <int ROWS, int D, int NT = NTHREADS>
__device__ __forceinline__ void load_tile(bf16* s, const bf16* g, long long rs, int row0, int T) {
    constexpr int CPR = D / 8;  // 16-byte chunks per row
    constexpr int LD = D + 8;
    for (int i = threadIdx.x; i < ROWS * CPR; i += NT) {
        const int r = i / CPR, c = (i % CPR) * 8;
        const bool valid = row0 + r < T;
        const bf16* src = valid ? g + (long long)(row0 + r) * rs + c : g;
        cp_async16(s + r * LD + c, src, valid);
    }
}

template <int D>
__device__ __forceinline__ void flash_fwd(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                          const bf16* __restrict__ v, bf16* __restrict__ o,
                                          float* __restrict__ lse, const int* __restrict__ seg, int T, int H, int qpg,
                                          int q_rs, int q_gs, int kv_rs, int kv_gs, int o_rs, float scale_log2,
                                          int window) {
    constexpr int LD = D + 8;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    bf16* Qs = reinterpret_cast<bf16*>(smem_raw);
    bf16* Ks = Qs + BR * LD;       // 2 stages
    bf16* Vs = Ks + 2 * BC * LD;   // 2 stages

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int qb = gridDim.x - 1 - blockIdx.x;  // heaviest (latest) query blocks first
    const int q0 = qb * BR;
    const int h = blockIdx.y, b = blockIdx.z;
    const int g = h / qpg;
    const bf16* qh = q + (long long)b * T * q_rs + g * q_gs + (h % qpg) * D;
    const bf16* kh = k + (long long)b * T * kv_rs + g * kv_gs;
    const bf16* vh = v + (long long)b * T * kv_rs + g * kv_gs;

    const int* segb = seg ? seg + (long long)b * T : nullptr;
    const int q_last = min(T, q0 + BR) - 1;
    const int lo_last = flash_key_lo(segb, q_last, window);  // the tile's largest first key
    const int kb_lo = flash_key_lo(segb, q0, window) / BC;
    const int kb_hi = q_last / BC + 1;

    load_tile<BR, D>(Qs, qh, q_rs, q0, T);
    cp_async_commit();
    load_tile<BC, D>(Ks, kh, kv_rs, kb_lo * BC, T);
    load_tile<BC, D>(Vs, vh, kv_rs, kb_lo * BC, T);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();

    u32 qf[D / 16][4];
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++)
        ldsm_x4(qf[kk][0], qf[kk][1], qf[kk][2], qf[kk][3], Qs + (warp * 16 + (lane & 15)) * LD + kk * 16 + (lane >> 4) * 8);

    float acc[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; i++) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
    float mrow[2] = {-INF_F, -INF_F}, lrow[2] = {0.f, 0.f};
    const int row_a = q0 + warp * 16 + (lane >> 2);
    const int lo_row[2] = {row_a < T ? flash_key_lo(segb, row_a, window) : 0, row_a + 8 < T ? flash_key_lo(segb, row_a + 8, window) : 0};

    for (int kb = kb_lo; kb < kb_hi; kb++) {
        const int stage = (kb - kb_lo) & 1;
        if (kb + 1 < kb_hi) {
            load_tile<BC, D>(Ks + (stage ^ 1) * BC * LD, kh, kv_rs, (kb + 1) * BC, T);
            load_tile<BC, D>(Vs + (stage ^ 1) * BC * LD, vh, kv_rs, (kb + 1) * BC, T);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const bf16* Kt = Ks + stage * BC * LD;
        const bf16* Vt = Vs + stage * BC * LD;

        float s[BC / 8][4];
#pragma unroll
        for (int i = 0; i < BC / 8; i++) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) mma_abt<BC, LD>(s, qf[kk], Kt, kk * 16, lane);
        float mx[2] = {-INF_F, -INF_F};
        // Blocks wholly inside the mask for every row of the tile skip the per-element test.
        const bool full = kb * BC + BC - 1 <= q0 && kb * BC + BC <= T && kb * BC >= lo_last;
        if (full) {
#pragma unroll
            for (int nt = 0; nt < BC / 8; nt++) {
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    s[nt][e] *= scale_log2;
                    mx[e >> 1] = fmaxf(mx[e >> 1], s[nt][e]);
                }
            }
        } else {
#pragma unroll
            for (int nt = 0; nt < BC / 8; nt++) {
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int i = row_a + (e >> 1) * 8;
                    const int j = kb * BC + nt * 8 + (lane & 3) * 2 + (e & 1);
                    const bool ok = i < T && j <= i && j >= lo_row[e >> 1] && j < T;
                    s[nt][e] = ok ? s[nt][e] * scale_log2 : -INF_F;
                    mx[e >> 1] = fmaxf(mx[e >> 1], s[nt][e]);
                }
            }
        }
        float alpha[2], mu[2], rsum[2] = {0.f, 0.f};
#pragma unroll
        for (int r = 0; r < 2; r++) {
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
            const float mnew = fmaxf(mrow[r], mx[r]);
            mu[r] = mnew == -INF_F ? 0.f : mnew;
            alpha[r] = exp2f(mrow[r] - mu[r]);
            mrow[r] = mnew;
        }
#pragma unroll
        for (int nt = 0; nt < BC / 8; nt++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                s[nt][e] = exp2f(s[nt][e] - mu[e >> 1]);
                rsum[e >> 1] += s[nt][e];
            }
        }
#pragma unroll
        for (int r = 0; r < 2; r++) lrow[r] = lrow[r] * alpha[r] + rsum[r];
#pragma unroll
        for (int dt = 0; dt < D / 8; dt++) {
            acc[dt][0] *= alpha[0];
            acc[dt][1] *= alpha[0];
            acc[dt][2] *= alpha[1];
            acc[dt][3] *= alpha[1];
        }
#pragma unroll
        for (int kk = 0; kk < BC / 16; kk++) {
            u32 a[4];
            acc_to_a(a, s[2 * kk], s[2 * kk + 1]);
            mma_ab<D, LD>(acc, a, Vt, kk * 16, lane);
        }
        __syncthreads();
    }

    flash_store_o<D>(o, lse, &acc[0][0], mrow, lrow, row_a, b, h, T, H, o_rs, lane);
}

extern "C" __global__ void __launch_bounds__(NTHREADS) flash_fwd_d128(const bf16* q, const bf16* k, const bf16* v, bf16* o, float* lse, const int* seg, int T, int H, int qpg,
                                              int q_rs, int q_gs, int kv_rs, int kv_gs, int o_rs, float scale_log2, int window) {
    flash_fwd<128>(q, k, v, o, lse, seg, T, H, qpg, q_rs, q_gs, kv_rs, kv_gs, o_rs, scale_log2, window);
}
extern "C" __global__ void __launch_bounds__(NTHREADS) flash_fwd_d64(const bf16* q, const bf16* k, const bf16* v, bf16* o, float* lse, const int* seg, int T, int H, int qpg,
                                             int q_rs, int q_gs, int kv_rs, int kv_gs, int o_rs, float scale_log2, int window) {
    flash_fwd<64>(q, k, v, o, lse, seg, T, H, qpg, q_rs, q_gs, kv_rs, kv_gs, o_rs, scale_log2, window);
}

// delta[(b*H + h)*T + t] = sum_d dO * O (one warp per (row, head)).
extern "C" __global__ void flash_bwd_delta(const bf16* __restrict__ o, const bf16* __restrict__ dout, float* __restrict__ delta,
                                           int B, int T, int H, int D, int o_rs) {
    const long long wid = (blockIdx.x * (long long)blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (wid >= (long long)B * T * H) return;
    const int h = (int)(wid % H);
    const long long row = wid / H;  // b*T + t
    const bf16* orow = o + row * o_rs + h * D;
    const bf16* drow = dout + row * o_rs + h * D;
    float acc = 0.f;
    for (int c = lane * 2; c < D; c += 64) {
        const float2 a = __bfloat1622float2(*reinterpret_cast<const bf162*>(orow + c));
        const float2 d = __bfloat1622float2(*reinterpret_cast<const bf162*>(drow + c));
        acc += a.x * d.x + a.y * d.y;
    }
    acc = warp_sum(acc);
    if (lane == 0) {
        const long long b = row / T, t = row % T;
        delta[(b * H + h) * T + t] = acc;
    }
}

// dq[row, head h slot] = bf16(dq_acc[(row*H + h)*D + d] * scale). One block per row. With
// cos_t, sin_t (bf16 [>= T][D/2]; null: none) inverse-rotated at position row % T before the
// one rounding (the RoPE backward, rope_bwd_pair).
extern "C" __global__ void flash_bwd_dq(const float* __restrict__ dq_acc, bf16* __restrict__ dq, int rows, int H, int D, int qpg,
                                        int q_rs, int q_gs, float scale, int T, const bf16* __restrict__ cos_t,
                                        const bf16* __restrict__ sin_t) {
    const int r = blockIdx.x;
    if (r >= rows) return;
    const float* src = dq_acc + (long long)r * H * D;
    bf16* dst = dq + (long long)r * q_rs;
    if (cos_t) {
        const int half = D / 2;
        const bf16* ct = cos_t + (long long)(r % T) * half;
        const bf16* st = sin_t + (long long)(r % T) * half;
        for (int i = threadIdx.x * 2; i < H * half; i += blockDim.x * 2) {
            const int h = i / half, p = i - h * half;
            const float2 x = *reinterpret_cast<const float2*>(src + h * D + p);
            const float2 y = *reinterpret_cast<const float2*>(src + h * D + p + half);
            const float2 c = __bfloat1622float2(*reinterpret_cast<const bf162*>(ct + p));
            const float2 sn = __bfloat1622float2(*reinterpret_cast<const bf162*>(st + p));
            float x0 = x.x * scale, x1 = x.y * scale, y0 = y.x * scale, y1 = y.y * scale;
            rope_bwd_pair(x0, y0, c.x, sn.x);
            rope_bwd_pair(x1, y1, c.y, sn.y);
            bf16* o = dst + (h / qpg) * q_gs + (h % qpg) * D + p;
            *reinterpret_cast<bf162*>(o) = __floats2bfloat162_rn(x0, x1);
            *reinterpret_cast<bf162*>(o + half) = __floats2bfloat162_rn(y0, y1);
        }
        return;
    }
    for (int i = threadIdx.x * 2; i < H * D; i += blockDim.x * 2) {
        const int h = i / D, d = i - h * D;
        const float2 v = *reinterpret_cast<const float2*>(src + i);
        *reinterpret_cast<bf162*>(dst + (h / qpg) * q_gs + (h % qpg) * D + d) = __floats2bfloat162_rn(v.x * scale, v.y * scale);
    }
}

#define BBC 128               // keys per backward CTA (16 per warp)
#define BNT 256               // backward threads (8 warps)

// One CTA per (key block, kv group, batch): loops over the group's query heads and the query
// blocks that see this key block. dK, dV accumulate in registers; dQ goes to dq_acc (fp32,
// [rows, H, D], zeroed before) by atomics. dout uses o's layout (o_rs, h*D).
// With rope_cos, rope_sin (bf16 [>= T][D/2]; null: none) dK is stored inverse-rotated.
template <int D>
__device__ __forceinline__ void flash_bwd(const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,
                                          const bf16* __restrict__ dout, const float* __restrict__ lse,
                                          const float* __restrict__ delta, float* __restrict__ dq_acc,
                                          bf16* __restrict__ dk, bf16* __restrict__ dv, const int* __restrict__ seg,
                                          int T, int H, int qpg, int q_rs,
                                          int q_gs, int kv_rs, int kv_gs, int o_rs, float scale, float scale_log2,
                                          int window, const bf16* __restrict__ rope_cos, const bf16* __restrict__ rope_sin) {
    constexpr int LD = D + 8;
    constexpr int LDS = BR + 8;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    bf16* Ks = reinterpret_cast<bf16*>(smem_raw);
    bf16* Vs = Ks + BBC * LD;
    bf16* Qs2 = Vs + BBC * LD;       // 2 stages
    bf16* dOs2 = Qs2 + 2 * BR * LD;  // 2 stages
    bf16* dSs = dOs2 + 2 * BR * LD;  // [BBC][LDS]
    float* lse2 = reinterpret_cast<float*>(dSs + BBC * LDS);  // 2 stages
    float* del2 = lse2 + 2 * BR;                               // 2 stages
    int* lo2 = reinterpret_cast<int*>(del2 + 2 * BR);          // 2 stages: first visible key per query

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int kb = blockIdx.x, g = blockIdx.y, b = blockIdx.z;
    const int k0 = kb * BBC;
    const bf16* kg = k + (long long)b * T * kv_rs + g * kv_gs;
    const bf16* vg = v + (long long)b * T * kv_rs + g * kv_gs;

    load_tile<BBC, D, BNT>(Ks, kg, kv_rs, k0, T);
    load_tile<BBC, D, BNT>(Vs, vg, kv_rs, k0, T);
    cp_async_commit();

    float dk_acc[D / 8][4], dv_acc[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; i++) {
        dk_acc[i][0] = dk_acc[i][1] = dk_acc[i][2] = dk_acc[i][3] = 0.f;
        dv_acc[i][0] = dv_acc[i][1] = dv_acc[i][2] = dv_acc[i][3] = 0.f;
    }
    const int qb_lo = k0 / BR;
    const int* segb = seg ? seg + (long long)b * T : nullptr;
    const int q_hi = flash_query_end(segb, k0 + BBC - 1, window, T);
    const int qb_hi = (q_hi + BR - 1) / BR;
    const int key_a = k0 + warp * 16 + (lane >> 2);  // this thread's keys: key_a, key_a + 8

    // Work items: (query head j of the group, query block qb), flattened; the next item's
    // Q, dO, lse and delta are prefetched into the other stage while this one computes.
    const int nqb = max(qb_hi - qb_lo, 0);
    const int items = qpg * nqb;
    auto issue = [&](int item, int st) {
        const int j = item / nqb, q0 = (qb_lo + item % nqb) * BR;
        const int h = g * qpg + j;
        load_tile<BR, D, BNT>(Qs2 + st * BR * LD, q + (long long)b * T * q_rs + g * q_gs + j * D, q_rs, q0, T);
        load_tile<BR, D, BNT>(dOs2 + st * BR * LD, dout + (long long)b * T * o_rs + h * D, o_rs, q0, T);
        cp_async_commit();
        const float* lse_h = lse + ((long long)b * H + h) * T;
        const float* del_h = delta + ((long long)b * H + h) * T;
        for (int i = threadIdx.x; i < BR; i += BNT) {
            const bool ok = q0 + i < T;
            lse2[st * BR + i] = ok ? lse_h[q0 + i] * 1.44269504088896340736f : INF_F;
            del2[st * BR + i] = ok ? del_h[q0 + i] : 0.f;
            lo2[st * BR + i] = ok ? flash_key_lo(segb, q0 + i, window) : T;
        }
    };
    if (items > 0) issue(0, 0);
    for (int item = 0; item < items; item++) {
        const int st = item & 1;
        if (item + 1 < items) {
            issue(item + 1, st ^ 1);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const int j = item / nqb, q0 = (qb_lo + item % nqb) * BR;
        const int h = g * qpg + j;
        float* dqh = dq_acc + (long long)b * T * H * D + (long long)h * D;
        const bf16* Qs = Qs2 + st * BR * LD;
        const bf16* dOs = dOs2 + st * BR * LD;
        const float* lse_s = lse2 + st * BR;
        const float* del_s = del2 + st * BR;
        const int* lo_s = lo2 + st * BR;
        {
            // S^T = K_w Q^T (16 keys x BR queries)
            float st[BR / 8][4];
#pragma unroll
            for (int i = 0; i < BR / 8; i++) st[i][0] = st[i][1] = st[i][2] = st[i][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < D / 16; kk++) {
                u32 a[4];
                ldsm_x4(a[0], a[1], a[2], a[3], Ks + (warp * 16 + (lane & 15)) * LD + kk * 16 + (lane >> 4) * 8);
                mma_abt<BR, LD>(st, a, Qs, kk * 16, lane);
            }
            // P^T (rows past T have lse = +inf, so they give 0 without a test)
            const int kw = k0 + warp * 16;
            const bool full = kw + 15 <= q0 && kw + 15 < T && kw >= lo_s[min(BR - 1, T - 1 - q0)];
            if (full) {
#pragma unroll
                for (int nt = 0; nt < BR / 8; nt++) {
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        const int ql = nt * 8 + (lane & 3) * 2 + (e & 1);
                        st[nt][e] = exp2f(st[nt][e] * scale_log2 - lse_s[ql]);
                    }
                }
            } else {
#pragma unroll
                for (int nt = 0; nt < BR / 8; nt++) {
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        const int key = key_a + (e >> 1) * 8;
                        const int ql = nt * 8 + (lane & 3) * 2 + (e & 1);
                        const bool ok = key < T && key <= q0 + ql && key >= lo_s[ql];
                        st[nt][e] = ok ? exp2f(st[nt][e] * scale_log2 - lse_s[ql]) : 0.f;
                    }
                }
            }
            // dV += P^T dO
#pragma unroll
            for (int kk = 0; kk < BR / 16; kk++) {
                u32 a[4];
                acc_to_a(a, st[2 * kk], st[2 * kk + 1]);
                mma_ab<D, LD>(dv_acc, a, dOs, kk * 16, lane);
            }
            // dP^T = V_w dO^T
            float dpt[BR / 8][4];
#pragma unroll
            for (int i = 0; i < BR / 8; i++) dpt[i][0] = dpt[i][1] = dpt[i][2] = dpt[i][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < D / 16; kk++) {
                u32 a[4];
                ldsm_x4(a[0], a[1], a[2], a[3], Vs + (warp * 16 + (lane & 15)) * LD + kk * 16 + (lane >> 4) * 8);
                mma_abt<BR, LD>(dpt, a, dOs, kk * 16, lane);
            }
            // dS^T = P^T (dP^T - delta)
#pragma unroll
            for (int nt = 0; nt < BR / 8; nt++) {
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int ql = nt * 8 + (lane & 3) * 2 + (e & 1);
                    st[nt][e] = st[nt][e] * (dpt[nt][e] - del_s[ql]);
                }
            }
            // dK += dS^T Q, and dS^T to shared memory for dQ
#pragma unroll
            for (int kk = 0; kk < BR / 16; kk++) {
                u32 a[4];
                acc_to_a(a, st[2 * kk], st[2 * kk + 1]);
                const int kr = warp * 16 + (lane >> 2);
                const int qc = kk * 16 + (lane & 3) * 2;
                *reinterpret_cast<u32*>(dSs + kr * LDS + qc) = a[0];
                *reinterpret_cast<u32*>(dSs + (kr + 8) * LDS + qc) = a[1];
                *reinterpret_cast<u32*>(dSs + kr * LDS + qc + 8) = a[2];
                *reinterpret_cast<u32*>(dSs + (kr + 8) * LDS + qc + 8) = a[3];
                mma_ab<D, LD>(dk_acc, a, Qs, kk * 16, lane);
            }
            __syncthreads();
            // dQ (BR queries x D) += dS K over the BBC keys of this block. Warp w: queries
            // 16*(w&3).., columns (w>>2)*D/2 .. +D/2.
            {
                const int mq = (warp & 3) * 16, c0base = (warp >> 2) * (D / 2);
                u32 af[BBC / 16][4];
#pragma unroll
                for (int kk = 0; kk < BBC / 16; kk++)
                    ldsm_x4_t(af[kk][0], af[kk][1], af[kk][2], af[kk][3],
                              dSs + (kk * 16 + (lane & 7) + ((lane >> 4) << 3)) * LDS + mq + ((lane >> 3) & 1) * 8);
                const int qa = q0 + mq + (lane >> 2);
#pragma unroll
                for (int dp = 0; dp < D / 32; dp++) {
                    float c0[4] = {0.f, 0.f, 0.f, 0.f}, c1[4] = {0.f, 0.f, 0.f, 0.f};
                    const int cb = c0base + dp * 16;
#pragma unroll
                    for (int kk = 0; kk < BBC / 16; kk++) {
                        u32 b0, b1, b2, b3;
                        ldsm_x4_t(b0, b1, b2, b3, Ks + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + cb + (lane >> 4) * 8);
                        mma16816(c0, af[kk], b0, b1);
                        mma16816(c1, af[kk], b2, b3);
                    }
                    const int col = cb + (lane & 3) * 2;
                    if (qa < T) {
                        float* p = dqh + (long long)qa * H * D + col;
                        atomicAdd(p, c0[0]);
                        atomicAdd(p + 1, c0[1]);
                        atomicAdd(p + 8, c1[0]);
                        atomicAdd(p + 9, c1[1]);
                    }
                    if (qa + 8 < T) {
                        float* p = dqh + (long long)(qa + 8) * H * D + col;
                        atomicAdd(p, c0[2]);
                        atomicAdd(p + 1, c0[3]);
                        atomicAdd(p + 8, c1[2]);
                        atomicAdd(p + 9, c1[3]);
                    }
                }
            }
            __syncthreads();
        }
    }
    flash_store_dkdv<D>(dk + (long long)b * T * kv_rs + g * kv_gs, dv + (long long)b * T * kv_rs + g * kv_gs, kv_rs,
                        &dk_acc[0][0], &dv_acc[0][0], scale, key_a, T, lane, rope_cos, rope_sin);
}

extern "C" __global__ void __launch_bounds__(BNT) flash_bwd_d128(const bf16* q, const bf16* k, const bf16* v, const bf16* dout, const float* lse,
                                              const float* delta, float* dq_acc, bf16* dk, bf16* dv, const int* seg, int T, int H, int qpg,
                                              int q_rs, int q_gs, int kv_rs, int kv_gs, int o_rs, float scale, float scale_log2,
                                              int window, const bf16* rope_cos, const bf16* rope_sin) {
    flash_bwd<128>(q, k, v, dout, lse, delta, dq_acc, dk, dv, seg, T, H, qpg, q_rs, q_gs, kv_rs, kv_gs, o_rs, scale, scale_log2, window,
                   rope_cos, rope_sin);
}
extern "C" __global__ void __launch_bounds__(BNT) flash_bwd_d64(const bf16* q, const bf16* k, const bf16* v, const bf16* dout, const float* lse,
                                             const float* delta, float* dq_acc, bf16* dk, bf16* dv, const int* seg, int T, int H, int qpg,
                                             int q_rs, int q_gs, int kv_rs, int kv_gs, int o_rs, float scale, float scale_log2,
                                             int window, const bf16* rope_cos, const bf16* rope_sin) {
    flash_bwd<64>(q, k, v, dout, lse, delta, dq_acc, dk, dv, seg, T, H, qpg, q_rs, q_gs, kv_rs, kv_gs, o_rs, scale, scale_log2, window,
                   rope_cos, rope_sin);
}
