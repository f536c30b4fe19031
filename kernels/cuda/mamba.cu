// Mamba-1 (arch-spec §1.9): causal depthwise conv1d (k = 4) + SiLU, and the selective scan
// with fp32 state, delta bias + softplus, D skip and SiLU(z) gate.
// Varlen: `seg` (int [rows], the document start of each token within its row, or null) resets
// the conv taps and the scan state at document starts, as runtime/src/cpu/ops/{conv1d,
// selective_scan}.rs do. Rows are `b·T + t`; every bf16 tensor has its own row stride.

#define CONV_K 4
#define CONV_RUN 64        // rows walked by one warp in the conv kernels
#define SCAN_N 16          // d_state (Mamba-1's N = 16; the wrapper checks it)
#define SCAN_CKPT 32       // steps staged together (forward chunk, backward interval)
#define SCAN_CKPT_EVERY 16 // state checkpoint spacing (forward writes, backward reads)
#define SCAN_SUB 16        // backward sub-chunk whose states sit in shared memory
#define SOFTPLUS_THRESHOLD 20.f
#define LOG2E_F 1.4426950408889634f

__device__ __forceinline__ float ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
__device__ __forceinline__ float lg2_approx(float x) {
    float y;
    asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
__device__ __forceinline__ float rcp_approx(float x) {
    float y;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
// Branch-free fast forms (the scan calls them once per token and channel; libm's log1pf and
// IEEE division take slow-path branches that stall the one warp each scheduler has). They are
// __expf, __logf and __fdividef without those intrinsics' denormal scaling (3 extra
// instructions each around every MUFU op); only denormal arguments or results differ.
__device__ __forceinline__ float sigmoid_f(float x) { return rcp_approx(1.f + ex2(-x * LOG2E_F)); }
// log(1 + e) for e in [0, 1]: a series below 1e-3, else log(w)·e/(w − 1) with w = 1 + e
// (corrects the rounding of w).
__device__ __forceinline__ float log1p_unit(float e) {
    const float w = 1.f + e;
    const float series = e * fmaf(e, fmaf(e, 1.f / 3.f, -0.5f), 1.f);
    const float direct = lg2_approx(w) * 0.6931471805599453f * (e * rcp_approx(w - 1.f));
    return e < 1e-3f ? series : direct;
}
// softplus(u) = max(u, 0) + log(1 + exp(−|u|)); u above 20 is returned as is (ArchScale).
__device__ __forceinline__ float softplus_f(float u) {
    const float r = fmaxf(u, 0.f) + log1p_unit(ex2(-fabsf(u) * LOG2E_F));
    return u > SOFTPLUS_THRESHOLD ? u : r;
}
// softplus'(pre) = sigmoid(pre) = 1 − exp(−dt) from dt = softplus(pre) (1 above 20).
__device__ __forceinline__ float softplus_grad_from_dt(float dt) {
    const float series = dt * fmaf(dt, fmaf(dt, 1.f / 6.f, -0.5f), 1.f);
    const float direct = 1.f - ex2(-dt * LOG2E_F);
    return dt > SOFTPLUS_THRESHOLD ? 1.f : (dt < 1e-3f ? series : direct);
}

// ------------------------------------------------------------------------------------------
// Causal conv1d + SiLU
//
// A thread owns VC adjacent channels: 2 (one 4-byte bf16x2 access per row) when the host
// finds D and every row stride even and every base pointer 4-byte aligned (`pairs`), else 1. A warp walks a run of
// CONV_RUN rows forwards in batches, carrying the 3 previous rows' x (backward also their du
// and first taps). A batch whose rows all use every tap (no sequence or document start
// within 3 rows before any of them: 3 <= t0, t0 + NB <= T and, with varlen, every
// seg[r] <= t_r − 3) runs without the per-row first-tap logic; the other batches keep the
// exact per-row rule of conv_lo.

// Timing toggles (ARCHSCALE_KERNEL_DEFINES): CONV_FWD_NB8 (forward batches of 8 rows: 56
// registers instead of 94, 8 blocks per SM instead of 5) and CONV_BWD_2BLOCKS (backward at 2
// blocks per SM, 108 registers, instead of 3 blocks at 80).
#ifdef CONV_FWD_NB8
#define CONV_FWD_NB 8    // rows per batch, forward
#else
#define CONV_FWD_NB 16
#endif
#define CONV_BWD_NB 8    // rows per batch, backward
#ifdef CONV_BWD_2BLOCKS
#define CONV_BWD_MIN_BLOCKS 2
#else
#define CONV_BWD_MIN_BLOCKS 3
#endif
#define CONV_FWD_WARPS 4 // warps (row runs) per forward block
#define CONV_BWD_WARPS 8 // warps (row runs) per backward block (reduced before the atomics)

// sigmoid with ex2.approx.ftz: equal to 1/(1 + __expf(−u)) wherever that is not flushed
// (a flushed e^−u only meets 1 + e^−u = 1 either way).
__device__ __forceinline__ float conv_sigmoid(float u) { return __fdividef(1.f, 1.f + ex2(-u * LOG2E_F)); }

// First tap j whose source t − K + 1 + j lies inside the row and the token's document.
__device__ __forceinline__ int conv_lo(const int* __restrict__ seg, int r, int t) {
    return max((seg != nullptr ? seg[r] : 0) + CONV_K - 1 - t, 0);
}

// A batch of NB rows from rb needs no first-tap logic when every row r = rb + q uses all
// taps: no sequence wrap, t0 = rb % T >= 3 and seg[r] + 3 <= t0 + q.
template <int NB>
__device__ __forceinline__ bool conv_batch_full_taps(const int* __restrict__ seg, int rb, int t0, int T) {
    if (t0 < CONV_K - 1 || t0 + NB > T) return false;
    if (seg == nullptr) return true;
    int m = seg[rb];
#pragma unroll
    for (int q = 1; q < NB; ++q) m = max(m, seg[rb + q] - q);
    return m + CONV_K - 1 <= t0;
}

// Raw bf16 of VC channels (VC = 1: in the low half).
template <int VC>
__device__ __forceinline__ u32 conv_ld(const bf16* p) {
    if constexpr (VC == 2) return __ldg(reinterpret_cast<const unsigned int*>(p));
    else return (u32)__ldg(reinterpret_cast<const unsigned short*>(p));
}
template <int VC>
__device__ __forceinline__ void conv_unpack(u32 w, float (&v)[VC]) {
    v[0] = __uint_as_float(w << 16);
    if constexpr (VC == 2) v[1] = __uint_as_float(w & 0xffff0000u);
}
template <int VC>
__device__ __forceinline__ void conv_st(bf16* p, const float (&v)[VC]) {
    if constexpr (VC == 2) *reinterpret_cast<bf162*>(p) = __floats2bfloat162_rn(v[0], v[1]);
    else *p = tobf(v[0]);
}
template <int VC>
__device__ __forceinline__ void conv_params(const float* __restrict__ w, const float* __restrict__ bias, int c0,
                                            float (&wc)[VC][CONV_K], float (&bc)[VC]) {
#pragma unroll
    for (int k = 0; k < VC; ++k) {
#pragma unroll
        for (int j = 0; j < CONV_K; ++j) wc[k][j] = w[(c0 + k) * CONV_K + j];
        bc[k] = bias[c0 + k];
    }
}
// x of rows r0 − 3 .. r0 − 1 (0 before row 0).
template <int VC>
__device__ __forceinline__ void conv_window(const bf16* __restrict__ x, int sx, int r0, int c0,
                                            float (&xw)[CONV_K - 1][VC]) {
#pragma unroll
    for (int q = 0; q < CONV_K - 1; ++q) {
        const int r = r0 - (CONV_K - 1) + q;
        conv_unpack<VC>(r >= 0 ? conv_ld<VC>(x + (size_t)r * sx + c0) : 0u, xw[q]);
    }
}

// Forward of rows rb .. rb + NB − 1 (MASKED: rows from r1 on skipped, first taps per row).
template <int VC, bool MASKED>
__device__ __forceinline__ void conv_fwd_batch(const bf16* __restrict__ x, int sx, const int* __restrict__ seg,
                                               bf16* __restrict__ y, int sy, const float (&wc)[VC][CONV_K],
                                               const float (&bc)[VC], float (&xw)[CONV_K - 1][VC], int rb, int t0,
                                               int r1, int T, int c0) {
    constexpr int NB = CONV_FWD_NB;
    u32 raw[NB];
    const bf16* xp = x + (size_t)rb * sx + c0;
#pragma unroll
    for (int q = 0; q < NB; ++q) {  // pointer bumps: hoisted q·stride offsets would pin 2 registers each
        raw[q] = (!MASKED || rb + q < r1) ? conv_ld<VC>(xp) : 0u;
        xp += sx;
    }
    float xf[NB + CONV_K - 1][VC];
#pragma unroll
    for (int q = 0; q < CONV_K - 1; ++q)
#pragma unroll
        for (int k = 0; k < VC; ++k) xf[q][k] = xw[q][k];
#pragma unroll
    for (int q = 0; q < NB; ++q) conv_unpack<VC>(raw[q], xf[q + CONV_K - 1]);
    bf16* yp = y + (size_t)rb * sy + c0;
    int t = t0;
#pragma unroll
    for (int q = 0; q < NB; ++q) {
        const int r = rb + q;
        if (!MASKED || r < r1) {
            int lo = 0;
            if (MASKED) {
                lo = conv_lo(seg, r, t);
                t = t + 1 == T ? 0 : t + 1;
            }
            float o[VC];
#pragma unroll
            for (int k = 0; k < VC; ++k) {
                float u = bc[k];
#pragma unroll
                for (int j = 0; j < CONV_K; ++j)
                    if (!MASKED || j >= lo) u = fmaf(wc[k][j], xf[q + j][k], u);
                o[k] = u * conv_sigmoid(u);
            }
            conv_st<VC>(yp, o);
        }
        yp += sy;
    }
#pragma unroll
    for (int q = 0; q < CONV_K - 1; ++q)
#pragma unroll
        for (int k = 0; k < VC; ++k) xw[q][k] = xf[NB + q][k];
}

template <int VC>
__device__ __forceinline__ void conv_fwd_thread(const bf16* __restrict__ x, int sx, const float* __restrict__ w,
                                                const float* __restrict__ bias, const int* __restrict__ seg,
                                                bf16* __restrict__ y, int sy, int rows, int T, int D) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int c0 = (blockIdx.x * 32 + lane) * VC;
    if (c0 >= D) return;
    float wc[VC][CONV_K], bc[VC];
    conv_params<VC>(w, bias, c0, wc, bc);
#pragma unroll 1
    for (int run = blockIdx.y * CONV_FWD_WARPS + warp; run < (rows + CONV_RUN - 1) / CONV_RUN;
         run += gridDim.y * CONV_FWD_WARPS) {
        const int r0 = run * CONV_RUN, r1 = min(r0 + CONV_RUN, rows);
        float xw[CONV_K - 1][VC];
        conv_window<VC>(x, sx, r0, c0, xw);
        int t0 = r0 % T;  // rb % T, stepped
#pragma unroll 1
        for (int rb = r0; rb < r1; rb += CONV_FWD_NB) {
            if (rb + CONV_FWD_NB <= r1 && conv_batch_full_taps<CONV_FWD_NB>(seg, rb, t0, T))
                conv_fwd_batch<VC, false>(x, sx, seg, y, sy, wc, bc, xw, rb, t0, r1, T, c0);
            else
                conv_fwd_batch<VC, true>(x, sx, seg, y, sy, wc, bc, xw, rb, t0, r1, T, c0);
            t0 += CONV_FWD_NB;
            if (t0 >= T) t0 %= T;
        }
    }
}

// y[r, c] = bf16(silu(bias[c] + Σ_j w[c, j]·x[r − 3 + j, c])), w: [D, 4] fp32.
// Block: 32 lanes (channel groups of VC) × CONV_FWD_WARPS warps; warps grid-stride over runs
// of CONV_RUN rows. Grid: (ceil(D / (32·VC)), run blocks).
extern "C" __global__ void __launch_bounds__(32 * CONV_FWD_WARPS) conv1d_silu_fwd(
    const bf16* __restrict__ x, int sx, const float* __restrict__ w, const float* __restrict__ bias,
    const int* __restrict__ seg, bf16* __restrict__ y, int sy, int rows, int T, int D, int pairs) {
    if (pairs) conv_fwd_thread<2>(x, sx, w, bias, seg, y, sy, rows, T, D);
    else conv_fwd_thread<1>(x, sx, w, bias, seg, y, sy, rows, T, D);
}

// Backward of rows rb .. rb + NBT − 1 (rows from valid_end on: du = 0, no loads): du of those
// rows, their dw/dbias terms (ACC), and dx of rows rb − 3 .. rb + NBT − 4 (those in
// [r0, r1)) from the batch's and the window's du. MASKED: first taps per row.
template <int VC, bool MASKED, int NBT, bool ACC>
__device__ __forceinline__ void conv_bwd_batch(const bf16* __restrict__ x, int sx, const bf16* __restrict__ dy,
                                               int sdy, bf16* __restrict__ dx, int sdx, const int* __restrict__ seg,
                                               const float (&wc)[VC][CONV_K], const float (&bc)[VC],
                                               float (&xw)[CONV_K - 1][VC], float (&duw)[CONV_K - 1][VC],
                                               int (&lw)[CONV_K - 1], float (&acc)[CONV_K + 1][VC], int rb, int t0,
                                               int valid_end, int r0, int r1, int T, int c0) {
    constexpr int H = CONV_K - 1;
    u32 rx[NBT], rg[NBT];
    int lt[NBT + H];
    const bf16* xp = x + (size_t)rb * sx + c0;
    const bf16* gp = dy + (size_t)rb * sdy + c0;
    int t = t0;
#pragma unroll
    for (int q = 0; q < NBT; ++q) {
        const bool valid = !MASKED || rb + q < valid_end;
        rx[q] = valid ? conv_ld<VC>(xp) : 0u;
        rg[q] = valid ? conv_ld<VC>(gp) : 0u;
        xp += sx;  // pointer bumps: hoisted q·stride offsets would pin 2 registers each
        gp += sdy;
        if (MASKED) {
            lt[H + q] = valid ? conv_lo(seg, rb + q, t) : CONV_K;
            t = t + 1 == T ? 0 : t + 1;
        } else {
            lt[H + q] = 0;
        }
    }
    float xf[NBT + H][VC], du[NBT + H][VC];
#pragma unroll
    for (int q = 0; q < H; ++q) {
        lt[q] = lw[q];
#pragma unroll
        for (int k = 0; k < VC; ++k) {
            xf[q][k] = xw[q][k];
            du[q][k] = duw[q][k];
        }
    }
#pragma unroll
    for (int q = 0; q < NBT; ++q) conv_unpack<VC>(rx[q], xf[H + q]);
#pragma unroll
    for (int q = 0; q < NBT; ++q) {
        const int lo = lt[H + q];
        float g[VC];
        conv_unpack<VC>(rg[q], g);
#pragma unroll
        for (int k = 0; k < VC; ++k) {
            float u = bc[k];
#pragma unroll
            for (int j = 0; j < CONV_K; ++j)
                if (!MASKED || j >= lo) u = fmaf(wc[k][j], xf[q + j][k], u);
            const float s = conv_sigmoid(u);
            const float d = g[k] * s * (1.f + u * (1.f - s));  // 0 for rows past valid_end
            du[H + q][k] = d;
            if (ACC) {
                acc[CONV_K][k] += d;
#pragma unroll
                for (int j = 0; j < CONV_K; ++j)
                    if (!MASKED || j >= lo) acc[j][k] = fmaf(d, xf[q + j][k], acc[j][k]);
            }
        }
    }
    // Output o = s + 3 − j reads source s through tap j when its first tap lt(o) <= j.
    bf16* dp = dx + (ptrdiff_t)(rb - H) * sdx + c0;
#pragma unroll
    for (int q = 0; q < NBT; ++q) {
        const int s = rb - H + q;
        float o[VC];
#pragma unroll
        for (int k = 0; k < VC; ++k) {
            float gsum = 0.f;
#pragma unroll
            for (int j = CONV_K - 1; j >= 0; --j)
                if (!MASKED || lt[q + H - j] <= j) gsum = fmaf(wc[k][j], du[q + H - j][k], gsum);
            o[k] = gsum;
        }
        if (s >= r0 && s < r1) conv_st<VC>(dp, o);
        dp += sdx;
    }
#pragma unroll
    for (int q = 0; q < H; ++q) {
        lw[q] = lt[NBT + q];
#pragma unroll
        for (int k = 0; k < VC; ++k) {
            xw[q][k] = xf[NBT + q][k];
            duw[q][k] = du[NBT + q][k];
        }
    }
}

// One warp's run of rows: dx of rows [r0, r1), its dw/dbias partial sums in acc.
template <int VC>
__device__ __forceinline__ void conv_bwd_run(const bf16* __restrict__ x, int sx, const float* __restrict__ w,
                                             const float* __restrict__ bias, const int* __restrict__ seg,
                                             const bf16* __restrict__ dy, int sdy, bf16* __restrict__ dx, int sdx,
                                             int rows, int T, int D, float (&acc)[CONV_K + 1][VC]) {
    constexpr int NB = CONV_BWD_NB, H = CONV_K - 1;
    static_assert(CONV_RUN % CONV_BWD_NB == 0 && CONV_RUN % CONV_FWD_NB == 0, "runs hold whole batches");
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int c0 = (blockIdx.x * 32 + lane) * VC;
    const int r0 = (blockIdx.y * CONV_BWD_WARPS + warp) * CONV_RUN;
    if (c0 >= D || r0 >= rows) return;
    const int r1 = min(r0 + CONV_RUN, rows);
    float wc[VC][CONV_K], bc[VC];
    conv_params<VC>(w, bias, c0, wc, bc);
    float xw[H][VC], duw[H][VC];
    int lw[H];
    conv_window<VC>(x, sx, r0, c0, xw);
    // The window's du and first taps only reach dx rows before r0, which this run skips.
#pragma unroll
    for (int q = 0; q < H; ++q) {
        lw[q] = 0;
#pragma unroll
        for (int k = 0; k < VC; ++k) duw[q][k] = 0.f;
    }
    int rb = r0, t0 = r0 % T;  // t0 = rb % T, stepped
#pragma unroll 1
    for (; rb < r1; rb += NB) {
        // Window rows rb − 2, rb − 1 reach this batch's dx rows through taps >= 2, >= 1.
        if (rb + NB <= r1 && lw[1] <= 2 && lw[2] <= 1 && conv_batch_full_taps<NB>(seg, rb, t0, T))
            conv_bwd_batch<VC, false, NB, true>(x, sx, dy, sdy, dx, sdx, seg, wc, bc, xw, duw, lw, acc, rb, t0, r1,
                                                r0, r1, T, c0);
        else
            conv_bwd_batch<VC, true, NB, true>(x, sx, dy, sdy, dx, sdx, seg, wc, bc, xw, duw, lw, acc, rb, t0, r1,
                                               r0, r1, T, c0);
        t0 += NB;
        if (t0 >= T) t0 %= T;
    }
    // dx of the run's last 3 rows: du of the 3 rows after it (the next run's, or none).
    conv_bwd_batch<VC, true, H, false>(x, sx, dy, sdy, dx, sdx, seg, wc, bc, xw, duw, lw, acc, rb, t0,
                                       min(r1 + H, rows), r0, r1, T, c0);
}

// du[r] = dy[r]·silu'(u[r]) (u recomputed); dx[s] = Σ_j w[j]·du[s + 3 − j] over outputs whose
// tap j reads s (written, bf16); dw[c, j] += Σ_r du[r]·x[r − 3 + j]; dbias[c] += Σ_r du[r].
// Block: 32 lanes (channel groups of VC) × CONV_BWD_WARPS warps, each warp one run of
// CONV_RUN rows; the warps' partial sums meet in shared memory, one atomic per block, channel
// and tap. Grid: (ceil(D / (32·VC)), ceil(rows / (CONV_BWD_WARPS·CONV_RUN))).
extern "C" __global__ void __launch_bounds__(32 * CONV_BWD_WARPS, CONV_BWD_MIN_BLOCKS) conv1d_silu_bwd(
    const bf16* __restrict__ x, int sx, const float* __restrict__ w, const float* __restrict__ bias,
    const int* __restrict__ seg, const bf16* __restrict__ dy, int sdy, bf16* __restrict__ dx, int sdx,
    float* __restrict__ dw, float* __restrict__ dbias, int rows, int T, int D, int pairs) {
    __shared__ __align__(16) float red[CONV_BWD_WARPS][CONV_K + 1][64];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int vc = pairs ? 2 : 1;
    if (pairs) {
        float acc[CONV_K + 1][2] = {};
        conv_bwd_run<2>(x, sx, w, bias, seg, dy, sdy, dx, sdx, rows, T, D, acc);
#pragma unroll
        for (int j = 0; j <= CONV_K; ++j)
            *reinterpret_cast<float2*>(&red[warp][j][2 * lane]) = make_float2(acc[j][0], acc[j][1]);
    } else {
        float acc[CONV_K + 1][1] = {};
        conv_bwd_run<1>(x, sx, w, bias, seg, dy, sdy, dx, sdx, rows, T, D, acc);
#pragma unroll
        for (int j = 0; j <= CONV_K; ++j) red[warp][j][lane] = acc[j][0];
    }
    __syncthreads();
    const int nch = 32 * vc;
    for (int i = threadIdx.x; i < (CONV_K + 1) * nch; i += blockDim.x) {
        const int j = i / nch, cl = i - j * nch;
        const int c = blockIdx.x * nch + cl;
        if (c >= D) continue;
        float s = 0.f;
#pragma unroll
        for (int q = 0; q < CONV_BWD_WARPS; ++q) s += red[q][j][cl];
        if (j < CONV_K) atomicAdd(dw + c * CONV_K + j, s);
        else atomicAdd(dbias + c, s);
    }
}

// ------------------------------------------------------------------------------------------
// Selective scan (selective_scan_ref semantics). Per step:
//   dt = softplus(delta + delta_bias); h = exp(dt·A)·h + dt·B·x; y = C·h + D·x;
//   out = y·silu(z) (z may be null: out = y).
// The forward writes optional y_out (pre-gate y, the GMU memory) and ckpt ([B][nck][D][N]
// fp32, the state before steps 0, SCAN_CKPT_EVERY, 2·SCAN_CKPT_EVERY, ...), which the
// backward reads.
// The backward writes dx, ddelta (pre-softplus), dz (bf16) and adds into dbc_acc ([rows, 32]
// fp32: dB then dC), da_log, dd_skip, ddelta_bias (fp32); dy_extra (may be null) is a
// gradient on the pre-gate y.

// dB[r, k] = bf16(acc[r, k]), dC[r, k] = bf16(acc[r, 16 + k]) (rows of stride s).
extern "C" __global__ void scan_bc_grad_out(const float* __restrict__ acc, bf16* __restrict__ dB,
                                            bf16* __restrict__ dC, int s, int rows) {
    const long long n = (long long)rows * 2 * SCAN_N;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const long long r = i >> 5;
        const int kk = (int)(i & 31);
        const float v = acc[i];
        if (kk < SCAN_N) dB[r * s + kk] = tobf(v);
        else dC[r * s + kk - SCAN_N] = tobf(v);
    }
}

// ------------------------------------------------------------------------------------------
// Split-state selective scan: the 16 states of a channel are spread over SCAN_SPLIT = 4
// adjacent lanes (4 states each), so a (row, channel) pair gets 4 threads instead of 1 and
// the GPU gets 4× the warps to hide the per-step latency (one thread per channel, the first
// kernels, gave one warp per scheduler at SambaY shapes; retired 2026-11-29 with the v2 split
// kernels, see bench/NOTES.md). The per-(t, c) scalars (softplus, gate) are computed once by a
// staging mapping (lane = channel, coalesced) into shared memory.
#define SCAN_SPLIT 4                              // lanes per channel
#define SCAN_KP (SCAN_N / SCAN_SPLIT)             // states per lane (4: one float4)
#define SCAN_SPLIT_CH 32                          // channels per block
#define SCAN_SPLIT_THREADS (SCAN_SPLIT_CH * SCAN_SPLIT)
#define SCAN_SPLIT_WARPS (SCAN_SPLIT_THREADS / 32)

__device__ __forceinline__ float sum_over_split(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    v += __shfl_xor_sync(0xffffffffu, v, 2);
    return v;
}

// Transpose-reduction level over S values: lanes with bit M set keep the upper half (H values)
// and send the lower half to lane ^ M, which does the opposite.
template <int H, int M, int S>
__device__ __forceinline__ void transpose_reduce_lv(float (&v)[S], int lane) {
    const bool upper = (lane & M) != 0;
#pragma unroll
    for (int i = 0; i < H; ++i) {
        const float lo = v[i], hi = v[i + H];
        const float send = upper ? lo : hi;
        const float keep = upper ? hi : lo;
        v[i] = keep + __shfl_xor_sync(0xffffffffu, send, M);
    }
}

// ------------------------------------------------------------------------------------------
// Split-state scan: forward v3, backward v4 (v3's backward, `split3`, was retired 2026-11-29:
// bench/NOTES.md, "Retired kernel variants"). v3 took the per-step latency chains off the
// recurrence so that a warp overlaps many steps (v2's
// forward stored each step's y right after two shuffles, and the compiler could not move the
// next step's shared loads above that store):
// - the decay exponent is dt·(A·log2 e), and a state reset is folded into it (dt staged as
//   +inf at a reset: exp2(−inf) = 0), so no keep multiply and no keep array;
// - forward: 16 steps unrolled with each lane's y partials in registers, then one transposed
//   4-lane reduction (12 shuffles per 16 steps instead of 32), chunks of SCAN_CKPT steps;
// - backward: the per-step scalars packed in one float4 (one shared load), the states'
//   recompute and the reverse (adjoint) walk in groups of 4 steps whose shared stores come
//   after all their loads.
#define SCAN3_GROUP 16       // forward steps unrolled between y reductions
#define SCAN3_Y_STRIDE 34    // sY row stride: the 4 (8) lanes of a channel store rows 4 (2) apart, ≡ 8 (4) banks
#define SCAN3_RGROUP 4       // backward steps whose loads precede their stores

// A·log2(e) for the exponent, kept below −1e−30 so that +inf·A stays −inf (a reset) even if
// −exp(a_log) underflows to −0 (exp2(dt·−1e−30) rounds to 1 as exp(dt·−0) does).
__device__ __forceinline__ float scan_decay_rate(float a_log_v) {
    return fminf(-expf(a_log_v) * LOG2E_F, -1e-30f);
}

// Forward. Block: 32 channels × L lanes (L = 4: 4 states per lane, 4 warps; L = 8: 2 states
// per lane, 8 warps, for grids too small to fill the GPU: twice the warps per SM at SambaY
// d8); grid (ceil(D / 32), B). Per chunk of SCAN_CKPT steps: stage (lane = channel: softplus,
// gate, reset; registers prefetched during the previous chunk) → barrier → prefetch the next
// chunk, checkpoint, recurrence → barrier → coalesced write of the chunk's outputs.
template <int L>
__device__ __forceinline__ void scan_fwd_split_impl(
    const bf16* __restrict__ x, int sx, const bf16* __restrict__ delta, int sd, const bf16* __restrict__ z, int sz,
    const bf16* __restrict__ Bm, const bf16* __restrict__ Cm, int sbc, const float* __restrict__ delta_bias,
    const float* __restrict__ a_log, const float* __restrict__ d_skip, const int* __restrict__ seg,
    bf16* __restrict__ out, int so, bf16* __restrict__ y_out, int sy, float* __restrict__ ckpt, int T, int D) {
    constexpr int KP = SCAN_N / L;             // states per lane
    constexpr int THREADS = SCAN_SPLIT_CH * L;
    __shared__ __align__(16) float2 sStep[SCAN_CKPT][SCAN_SPLIT_CH];  // (dt or +inf at a reset, dt·x)
    __shared__ __align__(16) float sBC[SCAN_CKPT][2 * SCAN_N];
    __shared__ float sY[SCAN_CKPT][SCAN3_Y_STRIDE];                   // C·h summed over the L lanes
    __shared__ float2 sXG[SCAN_CKPT][SCAN_SPLIT_CH];                  // (D·x, gate): the output's own
    constexpr int PER = SCAN_CKPT * SCAN_SPLIT_CH / THREADS;          // staged steps per thread
    constexpr int STEP_STRIDE = THREADS / SCAN_SPLIT_CH;              // L
    const int tid = threadIdx.x, b = blockIdx.y, c0 = blockIdx.x * SCAN_SPLIT_CH;
    const size_t row0 = (size_t)b * T;
    const int nck = (T + SCAN_CKPT_EVERY - 1) / SCAN_CKPT_EVERY;  // checkpoints per sequence
    static_assert(SCAN3_GROUP == SCAN_CKPT_EVERY, "a checkpoint before each group of steps");
    // Staging / output role: channel column lc, steps ls + STEP_STRIDE·q.
    const int lc = tid & 31, ls = tid >> 5;
    const int cl = c0 + lc;
    const bool lactive = cl < D;
    const int ccl = lactive ? cl : D - 1;
    const float lbias = delta_bias[ccl], ldsk = d_skip[ccl];
    // Recurrence role: channel ch, states KP·sub .. KP·sub + KP − 1.
    const int ch = tid / L, sub = tid % L;
    const int c = c0 + ch;
    const bool active = c < D;
    const int cc = active ? c : D - 1;
    float A2[KP], h[KP];
#pragma unroll
    for (int j = 0; j < KP; ++j) {
        A2[j] = scan_decay_rate(a_log[cc * SCAN_N + sub * KP + j]);
        h[j] = 0.f;
    }
    const bf16 zero = tobf(0.f);

    // raw bf16 until staging: a conversion here would wait for the load (ncu, 2026-11-29:
    // a quarter of the d8 forward's stall samples sat on the B/C conversion)
    bf16 px[PER], pd[PER], pz[PER], pbc[PER];
    int pseg[PER];
    const bf16* __restrict__ bcl = lc < SCAN_N ? Bm + lc : Cm + (lc - SCAN_N);  // this column of B or C
    // Loads the chunk starting at t1 into the prefetch registers (rows past T repeat row T − 1;
    // pointers stepped per load keep the address registers few).
#define SCAN3_LOAD(t1)                                                                      \
    {                                                                                       \
        const int tb = (t1) + ls;                                                           \
        if ((t1) + SCAN_CKPT <= T) {                                                        \
            const size_t r = row0 + tb;                                                     \
            const bf16* xp = x + r * sx + ccl;                                              \
            const bf16* dp = delta + r * sd + ccl;                                          \
            const bf16* zp = z + r * sz + ccl;                                              \
            const bf16* bp = bcl + r * sbc;                                                 \
            const int* gp = seg + r;                                                        \
            _Pragma("unroll") for (int q = 0; q < PER; ++q) {                               \
                px[q] = *xp;                                                                \
                pd[q] = *dp;                                                                \
                pz[q] = z ? *zp : zero;                                                     \
                pbc[q] = *bp;                                                               \
                pseg[q] = seg ? *gp : 0;                                                    \
                xp += STEP_STRIDE * sx;                                                     \
                dp += STEP_STRIDE * sd;                                                     \
                zp += STEP_STRIDE * sz;                                                     \
                bp += STEP_STRIDE * sbc;                                                    \
                gp += STEP_STRIDE;                                                          \
            }                                                                               \
        } else {                                                                            \
            _Pragma("unroll") for (int q = 0; q < PER; ++q) {                               \
                const size_t r = row0 + min(tb + STEP_STRIDE * q, T - 1);                   \
                px[q] = x[r * sx + ccl];                                                    \
                pd[q] = delta[r * sd + ccl];                                                \
                pz[q] = z ? z[r * sz + ccl] : zero;                                         \
                pbc[q] = bcl[r * sbc];                                                      \
                pseg[q] = seg ? seg[r] : 0;                                                 \
            }                                                                               \
        }                                                                                   \
    }

    SCAN3_LOAD(0);
    for (int t0 = 0; t0 < T; t0 += SCAN_CKPT) {
        // Stage: steps past T get dt = 0, x = 0, B = C = 0 (the state passes through).
#pragma unroll
        for (int q = 0; q < PER; ++q) {
            const int i = ls + STEP_STRIDE * q, t = t0 + i;
            const bool ok = t < T;
            const float xv = ok ? bf(px[q]) : 0.f;
            const float dt = ok ? softplus_f(bf(pd[q]) + lbias) : 0.f;
            const bool reset = ok && (t == 0 || (seg != nullptr && pseg[q] == t));
            sStep[i][lc] = make_float2(reset ? __int_as_float(0x7f800000) : dt, dt * xv);
            sBC[i][lc] = ok ? bf(pbc[q]) : 0.f;
            float gv = 1.f;
            if (z != nullptr) {
                const float zv = bf(pz[q]);
                gv = zv * sigmoid_f(zv);
            }
            sXG[i][lc] = make_float2(ldsk * xv, gv);
        }
        __syncthreads();
        if (t0 + SCAN_CKPT < T) SCAN3_LOAD(t0 + SCAN_CKPT);
#pragma unroll 1
        for (int g0 = 0; g0 < SCAN_CKPT; g0 += SCAN3_GROUP) {
            if (ckpt != nullptr && active && t0 + g0 < T) {
                // [B][nck][D][N]: a lane's states are contiguous, one vector store
                float* dst = ckpt + ((size_t)(b * nck + (t0 + g0) / SCAN_CKPT_EVERY) * D + c) * SCAN_N + sub * KP;
                if constexpr (KP == 4) *reinterpret_cast<float4*>(dst) = make_float4(h[0], h[1], h[2], h[3]);
                else *reinterpret_cast<float2*>(dst) = make_float2(h[0], h[1]);
            }
            float ya[SCAN3_GROUP];
#pragma unroll
            for (int u = 0; u < SCAN3_GROUP; ++u) {
                const int i = g0 + u;
                const float2 s = sStep[i][ch];
                float Bv[KP], Cv[KP];
                if constexpr (KP == 4) {
                    const float4 B4 = *reinterpret_cast<const float4*>(&sBC[i][sub * KP]);
                    const float4 C4 = *reinterpret_cast<const float4*>(&sBC[i][SCAN_N + sub * KP]);
                    Bv[0] = B4.x, Bv[1] = B4.y, Bv[2] = B4.z, Bv[3] = B4.w;
                    Cv[0] = C4.x, Cv[1] = C4.y, Cv[2] = C4.z, Cv[3] = C4.w;
                } else {
                    const float2 B2 = *reinterpret_cast<const float2*>(&sBC[i][sub * KP]);
                    const float2 C2 = *reinterpret_cast<const float2*>(&sBC[i][SCAN_N + sub * KP]);
                    Bv[0] = B2.x, Bv[1] = B2.y;
                    Cv[0] = C2.x, Cv[1] = C2.y;
                }
#pragma unroll
                for (int j = 0; j < KP; ++j) h[j] = fmaf(ex2(s.x * A2[j]), h[j], __fmul_rn(s.y, Bv[j]));
                if constexpr (KP == 4) ya[u] = fmaf(Cv[0], h[0], Cv[1] * h[1]) + fmaf(Cv[2], h[2], Cv[3] * h[3]);
                else ya[u] = fmaf(Cv[0], h[0], Cv[1] * h[1]);
            }
            // Sum over the channel's L lanes: lane sub ends with steps KP·sub .. KP·sub + KP − 1.
            if constexpr (L == 8) {
                transpose_reduce_lv<8, 4, SCAN3_GROUP>(ya, tid);
                transpose_reduce_lv<4, 2, SCAN3_GROUP>(ya, tid);
                transpose_reduce_lv<2, 1, SCAN3_GROUP>(ya, tid);
            } else {
                transpose_reduce_lv<8, 2, SCAN3_GROUP>(ya, tid);
                transpose_reduce_lv<4, 1, SCAN3_GROUP>(ya, tid);
            }
#pragma unroll
            for (int j = 0; j < KP; ++j) sY[g0 + KP * sub + j][ch] = ya[j];
        }
        __syncthreads();
        bf16* __restrict__ ob = out + (row0 + t0) * so + cl;  // 32-bit offsets per row from here
        bf16* __restrict__ yb = y_out != nullptr ? y_out + (row0 + t0) * sy + cl : nullptr;
#pragma unroll
        for (int q = 0; q < PER; ++q) {
            const int i = ls + STEP_STRIDE * q;
            if (lactive && t0 + i < T) {
                const float2 xg = sXG[i][lc];
                const float yv = sY[i][lc] + xg.x;
                if (yb != nullptr) yb[i * sy] = tobf(yv);
                ob[i * so] = tobf(yv * xg.y);
            }
        }
        // The next staging may overwrite sStep and sBC: every recurrence read them before the
        // barrier above; sY is next written after the next staging's barrier.
    }
#undef SCAN3_LOAD
}

#define SCAN_FWD_ARGS                                                                                              \
    const bf16 *__restrict__ x, int sx, const bf16 *__restrict__ delta, int sd, const bf16 *__restrict__ z, int sz,   \
        const bf16 *__restrict__ Bm, const bf16 *__restrict__ Cm, int sbc, const float *__restrict__ delta_bias,      \
        const float *__restrict__ a_log, const float *__restrict__ d_skip, const int *__restrict__ seg,               \
        bf16 *__restrict__ out, int so, bf16 *__restrict__ y_out, int sy, float *__restrict__ ckpt, int T, int D
#define SCAN_FWD_PASS x, sx, delta, sd, z, sz, Bm, Cm, sbc, delta_bias, a_log, d_skip, seg, out, so, y_out, sy, ckpt, T, D

extern "C" __global__ void __launch_bounds__(SCAN_SPLIT_THREADS, 4) selective_scan_fwd_split(SCAN_FWD_ARGS) {
    scan_fwd_split_impl<SCAN_SPLIT>(SCAN_FWD_PASS);
}
// 8 lanes per channel: 256 threads, at most 80 registers (3 blocks per SM).
extern "C" __global__ void __launch_bounds__(2 * SCAN_SPLIT_THREADS, 3) selective_scan_fwd_split8(SCAN_FWD_ARGS) {
    scan_fwd_split_impl<8>(SCAN_FWD_PASS);
}

// One state update of a lane's 4 states from a staged step (s: x, dt, ḡ, dt or +inf).
__device__ __forceinline__ void scan3_state_step(float (&h)[SCAN_KP], const float (&A2)[SCAN_KP], const float4 s,
                                                 const float4 B4) {
    const float dtx = s.y * s.x;
    h[0] = fmaf(ex2(s.w * A2[0]), h[0], __fmul_rn(dtx, B4.x));
    h[1] = fmaf(ex2(s.w * A2[1]), h[1], __fmul_rn(dtx, B4.y));
    h[2] = fmaf(ex2(s.w * A2[2]), h[2], __fmul_rn(dtx, B4.z));
    h[3] = fmaf(ex2(s.w * A2[3]), h[3], __fmul_rn(dtx, B4.w));
}

// ------------------------------------------------------------------------------------------
// Backward v4. Block: 32 channels × 4 lanes (4 warps); grid (ceil(D / 32), B, T segments);
// dynamic shared memory as the carve-up below (ops.rs SCAN_SPLIT_BWD_SMEM, 54 KB: 4 blocks per
// SM; at most 128 registers). Per interval of SCAN_CKPT steps (walked backwards): stage the
// inputs (lane = channel) as float4 (x, dt, ḡ, dt or +inf at a reset), recompute the states
// from the checkpoint (sub-chunks of SCAN_SUB steps kept in shared memory), run λ backwards. A
// step's dx, dΔ and y replace its staged float4 and are written out after the interval (dz from
// y, dout and z reloaded); dB/dC: each warp transpose-reduces its 8 channels' 8 values per lane
// (7 shuffles), parks the partial in its own, already consumed, slots of that step's states,
// and after each sub-chunk the 4 warps' partials are summed with one global atomic per block,
// step and column. Beyond v3's backward:
// - fewer instructions per reverse step: λ·hp shared by dA and dΔ, Σλ·B shared by dx and dΔ
//   (dx = dt·Σλ·B + ḡ·D, dΔ = Σ A·λ·hp + x·Σλ·B); the three per-step sums over a channel's
//   4 lanes (y, Σλ·B, Σ A·λ·hp) are reduced transposed over a group of 4 steps (9 shuffles per
//   4 steps instead of 24), so lane `sub` finishes step `sub` of the group alone (softplus',
//   dx, dΔ, y and its store: once per step, not 4 times);
// - a T split when the grid leaves SMs idle (blockIdx.z: 0 walks intervals [0, ck_split),
//   1 walks [ck_split, nck); ck_split = 0: one segment). Segment 0 first runs λ alone backwards
//   over [ck_split, nck) (λ_{t−1} = exp(Δ_t·A)·(λ_t + ḡ_t·C_t): one state update per step, no
//   recompute), so both segments start from the right λ.
extern "C" __global__ void __launch_bounds__(SCAN_SPLIT_THREADS, 4) selective_scan_bwd_split(
    const bf16* __restrict__ x, int sx, const bf16* __restrict__ delta, int sd, const bf16* __restrict__ z, int sz,
    const bf16* __restrict__ Bm, const bf16* __restrict__ Cm, int sbc, const float* __restrict__ delta_bias,
    const float* __restrict__ a_log, const float* __restrict__ d_skip, const int* __restrict__ seg,
    const float* __restrict__ ckpt, const bf16* __restrict__ dout, int sdo, const bf16* __restrict__ dy_extra,
    int sde, bf16* __restrict__ dx, int sdx, bf16* __restrict__ ddelta, int sdd, bf16* __restrict__ dz, int sdz,
    float* __restrict__ dbc_acc, float* __restrict__ da_log, float* __restrict__ dd_skip,
    float* __restrict__ ddelta_bias, int T, int D, int ck_split) {
    extern __shared__ __align__(16) float smem[];
    constexpr int HS = (SCAN_SUB + 1) * SCAN_SPLIT_CH * SCAN_N;  // floats of sH
    float* sH = smem;  // [SCAN_SUB + 1][SCAN_SPLIT_CH · SCAN_N], a lane's 4 states contiguous
    float(*sBC)[2 * SCAN_N] = reinterpret_cast<float(*)[2 * SCAN_N]>(smem + HS);
    float4(*sS)[SCAN_SPLIT_CH] = reinterpret_cast<float4(*)[SCAN_SPLIT_CH]>(smem + HS + SCAN_CKPT * 2 * SCAN_N);
    constexpr int PER = SCAN_CKPT * SCAN_SPLIT_CH / SCAN_SPLIT_THREADS;  // 8 staged steps per thread
    constexpr int STEP_STRIDE = SCAN_SPLIT_THREADS / SCAN_SPLIT_CH;
    constexpr int G = SCAN3_RGROUP;
    static_assert(G == SCAN_SPLIT, "the per-step sums are reduced transposed: one step per lane");

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, b = blockIdx.y;
    const int c0 = blockIdx.x * SCAN_SPLIT_CH;
    const size_t row0 = (size_t)b * T;
    const int nck = (T + SCAN_CKPT - 1) / SCAN_CKPT;                   // intervals
    const int nck16 = (T + SCAN_CKPT_EVERY - 1) / SCAN_CKPT_EVERY;     // checkpoints
    static_assert(SCAN_SUB == SCAN_CKPT_EVERY && 2 * SCAN_SUB == SCAN_CKPT, "a checkpoint per sub-chunk");
    const bool split = ck_split > 0 && ck_split < nck;
    const int ck_lo = split && blockIdx.z == 1 ? ck_split : 0;
    const int ck_hi = split && blockIdx.z == 0 ? ck_split : nck;
    const int lc = tid & 31, ls = tid >> 5;
    const int cl = c0 + lc;
    const bool lactive = cl < D;
    const int ccl = lactive ? cl : D - 1;
    const float lbias = delta_bias[ccl];
    const int ch = tid / SCAN_SPLIT, sub = tid % SCAN_SPLIT;
    const int c = c0 + ch;
    const bool active = c < D;
    const int cc = active ? c : D - 1;
    // Column of dB/dC this lane holds after the transpose-reduction of its 8 values
    // (v[0..3]: B of states 4·sub.., v[4..7]: C of the same states).
    const int ridx = (lane >> 2) & 7, rsub = lane & 3;
    const int rcol = ridx < 4 ? rsub * SCAN_KP + ridx : SCAN_N + rsub * SCAN_KP + (ridx - 4);
    float A[SCAN_KP], A2[SCAN_KP], h[SCAN_KP], hck[SCAN_KP], lam[SCAN_KP], dA[SCAN_KP];
#pragma unroll
    for (int j = 0; j < SCAN_KP; ++j) {
        const float al = a_log[cc * SCAN_N + sub * SCAN_KP + j];
        A[j] = -expf(al);
        A2[j] = scan_decay_rate(al);
        lam[j] = 0.f;
        dA[j] = 0.f;
    }
    const float dsk = d_skip[cc];
    float dD = 0.f, dBias = 0.f;
    const float4 zero4 = make_float4(0.f, 0.f, 0.f, 0.f);

    // The interval's rows: entry q of this thread is row ls + STEP_STRIDE·q of the interval (row 0
    // again past its end, n < SCAN_CKPT only in a sequence's last interval). Loads and stores
    // index 32-bit offsets from per-interval base pointers: 64-bit index math per access was
    // most of the staging's instructions (SASS, 2026-11-29 session 6).
    auto interval_rows = [&](int n, int (&rq)[PER]) {
#pragma unroll
        for (int q = 0; q < PER; ++q) {
            const int i = ls + STEP_STRIDE * q;
            rq[q] = i < n ? i : 0;
        }
    };
    const bf16* __restrict__ bcl = lc < SCAN_N ? Bm + lc : Cm + (lc - SCAN_N);  // this column of B or C

    // Stages interval jc (lane = channel): sS = (x, dt, ḡ, dt or +inf at a reset), sBC = B, C;
    // steps past T and idle channels get zeros (ḡ = 0 keeps λ and the partials 0). All of the
    // interval's loads are issued before the first is used (raw bf16 until then), so the
    // block waits for one load latency per interval; the optional inputs (the GMU memory's
    // gradient, varlen starts) follow as a patch of this thread's own entries.
    auto stage = [&](int jc) {
        const int t0 = jc * SCAN_CKPT, n = min(SCAN_CKPT, T - t0);
        const size_t rb = row0 + t0;
        int rq[PER];
        interval_rows(n, rq);
        const bf16* __restrict__ xb = x + rb * sx + ccl;
        const bf16* __restrict__ db = delta + rb * sd + ccl;
        const bf16* __restrict__ gb = dout + rb * sdo + ccl;
        const bf16* __restrict__ zb = z ? z + rb * sz + ccl : nullptr;
        const bf16* __restrict__ bb = bcl + rb * sbc;
        bf16 lx[PER], ld[PER], lg[PER], lz[PER], lbc[PER];
        const bf16 bz = tobf(0.f);
#pragma unroll
        for (int q = 0; q < PER; ++q) {
            lx[q] = xb[rq[q] * sx];
            ld[q] = db[rq[q] * sd];
            lg[q] = gb[rq[q] * sdo];
            lz[q] = zb ? zb[rq[q] * sz] : bz;
            lbc[q] = bb[rq[q] * sbc];
        }
#pragma unroll
        for (int q = 0; q < PER; ++q) {
            const int i = ls + STEP_STRIDE * q;
            const bool ok = i < n;
            const float g = bf(lg[q]), zv = bf(lz[q]);
            float gbar = g;
            if (z != nullptr) gbar = g * zv * sigmoid_f(zv);
            const float dt = softplus_f(bf(ld[q]) + lbias);
            const bool reset = t0 + i == 0;
            sS[i][lc] = ok && lactive ? make_float4(bf(lx[q]), dt, gbar, reset ? __int_as_float(0x7f800000) : dt) : zero4;
            sBC[i][lc] = ok ? bf(lbc[q]) : 0.f;
        }
        if (dy_extra != nullptr || seg != nullptr) {
            const bf16* __restrict__ eb = dy_extra ? dy_extra + rb * sde + ccl : nullptr;
            bf16 le[PER];
            int lseg[PER];
#pragma unroll
            for (int q = 0; q < PER; ++q) {
                le[q] = eb ? eb[rq[q] * sde] : bz;
                lseg[q] = seg ? seg[rb + rq[q]] : -1;
            }
#pragma unroll
            for (int q = 0; q < PER; ++q) {
                const int i = ls + STEP_STRIDE * q;
                if (i < n && lactive) {
                    float4& e = sS[i][lc];
                    e.z += bf(le[q]);
                    if (lseg[q] == t0 + i) e.w = __int_as_float(0x7f800000);
                }
            }
        }
    };

    // Segment 0 of a split: λ at its end, from the intervals of segment 1.
    for (int jc = nck - 1; jc >= ck_hi; --jc) {
        const int n = min(SCAN_CKPT, T - jc * SCAN_CKPT);
        __syncthreads();
        stage(jc);
        __syncthreads();
#pragma unroll 4
        for (int i = n - 1; i >= 0; --i) {
            const float4 st = sS[i][ch];
            const float4 Cq = *reinterpret_cast<const float4*>(&sBC[i][SCAN_N + sub * SCAN_KP]);
            lam[0] = fmaf(st.z, Cq.x, lam[0]) * ex2(st.w * A2[0]);
            lam[1] = fmaf(st.z, Cq.y, lam[1]) * ex2(st.w * A2[1]);
            lam[2] = fmaf(st.z, Cq.z, lam[2]) * ex2(st.w * A2[2]);
            lam[3] = fmaf(st.z, Cq.w, lam[3]) * ex2(st.w * A2[3]);
        }
    }

    for (int jc = ck_hi - 1; jc >= ck_lo; --jc) {
        const int t0 = jc * SCAN_CKPT, n = min(SCAN_CKPT, T - t0);
        const int nsub = (n + SCAN_SUB - 1) / SCAN_SUB;
        __syncthreads();
        {  // the checkpoints' loads first (the states before both sub-chunks): their latency
           // overlaps the staging's
            const float* src = ckpt + ((size_t)(b * nck16 + 2 * jc) * D + cc) * SCAN_N + sub * SCAN_KP;
            const float4 c0v = *reinterpret_cast<const float4*>(src);
            hck[0] = c0v.x, hck[1] = c0v.y, hck[2] = c0v.z, hck[3] = c0v.w;
            if (nsub > 1) {  // the next checkpoint: D·N floats on
                const float4 c1v = *reinterpret_cast<const float4*>(src + (size_t)D * SCAN_N);
                h[0] = c1v.x, h[1] = c1v.y, h[2] = c1v.z, h[3] = c1v.w;
            }
        }
        stage(jc);
        __syncthreads();

        for (int s = nsub - 1; s >= 0; --s) {
            const int i0 = s * SCAN_SUB;
            if (s == 0) {
#pragma unroll
                for (int j = 0; j < SCAN_KP; ++j) h[j] = hck[j];
            }
            // Recompute the sub-chunk's states into sH (slot 0: the state before its first step,
            // slot q + 1: after step q), G steps' loads before their stores.
            *reinterpret_cast<float4*>(&sH[ch * SCAN_N + sub * SCAN_KP]) = make_float4(h[0], h[1], h[2], h[3]);
#pragma unroll 1
            for (int q0 = 0; q0 < SCAN_SUB; q0 += G) {
                float4 S[G], B4[G];
#pragma unroll
                for (int u = 0; u < G; ++u) {
                    S[u] = sS[i0 + q0 + u][ch];
                    B4[u] = *reinterpret_cast<const float4*>(&sBC[i0 + q0 + u][sub * SCAN_KP]);
                }
#pragma unroll
                for (int u = 0; u < G; ++u) {
                    scan3_state_step(h, A2, S[u], B4[u]);
                    *reinterpret_cast<float4*>(&sH[((q0 + u + 1) * SCAN_SPLIT_CH + ch) * SCAN_N + sub * SCAN_KP]) =
                        make_float4(h[0], h[1], h[2], h[3]);
                }
            }
            // Reverse walk, G steps at a time: all loads and math first, then the stores.
#pragma unroll 1
            for (int q0 = SCAN_SUB - G; q0 >= 0; q0 -= G) {
                float rv[G], sy[G], slb[G], spa[G];
#pragma unroll
                for (int u = G - 1; u >= 0; --u) {
                    const int q = q0 + u, i = i0 + q;
                    const float4 st = sS[i][ch];
                    const float xv = st.x, dt = st.y, gbar = st.z;
                    const float dtx = dt * xv;
                    // slot q + 1 holds h_q, slot q the state before it
                    const float4 h4 = *reinterpret_cast<const float4*>(&sH[((q + 1) * SCAN_SPLIT_CH + ch) * SCAN_N + sub * SCAN_KP]);
                    const float4 p4 = *reinterpret_cast<const float4*>(&sH[(q * SCAN_SPLIT_CH + ch) * SCAN_N + sub * SCAN_KP]);
                    const float4 Bq = *reinterpret_cast<const float4*>(&sBC[i][sub * SCAN_KP]);
                    const float4 Cq = *reinterpret_cast<const float4*>(&sBC[i][SCAN_N + sub * SCAN_KP]);
                    const float hv[SCAN_KP] = {h4.x, h4.y, h4.z, h4.w};
                    const float hp[SCAN_KP] = {p4.x, p4.y, p4.z, p4.w};
                    const float Bv[SCAN_KP] = {Bq.x, Bq.y, Bq.z, Bq.w};
                    const float Cv[SCAN_KP] = {Cq.x, Cq.y, Cq.z, Cq.w};
                    float ya = 0.f, lb = 0.f, pa = 0.f;
                    float v[2 * SCAN_KP];
#pragma unroll
                    for (int j = 0; j < SCAN_KP; ++j) {
                        const float hk = hv[j], Bk = Bv[j], Ck = Cv[j];
                        const float e = ex2(st.w * A2[j]);
                        ya = fmaf(Ck, hk, ya);
                        v[SCAN_KP + j] = gbar * hk;
                        lam[j] = fmaf(gbar, Ck, lam[j]);
                        lb = fmaf(lam[j], Bk, lb);
                        v[j] = lam[j] * dtx;
                        // λ·exp(dt·A) is the next step's λ; times the stored h_{t−1} it is the
                        // decay's gradient term, exactly 0 at a reset or a full decay (e = 0)
                        lam[j] *= e;
                        const float p = lam[j] * hp[j];
                        dA[j] = fmaf(p, dt, dA[j]);
                        pa = fmaf(A[j], p, pa);
                    }
                    // Sum over the warp's 8 channels: lane ends with column rcol.
                    transpose_reduce_lv<4, 16>(v, lane);
                    transpose_reduce_lv<2, 8>(v, lane);
                    transpose_reduce_lv<1, 4>(v, lane);
                    rv[u] = v[0];
                    sy[u] = ya;
                    slb[u] = lb;
                    spa[u] = pa;
                }
                // Sums over the channel's 4 lanes, transposed: lane sub ends with step q0 + sub.
                transpose_reduce_lv<2, 2>(sy, lane);
                transpose_reduce_lv<2, 2>(slb, lane);
                transpose_reduce_lv<2, 2>(spa, lane);
                transpose_reduce_lv<1, 1>(sy, lane);
                transpose_reduce_lv<1, 1>(slb, lane);
                transpose_reduce_lv<1, 1>(spa, lane);
                const int im = i0 + q0 + sub;
                const float4 sm = sS[im][ch];  // (x, dt, ḡ, −) of this lane's step
                const float dxv = fmaf(sm.y, slb[0], sm.z * dsk);
                // dt > 20 exactly when pre > 20 (softplus(20) rounds to 20).
                const float dpre = fmaf(sm.x, slb[0], spa[0]) * softplus_grad_from_dt(sm.y);
                const float yv = fmaf(dsk, sm.x, sy[0]);
                dD = fmaf(sm.z, sm.x, dD);
                dBias += dpre;
                __syncwarp();  // the warp's reads of these steps' sH and sS are done
#pragma unroll
                for (int u = 0; u < G; ++u)
                    sH[(q0 + u + 1) * SCAN_SPLIT_CH * SCAN_N + warp * 32 * SCAN_KP + rcol] = rv[u];
                sS[im][ch] = make_float4(dxv, dpre, yv, 0.f);
            }
            __syncthreads();
            // dB/dC of the sub-chunk: sum the warps' partials, one atomic per step and column.
            float* __restrict__ accb = dbc_acc + (row0 + t0 + i0) * 2 * SCAN_N;  // the sub-chunk's [step][col] rows
#pragma unroll
            for (int k = 0; k < SCAN_SUB * 2 * SCAN_N / SCAN_SPLIT_THREADS; ++k) {
                const int e = tid + k * SCAN_SPLIT_THREADS, q = e >> 5, col = e & 31, i = i0 + q;
                if (i < n) {
                    float sum = 0.f;
#pragma unroll
                    for (int w = 0; w < SCAN_SPLIT_WARPS; ++w) sum += sH[(q + 1) * SCAN_SPLIT_CH * SCAN_N + w * 32 * SCAN_KP + col];
                    atomicAdd(accb + e, sum);
                }
            }
            __syncthreads();  // before the next sub-chunk's states overwrite sH
        }
        // dz = dout·silu'(z)·y: dout and z reloaded, each half's loads before its stores
        // (loads between the stores waited one latency each; all 8 at once spilled)
        const bool with_dz = dz != nullptr && z != nullptr;
        const size_t rb = row0 + t0;
        int rq[PER];
        interval_rows(n, rq);
        const bf16* __restrict__ gb = dout + rb * sdo + ccl;
        const bf16* __restrict__ zb = with_dz ? z + rb * sz + ccl : nullptr;
        bf16* __restrict__ dxb = dx + rb * sdx + cl;
        bf16* __restrict__ ddb = ddelta + rb * sdd + cl;
        bf16* __restrict__ dzb = with_dz ? dz + rb * sdz + cl : nullptr;
#pragma unroll 1
        for (int hf = 0; hf < 2; ++hf) {
            constexpr int H = PER / 2;
            bf16 wg[H], wz[H];
            if (with_dz) {
#pragma unroll
                for (int q = 0; q < H; ++q) {
                    const int o = rq[q + hf * H];
                    wg[q] = gb[o * sdo];
                    wz[q] = zb[o * sz];
                }
            }
#pragma unroll
            for (int q = 0; q < H; ++q) {
                const int i = ls + STEP_STRIDE * (q + hf * H), o = rq[q + hf * H];
                if (i < n && lactive) {
                    const float4 res = sS[i][lc];  // (dx, dΔ, y, −)
                    dxb[o * sdx] = tobf(res.x);
                    ddb[o * sdd] = tobf(res.y);
                    if (with_dz) {
                        const float g = bf(wg[q]), zv = bf(wz[q]);
                        const float sg = sigmoid_f(zv);
                        dzb[o * sdz] = tobf(g * sg * (1.f + zv * (1.f - sg)) * res.z);
                    }
                }
            }
        }
    }
    dD = sum_over_split(dD);
    dBias = sum_over_split(dBias);
    if (active) {
#pragma unroll
        for (int j = 0; j < SCAN_KP; ++j) atomicAdd(da_log + c * SCAN_N + sub * SCAN_KP + j, dA[j] * A[j]);
        if (sub == 0) {
            atomicAdd(dd_skip + c, dD);
            atomicAdd(ddelta_bias + c, dBias);
        }
    }
}

// ------------------------------------------------------------------------------------------
// The x_proj and dt_proj weights in the padded layouts their products use: the dt rank r is
// padded to rp (a multiple of 8) with zeros, so every operand row starts 16-byte aligned and
// cuBLASLt can use its TMA kernels (a dt_proj weight row of r = 124 bf16 is 248 B: its
// products ran at a fifth of their byte floor, bench/NOTES.md).
//   wx_pad  [rp + 2·ns, D] = (wx rows 0..r, rp − r zero rows, wx rows r..r + 2·ns)
//   wdt_pad [D, rp]        = (wdt [D, r] columns, rp − r zero columns)
extern "C" __global__ void mamba_pad_weights(const bf16* __restrict__ wx, const bf16* __restrict__ wdt,
                                             bf16* __restrict__ wx_pad, bf16* __restrict__ wdt_pad, int r, int rp,
                                             int ns, int D) {
    const int nx = (rp + 2 * ns) * D, n = nx + D * rp;
    const bf16 zero = tobf(0.f);
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        if (i < nx) {
            const int row = i / D, col = i - row * D;
            wx_pad[i] = row < r ? wx[row * D + col] : row < rp ? zero : wx[(row - rp + r) * D + col];
        } else {
            const int j = i - nx, row = j / rp, col = j - row * rp;
            wdt_pad[j] = col < r ? wdt[row * r + col] : zero;
        }
    }
}

// ------------------------------------------------------------------------------------------
// Arithmetic floor probe of the scan forward (bench only: `selftest --bench-scan`; its values
// mean nothing). One thread per channel with its 16 states in registers does, per step, only
// the work every forward must do: per (t, c) the staging (bf16 x, Δ and z unpacked; Δ + bias,
// softplus in its cheapest form; Δ·x; SiLU(z); the D skip, the gate and the bf16 output) and
// per state the exponent product, 2^x, Δx·B, the state FMA and C·h. Every HBM access is gone:
// the inputs cycle through a window of SCAN_CKPT staged steps in shared memory, B and C are
// read as in the forward, the outputs go to shared memory, and a short walk per thread
// (`steps`) keeps the GPU full at any size. NPOLY of the 16 exponentials per step come from a
// degree-3 polynomial on the FMA pipe (FA4's offload) instead of MUFU.EX2. Its instruction and
// MUFU counts (ncu) bound from below every forward doing this arithmetic on this GPU; its time
// is what such a kernel reaches (bench/NOTES.md, "The scan forward's arithmetic floor").
#define FLOOR_THREADS 128

// 2^x by a degree-3 polynomial on [−0.5, 0.5] and the exponent added to the bits: 6 FMA-pipe
// instructions with the exponent product fused. No clamp for x < −126 (a correct kernel needs
// one; leaving it out only lowers the floor), and ≈ 1e−4 relative error (coarser than MUFU).
__device__ __forceinline__ float ex2_poly3_of(float dt, float a2) {
    const float magic = 12582912.f;  // 1.5·2^23: j's low mantissa bits hold round(dt·a2)
    const float j = fmaf(dt, a2, magic);
    const float f = fmaf(dt, a2, -(j - magic));
    const float p = fmaf(fmaf(fmaf(0.0555041f, f, 0.2402265f), f, 0.6931472f), f, 1.f);
    return __int_as_float(__float_as_int(p) + (__float_as_int(j) << 23));
}

template <int NPOLY>
__device__ __forceinline__ void scan_floor_fwd_impl(const uint2* __restrict__ steps_in, const float* __restrict__ bc,
                                                    const float* __restrict__ a_log, float* __restrict__ sink,
                                                    int steps) {
    __shared__ uint2 sIn[SCAN_CKPT][FLOOR_THREADS];  // bf16 (x, Δ) and (z, 0) per step and channel
    __shared__ __align__(16) float sBC[SCAN_CKPT][2 * SCAN_N];
    __shared__ bf16 sOut[SCAN_CKPT][FLOOR_THREADS];
    const int tid = threadIdx.x;
    for (int e = tid; e < SCAN_CKPT * FLOOR_THREADS; e += FLOOR_THREADS) (&sIn[0][0])[e] = steps_in[e];
    for (int e = tid; e < SCAN_CKPT * 2 * SCAN_N; e += FLOOR_THREADS) (&sBC[0][0])[e] = bc[e];
    float A2[SCAN_N], h[SCAN_N];
#pragma unroll
    for (int j = 0; j < SCAN_N; ++j) {
        A2[j] = scan_decay_rate(a_log[tid * SCAN_N + j]);
        h[j] = 0.f;
    }
    const float bias = -4.6f, dsk = 1.f;
    __syncthreads();
#pragma unroll 1
    for (int t0 = 0; t0 < steps; t0 += SCAN_CKPT) {
#pragma unroll 2
        for (int i = 0; i < SCAN_CKPT; ++i) {
            const uint2 v = sIn[i][tid];
            const float xv = __uint_as_float(v.x << 16), zv = __uint_as_float(v.y << 16);
            // softplus as log2(1 + 2^u)·ln 2 without the large-u branch (cheaper than softplus_f)
            const float u = __uint_as_float(v.x & 0xffff0000u) + bias;
            const float dt = lg2_approx(1.f + ex2(u * LOG2E_F)) * 0.6931471805599453f;
            const float dtx = dt * xv;
            float y0 = 0.f, y1 = 0.f;
#pragma unroll
            for (int q = 0; q < SCAN_N / 4; ++q) {
                const float4 B4 = *reinterpret_cast<const float4*>(&sBC[i][4 * q]);
                const float4 C4 = *reinterpret_cast<const float4*>(&sBC[i][SCAN_N + 4 * q]);
                const float Bv[4] = {B4.x, B4.y, B4.z, B4.w}, Cv[4] = {C4.x, C4.y, C4.z, C4.w};
#pragma unroll
                for (int k = 0; k < 4; ++k) {
                    const int j = 4 * q + k;
                    const float e = j < NPOLY ? ex2_poly3_of(dt, A2[j]) : ex2(dt * A2[j]);
                    h[j] = fmaf(e, h[j], dtx * Bv[k]);
                    if (k & 1) y1 = fmaf(Cv[k], h[j], y1);
                    else y0 = fmaf(Cv[k], h[j], y0);
                }
            }
            sOut[i][tid] = tobf((y0 + y1 + dsk * xv) * (zv * sigmoid_f(zv)));
        }
    }
    __syncthreads();
    float s = bf(sOut[tid % SCAN_CKPT][tid]);
#pragma unroll
    for (int j = 0; j < SCAN_N; ++j) s += h[j];
    sink[blockIdx.x * FLOOR_THREADS + tid] = s;
}

#define SCAN_FLOOR_KERNEL(NP)                                                                                   \
    extern "C" __global__ void __launch_bounds__(FLOOR_THREADS) scan_floor_fwd_p##NP(                            \
        const uint2* __restrict__ steps_in, const float* __restrict__ bc, const float* __restrict__ a_log,        \
        float* __restrict__ sink, int steps) {                                                                    \
        scan_floor_fwd_impl<NP>(steps_in, bc, a_log, sink, steps);                                                \
    }
SCAN_FLOOR_KERNEL(0)
SCAN_FLOOR_KERNEL(2)
SCAN_FLOOR_KERNEL(3)
SCAN_FLOOR_KERNEL(4)
SCAN_FLOOR_KERNEL(6)
#undef SCAN_FLOOR_KERNEL
