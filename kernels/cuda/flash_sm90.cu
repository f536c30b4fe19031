// Flash attention forward for Hopper (sm_90a): warpgroup MMA (wgmma) with both operands of
// S = Q K^T in shared memory and P (registers) x V (shared memory) for O. Same function and
// layouts as flash.cu's flash_fwd_d64/_d128 (causal, sliding window, GQA strides, lse in
// natural log), plus varlen: seg[b*T + t] (or null) is where t's document starts, and query
// t sees key j iff max(seg[t], t - window + 1) <= j <= t.
//
// CTA: 2 warpgroups x 64 query rows = 128 rows; keys in tiles of 128, K and V double-buffered
// by cp.async. Tiles live in shared memory as [D/64][rows][64] bf16 with the 128-byte swizzle
// (16-byte chunk c of row r stored at chunk c ^ (r & 7)), which is both the K-major layout
// wgmma reads for Q and K and the MN-major layout it reads for V (transposed B).
// Built only for sm_90a: elsewhere the kernels trap (Ops never launches them there).

// Forward. Per key tile n the warpgroup issues S_n = Q K_n^T and O += P_{n-1} V_{n-1};
// OVERLAP: together, waiting for S_n only, so the softmax of tile n runs while P_{n-1} V_{n-1}
// is still on the tensor cores; else P V is issued after the softmax (no overlap). Then it
// waits and rescales O. K loads one tile ahead of S, V one tile ahead of P V: cp.async group
// n+1 = {V_n, K_{n+1}} is issued at the start of tile n, right after the wgmma, into the
// buffers tile n-1 used. CTAs run heaviest (latest query block) first over the whole grid.
template <int D, bool OVERLAP>
__device__ __forceinline__ void flash_fwd_sm90(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                               const bf16* __restrict__ v, bf16* __restrict__ o,
                                               float* __restrict__ lse, const int* __restrict__ seg, int T, int H,
                                               int qpg, int q_rs, int q_gs, int kv_rs, int kv_gs, int o_rs,
                                               float scale_log2, int window) {
#ifdef F9_ENABLED
    constexpr u32 TILE_Q = F9_BR * D * 2;  // bytes
    constexpr u32 TILE_K = F9_BC * D * 2;
    extern __shared__ __align__(1024) unsigned char smem_raw[];
    const u32 base = (f9_smem(smem_raw) + 1023u) & ~1023u;
    const u32 Qs = base, Ks = base + TILE_Q, Vs = Ks + 2 * TILE_K;

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, wg = warp >> 2, wl = warp & 3;
    const int nhb = gridDim.y * gridDim.z;
    const int lin = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    const int qb = gridDim.x - 1 - lin / nhb;  // heaviest (latest) query blocks first
    const int h = (lin % nhb) % gridDim.y, b = (lin % nhb) / gridDim.y;
    const int q0 = qb * F9_BR;
    const int g = h / qpg;
    const bf16* qh = q + (long long)b * T * q_rs + g * q_gs + (h % qpg) * D;
    const bf16* kh = k + (long long)b * T * kv_rs + g * kv_gs;
    const bf16* vh = v + (long long)b * T * kv_rs + g * kv_gs;
    const int* segb = seg ? seg + (long long)b * T : nullptr;

    const int q_last = min(q0 + F9_BR, T) - 1;
    const int lo_first = f9_key_lo(segb, q0, window);     // key_lo is nondecreasing in the row
    const int lo_last = f9_key_lo(segb, q_last, window);
    const int kb_lo = lo_first / F9_BC;
    const int kb_hi = q_last / F9_BC + 1;
    const int ntiles = kb_hi - kb_lo;

    // This thread's two query rows and their first visible keys.
    const int row_a = q0 + wg * 64 + wl * 16 + (lane >> 2);
    const int row_b = row_a + 8;
    const int lo_row[2] = {row_a < T ? f9_key_lo(segb, row_a, window) : 0,
                           row_b < T ? f9_key_lo(segb, row_b, window) : 0};

    f9_load_tile<F9_BR, D>(Qs, qh, q_rs, q0, T);
    f9_load_tile<F9_BC, D>(Ks, kh, kv_rs, kb_lo * F9_BC, T);
    f9_commit();

    const u64 dQw = f9_desc(Qs + wg * (64 * 128), 16, 1024);  // this warpgroup's 64 query rows
    float acc[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; i++) acc[i] = 0.f;
    float mrow[2] = {-INF_F, -INF_F}, lrow[2] = {0.f, 0.f};
    u32 p[F9_BC / 16][4];  // P of the previous tile (A operand of O += P V)
#pragma unroll
    for (int kk = 0; kk < F9_BC / 16; kk++) p[kk][0] = p[kk][1] = p[kk][2] = p[kk][3] = 0u;

    for (int n = 0; n <= ntiles; n++) {
        const int kb = kb_lo + n;
        f9_wait<0>();
        f9_proxy_fence();
        __syncthreads();  // group n landed (K_n, V_{n-1}); every thread is done with tile n-1
        // Group n+1 (issued once this tile's wgmma are on their way; other buffers).
        auto load_next = [&]() {
            f9_load_tile<F9_BC, D>(Vs + (n & 1) * TILE_K, vh, kv_rs, kb * F9_BC, T);
            if (n + 1 < ntiles) f9_load_tile<F9_BC, D>(Ks + ((n + 1) & 1) * TILE_K, kh, kv_rs, (kb + 1) * F9_BC, T);
            f9_commit();
        };
        const u32 Kt = Ks + (n & 1) * TILE_K, Vp = Vs + ((n + 1) & 1) * TILE_K;
        const u64 dVp = f9_desc(Vp, F9_BC * 128, 1024), dKt = f9_desc(Kt, 16, 1024);

        if (n == ntiles) {  // last P V
            wg_fence_regs<D / 2>(acc);
            wg_fence();
#pragma unroll
            for (int kk = 0; kk < F9_BC / 16; kk++)
                f9_wg_pv<D>(acc, p[kk], f9_dadd(dVp, kk * (16 * 128)));
            wg_commit();
            wg_wait<0>();
            wg_fence_regs<D / 2>(acc);
            break;
        }

        // S = Q K_n^T (64 rows of this warpgroup x 128 keys), then O += P_{n-1} V_{n-1}
        float s[F9_BC / 2];
        wg_fence_regs<F9_BC / 2>(s);
        wg_fence_regs<D / 2>(acc);
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) {
            wg_ss_n128_t00(s, f9_dadd(dQw, (kk >> 2) * (F9_BR * 128) + (kk & 3) * 32),
                           f9_dadd(dKt, (kk >> 2) * (F9_BC * 128) + (kk & 3) * 32), kk > 0 ? 1 : 0);
        }
        wg_commit();
        if (OVERLAP && n > 0) {
#pragma unroll
            for (int kk = 0; kk < F9_BC / 16; kk++)
                f9_wg_pv<D>(acc, p[kk], f9_dadd(dVp, kk * (16 * 128)));
            wg_commit();
            load_next();
            wg_wait<1>();
        } else {
            load_next();
            wg_wait<0>();
        }
        wg_fence_regs<F9_BC / 2>(s);

        const int j0 = kb * F9_BC;
        float mx[2] = {-INF_F, -INF_F}, alpha[2];
        // Row max over the warp's quad, rescale factor, P = 2^(S scale - max), row sums. S is
        // unscaled until here (scale > 0, so the max commutes with it); mrow is scaled.
        auto finish = [&]() {
            float mu[2], rsum[2] = {0.f, 0.f};
#pragma unroll
            for (int r = 0; r < 2; r++) {
                mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
                mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
                const float mnew = fmaxf(mrow[r], mx[r] * scale_log2);
                mu[r] = mnew == -INF_F ? 0.f : mnew;
                alpha[r] = f9_ex2(mrow[r] - mu[r]);
                mrow[r] = mnew;
            }
#pragma unroll
            for (int i = 0; i < F9_BC / 2; i++) {
                s[i] = f9_ex2(fmaf(s[i], scale_log2, -mu[(i >> 1) & 1]));
                rsum[(i >> 1) & 1] += s[i];
            }
#pragma unroll
            for (int r = 0; r < 2; r++) lrow[r] = lrow[r] * alpha[r] + rsum[r];
            wg_fence_regs<F9_BC / 2>(s);
        };
        // Tiles wholly visible to every row of the CTA skip the per-element test. The whole
        // softmax sits inside each branch: ptxas hoists the wait below to the top of its basic
        // block, and the block must start after the softmax for it to overlap P V.
        const bool full = j0 + F9_BC - 1 <= q0 && j0 + F9_BC <= T && j0 >= lo_last;
        if (full) {
#pragma unroll
            for (int i = 0; i < F9_BC / 2; i++) mx[(i >> 1) & 1] = fmaxf(mx[(i >> 1) & 1], s[i]);
            finish();
        } else {
#pragma unroll
            for (int i = 0; i < F9_BC / 2; i++) {
                const int r = (i >> 1) & 1;
                const int row = r ? row_b : row_a;
                const int j = j0 + (i >> 2) * 8 + (lane & 3) * 2 + (i & 1);
                const bool ok = row < T && j <= row && j >= lo_row[r] && j < T;
                s[i] = ok ? s[i] : -INF_F;
                mx[r] = fmaxf(mx[r], s[i]);
            }
            finish();
        }
        if (!OVERLAP && n > 0) {
            wg_fence();
#pragma unroll
            for (int kk = 0; kk < F9_BC / 16; kk++)
                f9_wg_pv<D>(acc, p[kk], f9_dadd(dVp, kk * (16 * 128)));
            wg_commit();
        }
        wg_wait<0>();  // O += P_{n-1} V_{n-1} done: O and P are free
        wg_fence_regs<D / 2>(acc);
#pragma unroll
        for (int kk = 0; kk < F9_BC / 16; kk++)
            asm volatile("" : "+r"(p[kk][0]), "+r"(p[kk][1]), "+r"(p[kk][2]), "+r"(p[kk][3])::"memory");
#pragma unroll
        for (int i = 0; i < D / 2; i++) acc[i] *= alpha[(i >> 1) & 1];
        // P as the A operand: the accumulator layout of two adjacent n8 blocks is the
        // m64k16 A-fragment layout.
#pragma unroll
        for (int kk = 0; kk < F9_BC / 16; kk++) {
            p[kk][0] = f9_pack(s[8 * kk + 0], s[8 * kk + 1]);
            p[kk][1] = f9_pack(s[8 * kk + 2], s[8 * kk + 3]);
            p[kk][2] = f9_pack(s[8 * kk + 4], s[8 * kk + 5]);
            p[kk][3] = f9_pack(s[8 * kk + 6], s[8 * kk + 7]);
        }
    }

#pragma unroll
    for (int r = 0; r < 2; r++) {
        lrow[r] += __shfl_xor_sync(0xffffffffu, lrow[r], 1);
        lrow[r] += __shfl_xor_sync(0xffffffffu, lrow[r], 2);
    }
#pragma unroll
    for (int r = 0; r < 2; r++) {
        const int i = r ? row_b : row_a;
        if (i >= T) continue;
        const float inv = lrow[r] > 0.f ? 1.f / lrow[r] : 0.f;
        bf16* orow = o + ((long long)b * T + i) * o_rs + h * D;
#pragma unroll
        for (int dt = 0; dt < D / 8; dt++) {
            *reinterpret_cast<u32*>(orow + dt * 8 + (lane & 3) * 2) =
                f9_pack(acc[dt * 4 + 2 * r] * inv, acc[dt * 4 + 2 * r + 1] * inv);
        }
        if ((lane & 3) == 0) lse[((long long)b * H + h) * T + i] = (mrow[r] + log2f(lrow[r])) * 0.69314718055994530942f;
    }
#else
    asm volatile("trap;");
#endif
}

#define F9_FWD_KERNEL(NAME, D, OVERLAP)                                                                          \
    extern "C" __global__ void __launch_bounds__(F9_THREADS, 1)                                                  \
        NAME(const bf16* q, const bf16* k, const bf16* v, bf16* o, float* lse, const int* seg, int T, int H, int qpg, \
             int q_rs, int q_gs, int kv_rs, int kv_gs, int o_rs, float scale_log2, int window) {                  \
        flash_fwd_sm90<D, OVERLAP>(q, k, v, o, lse, seg, T, H, qpg, q_rs, q_gs, kv_rs, kv_gs, o_rs, scale_log2,  \
                                   window);                                                                      \
    }
// The overlapped forward measured 3.8 % slower at d16 (13.75 vs 13.24 ms, same call), so the
// plain one is what variant sm90 runs (ARCHSCALE_FLASH_FWD=overlap picks the other). The
// default forward on Hopper is flash_sm90_ws.cu's (variant sm90ws).
F9_FWD_KERNEL(flash_fwd_sm90_d128, 128, false)
F9_FWD_KERNEL(flash_fwd_sm90_d64, 64, false)
F9_FWD_KERNEL(flash_fwd_sm90_overlap_d128, 128, true)
F9_FWD_KERNEL(flash_fwd_sm90_overlap_d64, 64, true)

// ---------------------------------------------------------------------------------------------
// Backward (FA2 structure on wgmma): one CTA per (128-key block, kv group, batch); warpgroup w
// owns keys 64w..64w+63 of the block, dK and dV accumulate in its registers over the group's
// query heads and the 64-query blocks that see the block. Per 64-query block (work item):
//   S^T = K Q^T and dP^T = V dO^T (both operands from shared memory),
//   P^T = exp(S^T scale - lse), dS^T = P^T (dP^T - delta),
//   dV += P^T dO and dK += dS^T Q (A from registers, B = dO / Q read N-major),
//   dQ += dS K (A = dS^T from shared memory read M-major, B = K read N-major): d128 splits the
//   128 columns over the two warpgroups, d64 the 128 keys (two partial sums). Each warpgroup
//   parks its 64 x 64 fp32 part in shared memory and adds it to its block of dq_acc (zeroed
//   before; layout at flash_bwd_dq_sm90) with one 16 KiB asynchronous bulk reduce
//   (cp.reduce.async.bulk), which no thread waits for until the buffer comes round again.
// Q, dO, lse, delta (and seg) of the next item load by cp.async (issued right after this
// item's first wgmma) while the current computes; two CTA barriers per item (dS^T written /
// next item landed). dS^T and the dQ staging are double-buffered, so dQ's wgmma of an item
// keeps running across the second barrier; its result is stored at the top of the next item.
// CTAs run heaviest first over the whole grid: the block index is linearised with the key
// block slowest, so every (group, batch)'s first key blocks (most queries under the causal
// mask) start in the first wave.

template <int D>
__device__ __forceinline__ void flash_bwd_sm90(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                               const bf16* __restrict__ v, const bf16* __restrict__ dout,
                                               const float* __restrict__ lse, const float* __restrict__ delta,
                                               float* __restrict__ dq_acc, bf16* __restrict__ dk, bf16* __restrict__ dv,
                                               const int* __restrict__ seg, int T, int H, int qpg, int q_rs, int q_gs,
                                               int kv_rs, int kv_gs, int o_rs, float scale, float scale_log2,
                                               int window) {
#ifdef F9_ENABLED
    constexpr u32 TILE_KV = F9B_BC * D * 2;        // K or V: [D/64][128 keys][64]
    constexpr u32 TILE_Q = F9B_BR * D * 2;         // Q or dO: [D/64][64 queries][64]
    constexpr u32 TILE_DS = F9B_BC * F9B_BR * 2;   // dS^T: [128 keys][64 queries]
    constexpr u32 TILE_DQ = F9B_BR * 64 * 4;       // one warpgroup's fp32 dQ part (64 x 64)
    extern __shared__ __align__(1024) unsigned char smem_raw[];
    const u32 raw = f9_smem(smem_raw);
    const u32 base = (raw + 1023u) & ~1023u;
    const u32 Ks = base, Vs = Ks + TILE_KV, Qs2 = Vs + TILE_KV, dOs2 = Qs2 + 2 * TILE_Q, dSs = dOs2 + 2 * TILE_Q;
    const u32 dQs = dSs + 2 * TILE_DS;             // [2 buffers][2 warpgroups] TILE_DQ
    const u32 Ls = dQs + 4 * TILE_DQ;              // lse, delta, seg: [2 stages][64] each
    const u32 Ds = Ls + 2 * F9B_BR * 4, Gs = Ds + 2 * F9B_BR * 4;
    const float* lse2 = reinterpret_cast<const float*>(smem_raw + (Ls - raw));
    const float* del2 = reinterpret_cast<const float*>(smem_raw + (Ds - raw));
    const int* seg2 = reinterpret_cast<const int*>(smem_raw + (Gs - raw));

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, wg = warp >> 2, wl = warp & 3;
    const int tw = threadIdx.x & 127;  // thread within the warpgroup
    const int ngb = gridDim.y * gridDim.z;
    const int lin = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    const int kb = lin / ngb, g = (lin % ngb) % gridDim.y, b = (lin % ngb) / gridDim.y;
    const int k0 = kb * F9B_BC;
    const bf16* kg = k + (long long)b * T * kv_rs + g * kv_gs;
    const bf16* vg = v + (long long)b * T * kv_rs + g * kv_gs;
    const int* segb = seg ? seg + (long long)b * T : nullptr;

    f9_load_tile<F9B_BC, D>(Ks, kg, kv_rs, k0, T);
    f9_load_tile<F9B_BC, D>(Vs, vg, kv_rs, k0, T);
    f9_commit();

    float dk_acc[D / 2], dv_acc[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; i++) dk_acc[i] = dv_acc[i] = 0.f;

    const int qb_lo = k0 / F9B_BR;
    int q_hi = window > 0 ? min(T, k0 + F9B_BC - 1 + window) : T;
    if (segb) {
        // Queries past the first whose document starts after this block's last key see none of it.
        const int k_last = k0 + F9B_BC - 1;
        int lo = min(k_last + 1, q_hi), hi = q_hi;
        while (lo < hi) {
            const int mid = (lo + hi) >> 1;
            if (segb[mid] > k_last) hi = mid; else lo = mid + 1;
        }
        q_hi = lo;
    }
    const int nqb = max((q_hi + F9B_BR - 1) / F9B_BR - qb_lo, 0);
    const int items = qpg * nqb;
    // K and V descriptors: this warpgroup's 64 rows (K-major, for S^T and dP^T); all of K read
    // N-major for dQ (d128: this warpgroup's 64 columns).
    const u64 dKw = f9_desc(Ks + wg * (64 * 128), 16, 1024), dVw = f9_desc(Vs + wg * (64 * 128), 16, 1024);
    const u64 dKn = f9_desc(Ks + (D == 128 ? wg * (F9B_BC * 128) : 0), F9B_BC * 128, 1024);
    const int kw = k0 + wg * 64 + wl * 16;  // this warp's 16 keys
    const int key_a = kw + (lane >> 2);     // this thread's keys: key_a, key_a + 8

    auto issue = [&](int item, int st) {
        const int j = item / nqb, q0 = (qb_lo + item % nqb) * F9B_BR;
        const int h = g * qpg + j;
        f9_load_tile<F9B_BR, D>(Qs2 + st * TILE_Q, q + (long long)b * T * q_rs + g * q_gs + j * D, q_rs, q0, T);
        f9_load_tile<F9B_BR, D>(dOs2 + st * TILE_Q, dout + (long long)b * T * o_rs + h * D, o_rs, q0, T);
        const int t = threadIdx.x, i = t & 63, row = q0 + i;
        const bool ok = row < T;
        const long long bh = ((long long)b * H + h) * T;
        const u32 off = (st * F9B_BR + i) * 4;
        if (t < 64) f9_cp4(Ls + off, ok ? lse + bh + row : lse, ok);
        else if (t < 128) f9_cp4(Ds + off, ok ? delta + bh + row : delta, ok);
        else if (t < 192) f9_cp4(Gs + off, ok && segb ? (const void*)(segb + row) : (const void*)lse, ok && segb);  // zeros without varlen
        f9_commit();
    };
    // dQ of item `it` (its wgmma complete): for a whole query block, to shared memory in
    // fragment order and one 16 KiB bulk reduce into its block of dq_acc; for the last,
    // partial block, vector atomics into row-major rows (layout at flash_bwd_dq_sm90).
    float dq[32];  // dQ of an item, still on the tensor cores across the loop's back edge
    auto store_dq = [&](int it) {
        const int jj = it / nqb, qq0 = (qb_lo + it % nqb) * F9B_BR, hh = g * qpg + jj;
        float* dqb = dq_acc + (((long long)b * H + hh) * T + qq0) * D;
        if (qq0 + F9B_BR <= T) {
            const u32 dqt = dQs + ((it & 1) * 2 + wg) * TILE_DQ;
#pragma unroll
            for (int nt = 0; nt < 8; nt++)
                f9_st_shared4(dqt + (nt * 128 + tw) * 16, dq[4 * nt], dq[4 * nt + 1], dq[4 * nt + 2], dq[4 * nt + 3]);
            f9_proxy_fence();
            f9_bar(1 + wg, 128);
#ifndef F9_NO_DQ_ATOMICS  // timing experiments only (ARCHSCALE_KERNEL_DEFINES): dQ left unwritten
            if (tw == 0) f9_bulk_red_add(dqb + (D == 128 ? wg * 4096 : 0), dqt, TILE_DQ);
#endif
        } else {
#pragma unroll
            for (int r = 0; r < 2; r++) {
                const int ql = wl * 16 + (lane >> 2) + r * 8;
                if (qq0 + ql >= T) continue;
                float* p = dqb + ql * D + (D == 128 ? wg * 64 : 0) + (lane & 3) * 2;
#pragma unroll
                for (int nt = 0; nt < 8; nt++)
                    atomicAdd(reinterpret_cast<float2*>(p + nt * 8), make_float2(dq[nt * 4 + 2 * r], dq[nt * 4 + 2 * r + 1]));
            }
        }
        f9_bulk_commit();
    };

    if (items > 0) issue(0, 0);
    f9_wait<0>();
    f9_proxy_fence();
    __syncthreads();  // K, V and item 0 landed
    for (int item = 0; item < items; item++) {
        const int st = item & 1;
        const int q0 = (qb_lo + item % nqb) * F9B_BR;
        const u32 Qt = Qs2 + st * TILE_Q, dOt = dOs2 + st * TILE_Q, dSt = dSs + st * TILE_DS;
        const float* lse_s = lse2 + st * F9B_BR;
        const float* del_s = del2 + st * F9B_BR;
        const int* seg_s = seg2 + st * F9B_BR;  // zeros without varlen

        // dQ of item - 1 ran on while the last barrier was crossed. (Reading it after issuing
        // this item's wgmma, with a wait<2>, makes ptxas serialise every wgmma: C7514.)
        wg_wait<0>();
        wg_fence_regs<32>(dq);
        if (item > 0) store_dq(item - 1);
        // S^T = K Q^T, dP^T = V dO^T (64 keys of this warpgroup x 64 queries). The first k-step
        // overwrites (scale_d = 0), so these start undefined.
        float s[32], dp[32];
        wg_fence_regs<32>(s);
        wg_fence_regs<32>(dp);
        wg_fence();
        const u64 dQt = f9_desc(Qt, 16, 1024), ddOt = f9_desc(dOt, 16, 1024);
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) {
            wg_ss_n64_t00(s, f9_dadd(dKw, (kk >> 2) * (F9B_BC * 128) + (kk & 3) * 32),
                          f9_dadd(dQt, (kk >> 2) * (F9B_BR * 128) + (kk & 3) * 32), kk > 0 ? 1 : 0);
        }
        wg_commit();
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) {
            wg_ss_n64_t00(dp, f9_dadd(dVw, (kk >> 2) * (F9B_BC * 128) + (kk & 3) * 32),
                          f9_dadd(ddOt, (kk >> 2) * (F9B_BR * 128) + (kk & 3) * 32), kk > 0 ? 1 : 0);
        }
        wg_commit();
        // Stage st ^ 1 was last read by item - 1, which every thread finished before the
        // barrier that ended it.
        if (item + 1 < items) issue(item + 1, st ^ 1);

        wg_wait<1>();  // S^T is done; dP^T may still run while P^T is computed
        wg_fence_regs<32>(s);

        // P^T. Tiles where every (key, query) pair is visible skip the test: the last query's
        // first visible key is the largest (seg and the window start are nondecreasing).
        // seg_s is zero without varlen; key >= qrow - wmax is the window.
        const int wmax = window > 0 ? window - 1 : T;
        const int ql_last = min(F9B_BR - 1, T - 1 - q0);
        const int lo_last = max(seg_s[ql_last], q0 + ql_last - wmax);
        const bool full = kw + 15 <= q0 && q0 + F9B_BR <= T && kw >= lo_last;
        if (full) {
#pragma unroll
            for (int i = 0; i < 32; i++) {
                const int ql = (i >> 2) * 8 + (lane & 3) * 2 + (i & 1);
                s[i] = f9_ex2(fmaf(s[i], scale_log2, -lse_s[ql] * 1.44269504088896340736f));
            }
        } else {
#pragma unroll
            for (int i = 0; i < 32; i++) {
                const int ql = (i >> 2) * 8 + (lane & 3) * 2 + (i & 1);
                const int key = key_a + ((i >> 1) & 1) * 8;
                const int qrow = q0 + ql;
                const bool ok = qrow < T && key < T && key <= qrow && key >= seg_s[ql] && key >= qrow - wmax;
                const float e = f9_ex2(fmaf(s[i], scale_log2, -lse_s[ql] * 1.44269504088896340736f));
                s[i] = ok ? e : 0.f;
            }
        }
        wg_wait<0>();
        wg_fence_regs<32>(dp);
        // dS^T = P^T (dP^T - delta)
#pragma unroll
        for (int i = 0; i < 32; i++) {
            const int ql = (i >> 2) * 8 + (lane & 3) * 2 + (i & 1);
            dp[i] = s[i] * (dp[i] - del_s[ql]);
        }
        u32 pf[4][4], dsf[4][4];
#pragma unroll
        for (int kk = 0; kk < 4; kk++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                pf[kk][e] = f9_pack(s[8 * kk + 2 * e], s[8 * kk + 2 * e + 1]);
                dsf[kk][e] = f9_pack(dp[8 * kk + 2 * e], dp[8 * kk + 2 * e + 1]);
            }
        }
        // dS^T to shared memory (swizzled [128 keys][64 queries]) for dQ
#pragma unroll
        for (int kk = 0; kk < 4; kk++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int kl = wg * 64 + wl * 16 + (lane >> 2) + (e & 1) * 8;
                const int nt = 2 * kk + (e >> 1);
                f9_st_shared(dSt + kl * 128 + ((nt ^ (kl & 7)) << 4) + (lane & 3) * 4, dsf[kk][e]);
            }
        }
        // dV += P^T dO, dK += dS^T Q
        const u64 ddOtN = f9_desc(dOt, F9B_BR * 128, 1024), dQtN = f9_desc(Qt, F9B_BR * 128, 1024);
        wg_fence_regs<D / 2>(dv_acc);
        wg_fence_regs<D / 2>(dk_acc);
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < 4; kk++)
            f9_wg_pv<D>(dv_acc, pf[kk], f9_dadd(ddOtN, kk * (16 * 128)));
#pragma unroll
        for (int kk = 0; kk < 4; kk++)
            f9_wg_pv<D>(dk_acc, dsf[kk], f9_dadd(dQtN, kk * (16 * 128)));
        wg_commit();
        f9_proxy_fence();
        __syncthreads();  // dS^T of both warpgroups written (dQ of item - 1 may still read the other buffer)

        // dQ = dS K for the 64 queries
        const u64 dSd = f9_desc(dSt, TILE_DS, 1024);
        wg_fence_regs<32>(dq);
        wg_fence();
        if constexpr (D == 128) {
#pragma unroll
            for (int kk = 0; kk < F9B_BC / 16; kk++)
                wg_ss_n64_t11(dq, f9_dadd(dSd, kk * (16 * 128)), f9_dadd(dKn, kk * (16 * 128)), kk > 0 ? 1 : 0);
        } else {
#pragma unroll
            for (int kk = 0; kk < 4; kk++) {
                const u32 off = wg * (64 * 128) + kk * (16 * 128);
                wg_ss_n64_t11(dq, f9_dadd(dSd, off), f9_dadd(dKn, off), kk > 0 ? 1 : 0);
            }
        }
        wg_commit();
        wg_wait<1>();  // dV, dK done (their registers and stage st are free); dQ runs on
        wg_fence_regs<D / 2>(dv_acc);
        wg_fence_regs<D / 2>(dk_acc);
#pragma unroll
        for (int kk = 0; kk < 4; kk++)
            asm volatile("" : "+r"(pf[kk][0]), "+r"(pf[kk][1]), "+r"(pf[kk][2]), "+r"(pf[kk][3]),
                         "+r"(dsf[kk][0]), "+r"(dsf[kk][1]), "+r"(dsf[kk][2]), "+r"(dsf[kk][3])::"memory");
        f9_wait<0>();
        f9_proxy_fence();
        // The dQ buffer that item + 1 fills (item - 1's) was last read by the bulk reduce of
        // item - 3; its issuer waits for that before the barrier.
        if (tw == 0) f9_bulk_wait_read<1>();
        __syncthreads();  // item + 1 landed; both warpgroups are done with stage st
    }
    wg_wait<0>();  // on every path: ptxas serialises all wgmma if one path may skip it
    wg_fence_regs<32>(dq);
    if (items > 0) store_dq(items - 1);
    f9_wait<0>();  // K and V when there was no item
    if (tw == 0) f9_bulk_wait_all();
    // write dK (scaled) and dV for this thread's two keys
    bf16* dkg = dk + (long long)b * T * kv_rs + g * kv_gs;
    bf16* dvg = dv + (long long)b * T * kv_rs + g * kv_gs;
#pragma unroll
    for (int r = 0; r < 2; r++) {
        const int key = key_a + r * 8;
        if (key >= T) continue;
#pragma unroll
        for (int dt = 0; dt < D / 8; dt++) {
            const int col = dt * 8 + (lane & 3) * 2;
            *reinterpret_cast<u32*>(dkg + (long long)key * kv_rs + col) =
                f9_pack(dk_acc[dt * 4 + 2 * r] * scale, dk_acc[dt * 4 + 2 * r + 1] * scale);
            *reinterpret_cast<u32*>(dvg + (long long)key * kv_rs + col) = f9_pack(dv_acc[dt * 4 + 2 * r], dv_acc[dt * 4 + 2 * r + 1]);
        }
    }
#else
    asm volatile("trap;");
#endif
}

extern "C" __global__ void __launch_bounds__(F9_THREADS, 1)
    flash_bwd_sm90_d128(const bf16* q, const bf16* k, const bf16* v, const bf16* dout, const float* lse, const float* delta,
                        float* dq_acc, bf16* dk, bf16* dv, const int* seg, int T, int H, int qpg, int q_rs, int q_gs,
                        int kv_rs, int kv_gs, int o_rs, float scale, float scale_log2, int window) {
    flash_bwd_sm90<128>(q, k, v, dout, lse, delta, dq_acc, dk, dv, seg, T, H, qpg, q_rs, q_gs, kv_rs, kv_gs, o_rs, scale,
                        scale_log2, window);
}
extern "C" __global__ void __launch_bounds__(F9_THREADS, 1)
    flash_bwd_sm90_d64(const bf16* q, const bf16* k, const bf16* v, const bf16* dout, const float* lse, const float* delta,
                       float* dq_acc, bf16* dk, bf16* dv, const int* seg, int T, int H, int qpg, int q_rs, int q_gs,
                       int kv_rs, int kv_gs, int o_rs, float scale, float scale_log2, int window) {
    flash_bwd_sm90<64>(q, k, v, dout, lse, delta, dq_acc, dk, dv, seg, T, H, qpg, q_rs, q_gs, kv_rs, kv_gs, o_rs, scale,
                       scale_log2, window);
}

// dQ = scale * dq_acc in q's layout. dq_acc holds, per (batch, head), T x D floats: each whole
// 64-query block q0 .. q0+63 is D/64 parts of 64 x 64 (part c = columns 64c .. 64c+63) in the
// backward's fragment order: float4 i = nt * 128 + t holds, for t = 32 w + l, rows
// 16 w + (l >> 2) (.x, .y) and that + 8 (.z, .w), columns 8 nt + 2 (l & 3) + {0, 1}. The last,
// partial block is row-major [rows][D]. Grid (blocks x D/64, H, B); 256 threads.
extern "C" __global__ void flash_bwd_dq_sm90(const float* __restrict__ dq_acc, bf16* __restrict__ dq, int T, int H, int D,
                                             int qpg, int q_rs, int q_gs, float scale) {
    const int parts = D / 64;
    const int qb = blockIdx.x / parts, c = blockIdx.x % parts, h = blockIdx.y, b = blockIdx.z;
    const int q0 = qb * 64;
    const float* src = dq_acc + (((long long)b * H + h) * T + q0) * D;
    bf16* dst = dq + ((long long)b * T + q0) * q_rs + (h / qpg) * q_gs + (h % qpg) * D + c * 64;
    if (q0 + 64 <= T) {
        const float4* s4 = reinterpret_cast<const float4*>(src + c * 4096);
        for (int i = threadIdx.x; i < 1024; i += blockDim.x) {
            const int nt = i >> 7, t = i & 127, w = t >> 5, l = t & 31;
            const int row = 16 * w + (l >> 2), col = 8 * nt + 2 * (l & 3);
            const float4 v = s4[i];
            *reinterpret_cast<bf162*>(dst + (long long)row * q_rs + col) = __floats2bfloat162_rn(v.x * scale, v.y * scale);
            *reinterpret_cast<bf162*>(dst + (long long)(row + 8) * q_rs + col) =
                __floats2bfloat162_rn(v.z * scale, v.w * scale);
        }
    } else {
        const int rows = T - q0;
        for (int i = threadIdx.x; i < rows * 32; i += blockDim.x) {
            const int row = i >> 5, col = (i & 31) * 2;
            const float2 v = *reinterpret_cast<const float2*>(src + (long long)row * D + c * 64 + col);
            *reinterpret_cast<bf162*>(dst + (long long)row * q_rs + col) = __floats2bfloat162_rn(v.x * scale, v.y * scale);
        }
    }
}

// The backward's preparation in one pass (replaces flash_bwd_delta and the dq_acc memset):
// delta[(b H + h) T + t] = sum_d dO O, and dq_acc (B T H D floats) zeroed. D/8 threads per
// (row, head), 16-byte loads of O and dO, two 16-byte zero stores each; needs o, dout, dq_acc
// 16-byte aligned and o_rs a multiple of 8 (checked by the caller). One thread per 8 elements.
extern "C" __global__ void __launch_bounds__(256) flash_bwd_prep_sm90(const bf16* __restrict__ o,
                                                                      const bf16* __restrict__ dout,
                                                                      float* __restrict__ delta,
                                                                      float* __restrict__ dq_acc, int B, int T, int H,
                                                                      int D, int o_rs) {
    const int tpr = D / 8;  // 16 or 8: a power of two dividing 32
    const long long n = (long long)B * T * H * tpr;
    const long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    const bool valid = i < n;
    const long long rh = i / tpr;  // (b T + t) H + h
    const int c = (int)(i % tpr) * 8;
    const int h = (int)(rh % H);
    const long long row = rh / H;  // b T + t
    float acc = 0.f;
    if (valid) {
        const uint4 a = *reinterpret_cast<const uint4*>(o + row * o_rs + h * D + c);
        const uint4 d = *reinterpret_cast<const uint4*>(dout + row * o_rs + h * D + c);
        const u32 av[4] = {a.x, a.y, a.z, a.w}, dv[4] = {d.x, d.y, d.z, d.w};
#pragma unroll
        for (int k = 0; k < 4; k++) {
            const float2 x = __bfloat1622float2(*reinterpret_cast<const bf162*>(&av[k]));
            const float2 y = __bfloat1622float2(*reinterpret_cast<const bf162*>(&dv[k]));
            acc = fmaf(x.x, y.x, fmaf(x.y, y.y, acc));
        }
        float4* z = reinterpret_cast<float4*>(dq_acc) + 2 * i;
        z[0] = make_float4(0.f, 0.f, 0.f, 0.f);
        z[1] = make_float4(0.f, 0.f, 0.f, 0.f);
    }
    for (int off = tpr / 2; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (valid && c == 0) {
        const long long b = row / T, t = row % T;
        delta[(b * H + h) * T + t] = acc;
    }
}

// flash_bwd_dq_sm90 with coalesced stores (ARCHSCALE_FLASH_DQ=smem): a whole 64 x 64 part goes
// through shared memory as bf16 ([64][72], conflict-free in both phases) and leaves as 128-byte
// rows of 16-byte stores instead of 4-byte stores that cover 16 bytes of each of 16 rows. Needs
// dq 16-byte aligned (q_rs, q_gs multiples of 8 are checked by the caller's layout check).
extern "C" __global__ void __launch_bounds__(256) flash_bwd_dq2_sm90(const float* __restrict__ dq_acc,
                                                                     bf16* __restrict__ dq, int T, int H, int D,
                                                                     int qpg, int q_rs, int q_gs, float scale) {
    __shared__ __align__(16) bf16 tile[64 * 72];
    const int parts = D / 64;
    const int qb = blockIdx.x / parts, c = blockIdx.x % parts, h = blockIdx.y, b = blockIdx.z;
    const int q0 = qb * 64;
    const float* src = dq_acc + (((long long)b * H + h) * T + q0) * D;
    bf16* dst = dq + ((long long)b * T + q0) * q_rs + (h / qpg) * q_gs + (h % qpg) * D + c * 64;
    if (q0 + 64 <= T) {
        const float4* s4 = reinterpret_cast<const float4*>(src + c * 4096);
        float4 v[4];
#pragma unroll
        for (int k = 0; k < 4; k++) v[k] = s4[threadIdx.x + 256 * k];
#pragma unroll
        for (int k = 0; k < 4; k++) {
            const int i = threadIdx.x + 256 * k;
            const int nt = i >> 7, t = i & 127, w = t >> 5, l = t & 31;
            const int row = 16 * w + (l >> 2), col = 8 * nt + 2 * (l & 3);
            *reinterpret_cast<bf162*>(&tile[row * 72 + col]) = __floats2bfloat162_rn(v[k].x * scale, v[k].y * scale);
            *reinterpret_cast<bf162*>(&tile[(row + 8) * 72 + col]) = __floats2bfloat162_rn(v[k].z * scale, v[k].w * scale);
        }
        __syncthreads();
#pragma unroll
        for (int k = 0; k < 2; k++) {
            const int chunk = threadIdx.x + 256 * k, row = chunk >> 3, ch = chunk & 7;
            *reinterpret_cast<uint4*>(dst + (long long)row * q_rs + ch * 8) =
                *reinterpret_cast<const uint4*>(&tile[row * 72 + ch * 8]);
        }
    } else {
        const int rows = T - q0;
        for (int i = threadIdx.x; i < rows * 32; i += blockDim.x) {
            const int row = i >> 5, col = (i & 31) * 2;
            const float2 v = *reinterpret_cast<const float2*>(src + (long long)row * D + c * 64 + col);
            *reinterpret_cast<bf162*>(dst + (long long)row * q_rs + col) = __floats2bfloat162_rn(v.x * scale, v.y * scale);
        }
    }
}
