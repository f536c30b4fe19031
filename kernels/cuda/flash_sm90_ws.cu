// Flash attention for Hopper (sm_90a), FlashAttention-3 design: warp specialisation, wgmma,
// TMA. Same function and layouts as flash.cu's kernels (causal, sliding window, GQA strides, O
// in bf16 and lse in natural log for the backward), plus varlen: seg[b*T + t] (or null) is
// where t's document starts, and query t sees key j iff max(seg[t], t - window + 1) <= j <= t.
// Tiles live in shared memory as [D/64][rows][64] bf16 with the 128-byte swizzle (16-byte chunk
// c of row r stored at chunk c ^ (r & 7)), which is both the K-major layout wgmma reads for Q
// and K and the MN-major layout it reads for V (transposed B). Built only for sm_90a: elsewhere
// the kernels trap (Ops never launches them there).
//
// Forward: CTA = 3 warpgroups (384 threads), 128 query rows, keys in tiles of 128:
// - warpgroup 0, the producer, gives its registers back (setmaxnreg.dec); one thread loads Q
//   once and K_n, V_n into a STAGES-deep ring with TMA (cp.async.bulk.tensor through tensor
//   maps with the 128-byte swizzle: the [D/64][128][64] layout the wgmma descriptors read),
//   each stage guarded by a full mbarrier (TMA transaction bytes) and an empty one (one arrive
//   per consumer warp). Rows at or past T arrive as zeros (TMA out-of-bounds fill).
// - warpgroups 1 and 2, the consumers (setmaxnreg.inc), own 64 query rows each. Per tile n a
//   consumer issues S_n = Q K_n^T and O += P_{n-1} V_{n-1} together, waits for S_n only, does
//   the softmax of tile n while P V runs, then waits and rescales O (intra-warpgroup overlap).
//   No CTA-wide barrier after the setup. Ping-pong: two named barriers pass the right to issue
//   wgmma back and forth, so one consumer's softmax runs while the other's GEMMs do.
// CTAs run heaviest (latest query block) first over the whole grid.

#define F9W_THREADS 384

// A CUtensorMap (128 bytes, 64-byte aligned), passed by value as a __grid_constant__ parameter.
struct __align__(64) F9TensorMap {
    u64 opaque[16];
};

__device__ __forceinline__ void mb_init(u32 bar, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mb_expect_tx(u32 bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ bool mb_try_wait(u32 bar, u32 parity) {
    u32 ok;
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(ok)
        : "r"(bar), "r"(parity)
        : "memory");
    return ok != 0;
}
// Waits until the phase of parity `parity` has completed.
__device__ __forceinline__ void mb_wait(u32 bar, u32 parity) {
    while (!mb_try_wait(bar, parity)) {
    }
}
// One arrive per warp (from lane 0), without a branch around it.
__device__ __forceinline__ void mb_arrive_warp(u32 bar, int lane) {
    asm volatile("{\n.reg .pred p;\nsetp.eq.u32 p, %1, 0;\n@p mbarrier.arrive.shared::cta.b64 _, [%0];\n}\n" ::"r"(bar),
                 "r"(lane)
                 : "memory");
}
__device__ __forceinline__ void tma_load_4d(u32 dst, const F9TensorMap* map, u32 bar, int c0, int c1, int c2, int c3) {
    asm volatile(
        "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], "
        "[%6];\n" ::"r"(dst),
        "l"(reinterpret_cast<u64>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar)
        : "memory");
}
__device__ __forceinline__ void tma_load_5d(u32 dst, const F9TensorMap* map, u32 bar, int c0, int c1, int c2, int c3,
                                            int c4) {
    asm volatile(
        "cp.async.bulk.tensor.5d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5, "
        "%6}], [%7];\n" ::"r"(dst),
        "l"(reinterpret_cast<u64>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(c4), "r"(bar)
        : "memory");
}
__device__ __forceinline__ void named_sync(int id) { asm volatile("bar.sync %0, 256;\n" ::"r"(id) : "memory"); }
__device__ __forceinline__ void named_arrive(int id) { asm volatile("bar.arrive %0, 256;\n" ::"r"(id) : "memory"); }

// Tensor maps (host side, ops.rs): Q over (D, T, qpg, G, B), K and V over (D, T, G, B), bf16,
// box 64 columns x 128 rows, 128-byte swizzle; a D = 128 tile is two boxes (columns 0, 64).
template <int D, int STAGES>
__device__ __forceinline__ void flash_fwd_ws(const F9TensorMap* tm_q, const F9TensorMap* tm_k,
                                             const F9TensorMap* tm_v, bf16* __restrict__ o, float* __restrict__ lse,
                                             const int* __restrict__ seg, int T, int H, int qpg, int o_rs,
                                             float scale_log2, int window) {
#ifdef F9_ENABLED
    constexpr u32 TILE = F9_BC * D * 2;  // bytes of a 128-row tile (Q, K or V)
    constexpr u32 BOX = F9_BC * 64 * 2;  // one TMA box
    extern __shared__ __align__(1024) unsigned char smem_raw[];
    const u32 base = (f9_smem(smem_raw) + 1023u) & ~1023u;
    const u32 Qs = base, Ks = base + TILE, Vs = Ks + STAGES * TILE;
    const u32 bars = Vs + STAGES * TILE;  // q_full, k_full[S], k_empty[S], v_full[S], v_empty[S]
    const u32 q_full = bars;
#define F9W_KFULL(s) (bars + 8u * (1 + (s)))
#define F9W_KEMPTY(s) (bars + 8u * (1 + STAGES + (s)))
#define F9W_VFULL(s) (bars + 8u * (1 + 2 * STAGES + (s)))
#define F9W_VEMPTY(s) (bars + 8u * (1 + 3 * STAGES + (s)))

    const int nhb = gridDim.y * gridDim.z;
    const int lin = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    const int qb = gridDim.x - 1 - lin / nhb;  // heaviest (latest) query blocks first
    const int h = (lin % nhb) % gridDim.y, b = (lin % nhb) / gridDim.y;
    const int q0 = qb * F9_BR;
    const int* segb = seg ? seg + (long long)b * T : nullptr;
    const int q_last = min(q0 + F9_BR, T) - 1;
    const int lo_last = flash_key_lo(segb, q_last, window);  // key_lo is nondecreasing in the row
    const int kb_lo = flash_key_lo(segb, q0, window) / F9_BC;
    const int ntiles = q_last / F9_BC + 1 - kb_lo;

    if (threadIdx.x == 0) {
        mb_init(q_full, 1);
#pragma unroll
        for (int s = 0; s < STAGES; s++) {
            mb_init(F9W_KFULL(s), 1);
            mb_init(F9W_KEMPTY(s), 8);
            mb_init(F9W_VFULL(s), 1);
            mb_init(F9W_VEMPTY(s), 8);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();

    const int wg = threadIdx.x >> 7;
    if (wg == 0) {
        // Producer.
        asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
        if (threadIdx.x == 0) {
            const int g = h / qpg;
            mb_expect_tx(q_full, TILE);
#pragma unroll
            for (int c = 0; c < D / 64; c++) tma_load_5d(Qs + c * BOX, tm_q, q_full, c * 64, q0, h % qpg, g, b);
            for (int n = 0; n < ntiles; n++) {
                const int s = n % STAGES;
                const u32 ph = (n / STAGES) & 1;
                const int j0 = (kb_lo + n) * F9_BC;
                mb_wait(F9W_KEMPTY(s), ph ^ 1);  // a fresh barrier passes parity 1 at once
                mb_expect_tx(F9W_KFULL(s), TILE);
#pragma unroll
                for (int c = 0; c < D / 64; c++)
                    tma_load_4d(Ks + s * TILE + c * BOX, tm_k, F9W_KFULL(s), c * 64, j0, g, b);
                mb_wait(F9W_VEMPTY(s), ph ^ 1);
                mb_expect_tx(F9W_VFULL(s), TILE);
#pragma unroll
                for (int c = 0; c < D / 64; c++)
                    tma_load_4d(Vs + s * TILE + c * BOX, tm_v, F9W_VFULL(s), c * 64, j0, g, b);
            }
        }
        return;
    }

    // Consumers.
    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");
    const int cw = wg - 1;  // this consumer's 64 rows: q0 + 64 cw ...
    const int lane = threadIdx.x & 31, wl = (threadIdx.x >> 5) & 3;
    const int row_a = q0 + cw * 64 + wl * 16 + (lane >> 2);
    const int row_b = row_a + 8;
    const int lo_row[2] = {row_a < T ? flash_key_lo(segb, row_a, window) : 0,
                           row_b < T ? flash_key_lo(segb, row_b, window) : 0};
    if (cw == 0) named_arrive(1);  // consumer 0 issues first

    const u64 dQw = f9_desc(Qs + cw * (64 * 128), 16, 1024);  // this consumer's 64 query rows
    float acc[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; i++) acc[i] = 0.f;
    float mrow[2] = {-INF_F, -INF_F}, lrow[2] = {0.f, 0.f};
    u32 p[F9_BC / 16][4];  // P of the previous tile (A operand of O += P V)
#pragma unroll
    for (int kk = 0; kk < F9_BC / 16; kk++) p[kk][0] = p[kk][1] = p[kk][2] = p[kk][3] = 0u;
    mb_wait(q_full, 0);

    for (int n = 0; n <= ntiles; n++) {
        const int kb = kb_lo + n;
        const int s = n % STAGES, sp = (n + STAGES - 1) % STAGES;
        const u32 ph = (n / STAGES) & 1, php = ((n + STAGES - 1) / STAGES + 1) & 1;  // parity of tile n-1
        const u32 Kt = Ks + s * TILE, Vp = Vs + sp * TILE;
        const u64 dVp = f9_desc(Vp, F9_BC * 128, 1024), dKt = f9_desc(Kt, 16, 1024);

        if (n == ntiles) {  // last P V
            mb_wait(F9W_VFULL(sp), php);
            named_sync(1 + cw);
            wg_fence_regs<D / 2>(acc);
            wg_fence();
#pragma unroll
            for (int kk = 0; kk < F9_BC / 16; kk++) f9_wg_pv<D>(acc, p[kk], f9_dadd(dVp, kk * (16 * 128)));
            wg_commit();
            if (cw == 0) named_arrive(2);  // consumer 1's last turn needs no handover
            wg_wait<0>();
            wg_fence_regs<D / 2>(acc);
            mb_arrive_warp(F9W_VEMPTY(sp), lane);
            break;
        }

        if (n > 0) mb_wait(F9W_VFULL(sp), php);
        mb_wait(F9W_KFULL(s), ph);
        named_sync(1 + cw);
        // S = Q K_n^T (64 rows x 128 keys), then O += P_{n-1} V_{n-1}
        float sc[F9_BC / 2];
        wg_fence_regs<F9_BC / 2>(sc);
        wg_fence_regs<D / 2>(acc);
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) {
            wg_ss_n128_t00(sc, f9_dadd(dQw, (kk >> 2) * (F9_BR * 128) + (kk & 3) * 32),
                           f9_dadd(dKt, (kk >> 2) * (F9_BC * 128) + (kk & 3) * 32), kk > 0 ? 1 : 0);
        }
        wg_commit();
        if (n > 0) {
#pragma unroll
            for (int kk = 0; kk < F9_BC / 16; kk++) f9_wg_pv<D>(acc, p[kk], f9_dadd(dVp, kk * (16 * 128)));
            wg_commit();
            named_arrive(2 - cw);
            wg_wait<1>();
        } else {
            named_arrive(2 - cw);
            wg_wait<0>();
        }
        wg_fence_regs<F9_BC / 2>(sc);
        mb_arrive_warp(F9W_KEMPTY(s), lane);  // K_n read

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
                sc[i] = f9_ex2(fmaf(sc[i], scale_log2, -mu[(i >> 1) & 1]));
                rsum[(i >> 1) & 1] += sc[i];
            }
#pragma unroll
            for (int r = 0; r < 2; r++) lrow[r] = lrow[r] * alpha[r] + rsum[r];
            wg_fence_regs<F9_BC / 2>(sc);
        };
        // Tiles wholly visible to every row of the CTA skip the per-element test; the softmax
        // sits inside each branch so that the wait below starts a basic block after it
        // (ptxas hoists a wgmma wait to the top of its block).
        const bool full = j0 + F9_BC - 1 <= q0 && j0 + F9_BC <= T && j0 >= lo_last;
        if (full) {
#pragma unroll
            for (int i = 0; i < F9_BC / 2; i++) mx[(i >> 1) & 1] = fmaxf(mx[(i >> 1) & 1], sc[i]);
            finish();
        } else {
#pragma unroll
            for (int i = 0; i < F9_BC / 2; i++) {
                const int r = (i >> 1) & 1;
                const int row = r ? row_b : row_a;
                const int j = j0 + (i >> 2) * 8 + (lane & 3) * 2 + (i & 1);
                const bool ok = row < T && j <= row && j >= lo_row[r] && j < T;
                sc[i] = ok ? sc[i] : -INF_F;
                mx[r] = fmaxf(mx[r], sc[i]);
            }
            finish();
        }
        wg_wait<0>();  // O += P_{n-1} V_{n-1} done: O and P are free, V_{n-1} read
        wg_fence_regs<D / 2>(acc);
#pragma unroll
        for (int kk = 0; kk < F9_BC / 16; kk++)
            asm volatile("" : "+r"(p[kk][0]), "+r"(p[kk][1]), "+r"(p[kk][2]), "+r"(p[kk][3])::"memory");
        if (n > 0) mb_arrive_warp(F9W_VEMPTY(sp), lane);
#pragma unroll
        for (int i = 0; i < D / 2; i++) acc[i] *= alpha[(i >> 1) & 1];
        // P as the A operand: the accumulator layout of two adjacent n8 blocks is the
        // m64k16 A-fragment layout.
#pragma unroll
        for (int kk = 0; kk < F9_BC / 16; kk++) {
            p[kk][0] = pack_bf16(sc[8 * kk + 0], sc[8 * kk + 1]);
            p[kk][1] = pack_bf16(sc[8 * kk + 2], sc[8 * kk + 3]);
            p[kk][2] = pack_bf16(sc[8 * kk + 4], sc[8 * kk + 5]);
            p[kk][3] = pack_bf16(sc[8 * kk + 6], sc[8 * kk + 7]);
        }
    }
#undef F9W_KFULL
#undef F9W_KEMPTY
#undef F9W_VFULL
#undef F9W_VEMPTY

    flash_store_o<D>(o, lse, acc, mrow, lrow, row_a, b, h, T, H, o_rs, lane);
#else
    asm volatile("trap;");
#endif
}

#define F9W_FWD_KERNEL(NAME, D, STAGES)                                                                     \
    extern "C" __global__ void __launch_bounds__(F9W_THREADS, 1)                                                      \
        NAME(const __grid_constant__ F9TensorMap tm_q, const __grid_constant__ F9TensorMap tm_k,                     \
             const __grid_constant__ F9TensorMap tm_v, bf16* o, float* lse, const int* seg, int T, int H, int qpg,   \
             int o_rs, float scale_log2, int window) {                                                                \
        flash_fwd_ws<D, STAGES>(&tm_q, &tm_k, &tm_v, o, lse, seg, T, H, qpg, o_rs, scale_log2, window);    \
    }
// Stages: d128 2 (Q + 2 x (K + V) = 160 KiB), d64 3 (112 KiB).
F9W_FWD_KERNEL(flash_fwd_ws_d128, 128, 2)
F9W_FWD_KERNEL(flash_fwd_ws_d64, 64, 3)

// ---------------------------------------------------------------------------------------------
// Backward (FA2 structure on wgmma): one CTA per (128-key block, kv group, batch); consumer
// warpgroup c owns keys 64c..64c+63 of the block, dK and dV accumulate in its registers over
// the group's query heads and the 64-query blocks that see the block. Per 64-query block (work
// item):
//   S^T = K Q^T and dP^T = V dO^T,
//   P^T = exp(S^T scale - lse), dS^T = P^T (dP^T - delta),
//   dV += P^T dO and dK += dS^T Q (A from registers, B = dO / Q read N-major),
//   dQ = dS K (A = dS^T from shared memory read M-major, B = K read N-major): d128 splits the
//   128 columns over the two consumers, d64 the 128 keys (two partial sums), added into dq_acc
//   (zeroed before; layout at flash_bwd_dq2_sm90). dS^T and the dQ staging are double-buffered,
//   so dQ's wgmma of an item keeps running into the next item, where its result is stored.
// With rope_cos, rope_sin (bf16 [>= T][D/2]; null: none) dK is stored inverse-rotated (the
// RoPE backward, flash_store_dkdv); dQ's rotation is flash_bwd_dq2_sm90's.
// CTAs run heaviest first over the whole grid: the block index is linearised with the key
// block slowest, so every (group, batch)'s first key blocks (most queries under the causal
// mask) start in the first wave. Warp-specialised:
// - thread 0 loads K and V once and per item Q and dO (TMA; Q over (D, T, qpg, G, B), dO over
//   (D, T, H, B), boxes of 64 rows) into a 2-stage ring; warp 1 loads the item's lse, delta and
//   seg (plain loads, zeros past T and without varlen) into the same stage. full[st] completes
//   on TMA bytes plus 33 arrivals (thread 0 and warp 1's lanes); empty[st] on one arrival per
//   consumer warp once dV += P^T dO and dK += dS^T Q (the last readers of Q, dO) are done.
// - per item the consumers meet at one named barrier (256 threads: dS^T of both written, so
//   dQ = dS K can read all 128 keys); no CTA-wide barrier in the loop.
// - dQ: each consumer parks its 64 x 64 fp32 part in shared memory (double-buffered by item),
//   syncs its own warpgroup and one thread issues the bulk reduce; the last, partial block of
//   a head goes by vector atomics.
// - fewer instructions per item: lse pre-scaled by log2 e in the producer, lse/delta pairs by
//   8-byte loads, dS^T by 4 stmatrix instead of 16 stores;
// - V's rows of the first VK k-steps held as register A fragments, so dP^T = V dO^T reads only
//   dO from shared memory for those (d128: the first 4 of 8, 16 KiB less shared-memory traffic
//   per item and CTA; all 8 left too few registers: C7512).
template <int D>
__device__ __forceinline__ void flash_bwd_ws(const F9TensorMap* tm_q, const F9TensorMap* tm_k,
                                             const F9TensorMap* tm_v, const F9TensorMap* tm_do,
                                             const float* __restrict__ lse, const float* __restrict__ delta,
                                             float* __restrict__ dq_acc, bf16* __restrict__ dk, bf16* __restrict__ dv,
                                             const int* __restrict__ seg, int T, int H, int qpg, int kv_rs, int kv_gs,
                                             float scale, float scale_log2, int window,
                                             const bf16* __restrict__ rope_cos, const bf16* __restrict__ rope_sin) {
#ifdef F9_ENABLED
    constexpr u32 TILE_KV = F9B_BC * D * 2;       // K or V: [D/64][128 keys][64]
    constexpr u32 TILE_Q = F9B_BR * D * 2;        // Q or dO: [D/64][64 queries][64]
    constexpr u32 TILE_DS = F9B_BC * F9B_BR * 2;  // dS^T: [128 keys][64 queries]
    constexpr u32 TILE_DQ = F9B_BR * 64 * 4;      // one warpgroup's fp32 dQ part (64 x 64)
    constexpr u32 BOX_KV = F9B_BC * 64 * 2, BOX_Q = F9B_BR * 64 * 2;
    extern __shared__ __align__(1024) unsigned char smem_raw[];
    const u32 raw = f9_smem(smem_raw);
    const u32 base = (raw + 1023u) & ~1023u;
    const u32 Ks = base, Vs = Ks + TILE_KV, Qs2 = Vs + TILE_KV, dOs2 = Qs2 + 2 * TILE_Q, dSs = dOs2 + 2 * TILE_Q;
    const u32 dQs = dSs + 2 * TILE_DS;  // [2 buffers][2 warpgroups] TILE_DQ
    const u32 Ls = dQs + 4 * TILE_DQ;   // lse, delta, seg: [2 stages][64] each
    const u32 Ds = Ls + 2 * F9B_BR * 4, Gs = Ds + 2 * F9B_BR * 4;
    const u32 bars = Gs + 2 * F9B_BR * 4;  // kv_full, full[2], empty[2]
    const u32 kv_full = bars;
#define F9WB_FULL(s) (bars + 8u * (1 + (s)))
#define F9WB_EMPTY(s) (bars + 8u * (3 + (s)))
    float* lse2 = reinterpret_cast<float*>(smem_raw + (Ls - raw));
    float* del2 = reinterpret_cast<float*>(smem_raw + (Ds - raw));
    int* seg2 = reinterpret_cast<int*>(smem_raw + (Gs - raw));

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, wg = warp >> 2;
    const int ngb = gridDim.y * gridDim.z;
    const int lin = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    const int kb = lin / ngb, g = (lin % ngb) % gridDim.y, b = (lin % ngb) / gridDim.y;
    const int k0 = kb * F9B_BC;
    const int* segb = seg ? seg + (long long)b * T : nullptr;

    const int qb_lo = k0 / F9B_BR;
    const int q_hi = flash_query_end(segb, k0 + F9B_BC - 1, window, T);
    const int nqb = max((q_hi + F9B_BR - 1) / F9B_BR - qb_lo, 0);
    const int items = qpg * nqb;

    if (threadIdx.x == 0) {
        mb_init(kv_full, 1);
#pragma unroll
        for (int s = 0; s < 2; s++) {
            mb_init(F9WB_FULL(s), 33);
            mb_init(F9WB_EMPTY(s), 8);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();

    if (wg == 0) {
        // Producer.
        asm volatile("setmaxnreg.dec.sync.aligned.u32 24;\n" ::: "memory");
        if (warp == 0 && items > 0) {
            if (lane == 0) {
                mb_expect_tx(kv_full, 2 * TILE_KV);
#pragma unroll
                for (int c = 0; c < D / 64; c++) {
                    tma_load_4d(Ks + c * BOX_KV, tm_k, kv_full, c * 64, k0, g, b);
                    tma_load_4d(Vs + c * BOX_KV, tm_v, kv_full, c * 64, k0, g, b);
                }
                for (int it = 0; it < items; it++) {
                    const int st = it & 1;
                    const u32 ph = (it >> 1) & 1;
                    const int j = it / nqb, q0 = (qb_lo + it % nqb) * F9B_BR;
                    mb_wait(F9WB_EMPTY(st), ph ^ 1);
                    mb_expect_tx(F9WB_FULL(st), 2 * TILE_Q);
#pragma unroll
                    for (int c = 0; c < D / 64; c++) {
                        tma_load_5d(Qs2 + st * TILE_Q + c * BOX_Q, tm_q, F9WB_FULL(st), c * 64, q0, j, g, b);
                        tma_load_4d(dOs2 + st * TILE_Q + c * BOX_Q, tm_do, F9WB_FULL(st), c * 64, q0, g * qpg + j, b);
                    }
                }
            }
        } else if (warp == 1 && items > 0) {
            for (int it = 0; it < items; it++) {
                const int st = it & 1;
                const u32 ph = (it >> 1) & 1;
                const int j = it / nqb, q0 = (qb_lo + it % nqb) * F9B_BR;
                const long long bh = ((long long)b * H + g * qpg + j) * T;
                float l[2], d[2];
                int sg[2];
#pragma unroll
                for (int r = 0; r < 2; r++) {
                    const int row = q0 + lane + 32 * r;
                    const bool ok = row < T;
                    l[r] = ok ? lse[bh + row] * 1.44269504088896340736f : 0.f;
                    d[r] = ok ? delta[bh + row] : 0.f;
                    sg[r] = ok && segb ? segb[row] : 0;
                }
                mb_wait(F9WB_EMPTY(st), ph ^ 1);
#pragma unroll
                for (int r = 0; r < 2; r++) {
                    lse2[st * F9B_BR + lane + 32 * r] = l[r];
                    del2[st * F9B_BR + lane + 32 * r] = d[r];
                    seg2[st * F9B_BR + lane + 32 * r] = sg[r];
                }
                asm volatile("mbarrier.arrive.release.cta.shared::cta.b64 _, [%0];\n" ::"r"(F9WB_FULL(st)) : "memory");
            }
        }
        return;
    }

    // Consumers.
    asm volatile("setmaxnreg.inc.sync.aligned.u32 240;\n" ::: "memory");
    const int cw = wg - 1;                         // keys 64 cw .. 64 cw + 63 of the block
    const int wl = warp & 3, tw = threadIdx.x & 127;  // warp, thread within the warpgroup
    float dk_acc[D / 2], dv_acc[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; i++) dk_acc[i] = dv_acc[i] = 0.f;
    const u64 dKw = f9_desc(Ks + cw * (64 * 128), 16, 1024), dVw = f9_desc(Vs + cw * (64 * 128), 16, 1024);
    const u64 dKn = f9_desc(Ks + (D == 128 ? cw * (F9B_BC * 128) : 0), F9B_BC * 128, 1024);
    const int kw = k0 + cw * 64 + wl * 16;  // this warp's 16 keys
    const int key_a = kw + (lane >> 2);     // this thread's keys: key_a, key_a + 8
    // stmatrix: lane l addresses row l % 8 of matrix l / 8 = (row half (l / 8) % 2, n block l / 16).
    const int st_row = cw * 64 + wl * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;

    // dQ of item `it` (its wgmma complete): for a whole query block, to shared memory in
    // fragment order and one 16 KiB bulk reduce into its block of dq_acc; for the last,
    // partial block, vector atomics into row-major rows (layout at flash_bwd_dq2_sm90).
    float dq[32];  // dQ of an item, still on the tensor cores across the loop's back edge
    auto store_dq = [&](int it) {
        const int jj = it / nqb, qq0 = (qb_lo + it % nqb) * F9B_BR, hh = g * qpg + jj;
        float* dqb = dq_acc + (((long long)b * H + hh) * T + qq0) * D;
        if (qq0 + F9B_BR <= T) {
            const u32 dqt = dQs + ((it & 1) * 2 + cw) * TILE_DQ;
#pragma unroll
            for (int nt = 0; nt < 8; nt++)
                f9_st_shared4(dqt + (nt * 128 + tw) * 16, dq[4 * nt], dq[4 * nt + 1], dq[4 * nt + 2], dq[4 * nt + 3]);
            f9_proxy_fence();
            f9_bar(2 + cw, 128);
            if (tw == 0) f9_bulk_red_add(dqb + (D == 128 ? cw * 4096 : 0), dqt, TILE_DQ);
        } else {
#pragma unroll
            for (int r = 0; r < 2; r++) {
                const int ql = wl * 16 + (lane >> 2) + r * 8;
                if (qq0 + ql >= T) continue;
                float* p = dqb + ql * D + (D == 128 ? cw * 64 : 0) + (lane & 3) * 2;
#pragma unroll
                for (int nt = 0; nt < 8; nt++)
                    atomicAdd(reinterpret_cast<float2*>(p + nt * 8), make_float2(dq[nt * 4 + 2 * r], dq[nt * 4 + 2 * r + 1]));
            }
        }
        f9_bulk_commit();
    };

    if (items > 0) mb_wait(kv_full, 0);
    // This warpgroup's 64 rows of V as wgmma A fragments, loaded once (ldmatrix; lane l reads
    // row l % 8 + 8 ((l / 8) % 2) of the warp's 16, columns 16 kk + 8 (l / 16) ..). Only the
    // first VK k-steps (d128: half of V; 6 or 8 of 8 left too few registers, C7512).
    constexpr int VK = D == 128 ? 4 : D / 16;
    u32 vf[VK][4];
    if (items > 0) {
        const int vrow = cw * 64 + wl * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
#pragma unroll
        for (int kk = 0; kk < VK; kk++) {
            const int ch = 2 * (kk & 3) + (lane >> 4);
            f9_ldmatrix4(Vs + (kk >> 2) * (F9B_BC * 128) + vrow * 128 + ((ch ^ (vrow & 7)) << 4), vf[kk]);
        }
    }
    for (int item = 0; item < items; item++) {
        const int st = item & 1;
        const u32 ph = (item >> 1) & 1;
        const int q0 = (qb_lo + item % nqb) * F9B_BR;
        const u32 Qt = Qs2 + st * TILE_Q, dOt = dOs2 + st * TILE_Q, dSt = dSs + st * TILE_DS;
        const float* lse_s = lse2 + st * F9B_BR;
        const float* del_s = del2 + st * F9B_BR;
        const int* seg_s = seg2 + st * F9B_BR;  // zeros without varlen

        wg_wait<0>();  // dQ of item - 1
        wg_fence_regs<32>(dq);
        if (item > 0) store_dq(item - 1);
        mb_wait(F9WB_FULL(st), ph);
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
            if (kk < VK) {
                wg_rs_n64_t0(dp, vf[kk < VK ? kk : 0], f9_dadd(ddOt, (kk >> 2) * (F9B_BR * 128) + (kk & 3) * 32), kk > 0 ? 1 : 0);
            } else {
                wg_ss_n64_t00(dp, f9_dadd(dVw, (kk >> 2) * (F9B_BC * 128) + (kk & 3) * 32),
                              f9_dadd(ddOt, (kk >> 2) * (F9B_BR * 128) + (kk & 3) * 32), kk > 0 ? 1 : 0);
            }
        }
        wg_commit();
        wg_wait<1>();  // S^T is done; dP^T may still run while P^T is computed
        wg_fence_regs<32>(s);

        const int wmax = window > 0 ? window - 1 : T;
        const int ql_last = min(F9B_BR - 1, T - 1 - q0);
        const int lo_last = max(seg_s[ql_last], q0 + ql_last - wmax);
        const bool full = kw + 15 <= q0 && q0 + F9B_BR <= T && kw >= lo_last;
        // lse (and delta below) of the thread's query pair ql, ql + 1 by one 8-byte load.
        if (full) {
#pragma unroll
            for (int nb = 0; nb < 8; nb++) {
                const float2 l2 = *reinterpret_cast<const float2*>(lse_s + nb * 8 + (lane & 3) * 2);
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int i = nb * 4 + e;
                    s[i] = f9_ex2(fmaf(s[i], scale_log2, -((e & 1) ? l2.y : l2.x)));
                }
            }
        } else {
#pragma unroll
            for (int nb = 0; nb < 8; nb++) {
                const float2 l2 = *reinterpret_cast<const float2*>(lse_s + nb * 8 + (lane & 3) * 2);
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int i = nb * 4 + e;
                    const int ql = nb * 8 + (lane & 3) * 2 + (e & 1);
                    const int key = key_a + ((e >> 1) & 1) * 8;
                    const int qrow = q0 + ql;
                    const bool ok = qrow < T && key < T && key <= qrow && key >= seg_s[ql] && key >= qrow - wmax;
                    const float ex = f9_ex2(fmaf(s[i], scale_log2, -((e & 1) ? l2.y : l2.x)));
                    s[i] = ok ? ex : 0.f;
                }
            }
        }
        wg_wait<0>();
        wg_fence_regs<32>(dp);
#pragma unroll
        for (int nb = 0; nb < 8; nb++) {
            const float2 d2 = *reinterpret_cast<const float2*>(del_s + nb * 8 + (lane & 3) * 2);
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int i = nb * 4 + e;
                dp[i] = s[i] * (dp[i] - ((e & 1) ? d2.y : d2.x));
            }
        }
        u32 pf[4][4], dsf[4][4];
#pragma unroll
        for (int kk = 0; kk < 4; kk++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                pf[kk][e] = pack_bf16(s[8 * kk + 2 * e], s[8 * kk + 2 * e + 1]);
                dsf[kk][e] = pack_bf16(dp[8 * kk + 2 * e], dp[8 * kk + 2 * e + 1]);
            }
        }
        // dS^T by 4 stmatrix: register e of kk is (row half e % 2, n block 2 kk + e / 2)
#pragma unroll
        for (int kk = 0; kk < 4; kk++)
            f9_stmatrix4(dSt + st_row * 128 + (((2 * kk + (lane >> 4)) ^ (lane & 7)) << 4), dsf[kk][0], dsf[kk][1],
                         dsf[kk][2], dsf[kk][3]);
        const u64 ddOtN = f9_desc(dOt, F9B_BR * 128, 1024), dQtN = f9_desc(Qt, F9B_BR * 128, 1024);
        wg_fence_regs<D / 2>(dv_acc);
        wg_fence_regs<D / 2>(dk_acc);
        wg_fence();
#pragma unroll
        for (int kk = 0; kk < 4; kk++) f9_wg_pv<D>(dv_acc, pf[kk], f9_dadd(ddOtN, kk * (16 * 128)));
#pragma unroll
        for (int kk = 0; kk < 4; kk++) f9_wg_pv<D>(dk_acc, dsf[kk], f9_dadd(dQtN, kk * (16 * 128)));
        wg_commit();
        f9_proxy_fence();
        // The dQ buffer item + 1 fills (item - 1's) was last read by the bulk reduce of item - 3:
        // its issuer waits for that before the barrier that the other threads cross after it.
        if (tw == 0) f9_bulk_wait_read<1>();
        f9_bar(1, 256);  // dS^T of both consumers written (dQ of item - 1 may still read the other buffer)

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
                const u32 off = cw * (64 * 128) + kk * (16 * 128);
                wg_ss_n64_t11(dq, f9_dadd(dSd, off), f9_dadd(dKn, off), kk > 0 ? 1 : 0);
            }
        }
        wg_commit();
        wg_wait<1>();  // dV, dK done: their registers and stage st are free; dQ runs on
        wg_fence_regs<D / 2>(dv_acc);
        wg_fence_regs<D / 2>(dk_acc);
#pragma unroll
        for (int kk = 0; kk < 4; kk++)
            asm volatile("" : "+r"(pf[kk][0]), "+r"(pf[kk][1]), "+r"(pf[kk][2]), "+r"(pf[kk][3]),
                         "+r"(dsf[kk][0]), "+r"(dsf[kk][1]), "+r"(dsf[kk][2]), "+r"(dsf[kk][3])::"memory");
        mb_arrive_warp(F9WB_EMPTY(st), lane);
    }
#undef F9WB_FULL
#undef F9WB_EMPTY
    wg_wait<0>();  // on every path: ptxas serialises all wgmma if one path may skip it
    wg_fence_regs<32>(dq);
    if (items > 0) store_dq(items - 1);
    if (tw == 0) f9_bulk_wait_all();
    flash_store_dkdv<D>(dk + (long long)b * T * kv_rs + g * kv_gs, dv + (long long)b * T * kv_rs + g * kv_gs, kv_rs,
                        dk_acc, dv_acc, scale, key_a, T, lane, rope_cos, rope_sin);
#else
    asm volatile("trap;");
#endif
}

#define F9W_BWD_KERNEL(NAME, D)                                                                                       \
    extern "C" __global__ void __launch_bounds__(F9W_THREADS, 1)                                                      \
        NAME(const __grid_constant__ F9TensorMap tm_q, const __grid_constant__ F9TensorMap tm_k,                     \
             const __grid_constant__ F9TensorMap tm_v, const __grid_constant__ F9TensorMap tm_do, const float* lse,  \
             const float* delta, float* dq_acc, bf16* dk, bf16* dv, const int* seg, int T, int H, int qpg, int kv_rs, \
             int kv_gs, float scale, float scale_log2, int window, const bf16* rope_cos, const bf16* rope_sin) {     \
        flash_bwd_ws<D>(&tm_q, &tm_k, &tm_v, &tm_do, lse, delta, dq_acc, dk, dv, seg, T, H, qpg, kv_rs, kv_gs, scale, \
                        scale_log2, window, rope_cos, rope_sin);                                                      \
    }
// Named after variant sm90ws-leanv, the one Hopper backward since 2026-11-29 (bench/NOTES.md).
F9W_BWD_KERNEL(flash_bwd_ws_leanv_d128, 128)
F9W_BWD_KERNEL(flash_bwd_ws_leanv_d64, 64)
