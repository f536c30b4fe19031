// The Hopper flash backward's passes around its main kernel (flash_sm90_ws.cu's
// flash_bwd_ws_leanv_*): delta and the dq_acc zeroing before it, the dQ conversion after it.
// No wgmma here; flash_common.cuh is prepended (rope_bwd_pair). (The non-warp-specialised
// wgmma kernels this file held, variant sm90, were retired 2026-11-29: bench/NOTES.md,
// "Retired kernel variants".)

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

// The RoPE path of flash_bwd_dq2_sm90 for one whole 64-query block and all D columns: the
// block's D/64 parts (float4 k of this thread: index threadIdx.x + 256 k, part k / 4) hold
// the rotate-half pairs (column p, p + D/2) in float4s k and k + D/32 (d128: the same (row,
// column) of parts 0 and 1; d64: nt and nt + 4 of one part). Rotated in fp32 after the scale,
// rounded once into shared memory ([64][D + 8] bf16: conflict-free both ways), stored as rows
// of D/8 16-byte chunks.
template <int D>
__device__ __forceinline__ void dq2_rope_block(const float* __restrict__ src, bf16* __restrict__ dst, int q_rs,
                                               float scale, int q0, const bf16* __restrict__ cos_t,
                                               const bf16* __restrict__ sin_t, bf16* tile) {
    constexpr int LD = D + 8, HALF = D / 2, PAIRS = D / 32;
    const float4* s4 = reinterpret_cast<const float4*>(src);
    float4 v[2 * PAIRS];
#pragma unroll
    for (int k = 0; k < 2 * PAIRS; k++) v[k] = s4[threadIdx.x + 256 * k];
#pragma unroll
    for (int k = 0; k < PAIRS; k++) {
        const int i = threadIdx.x + 256 * k;
        const int nt = i >> 7, t = i & 127, w = t >> 5, l = t & 31;
        const int row = 16 * w + (l >> 2), col = 8 * nt + 2 * (l & 3);  // col < D/2
        const float4 a = v[k], b = v[k + PAIRS];
#pragma unroll
        for (int e = 0; e < 2; e++) {  // rows row (.x, .y) and row + 8 (.z, .w)
            const int r = row + 8 * e;
            const long long tab = (long long)(q0 + r) * HALF + col;
            const float2 c = __bfloat1622float2(*reinterpret_cast<const bf162*>(cos_t + tab));
            const float2 sn = __bfloat1622float2(*reinterpret_cast<const bf162*>(sin_t + tab));
            float x0 = (e ? a.z : a.x) * scale, x1 = (e ? a.w : a.y) * scale;
            float y0 = (e ? b.z : b.x) * scale, y1 = (e ? b.w : b.y) * scale;
            rope_bwd_pair(x0, y0, c.x, sn.x);
            rope_bwd_pair(x1, y1, c.y, sn.y);
            *reinterpret_cast<bf162*>(&tile[r * LD + col]) = __floats2bfloat162_rn(x0, x1);
            *reinterpret_cast<bf162*>(&tile[r * LD + col + HALF]) = __floats2bfloat162_rn(y0, y1);
        }
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < PAIRS; k++) {
        const int chunk = threadIdx.x + 256 * k, row = chunk / (D / 8), ch = chunk % (D / 8);
        *reinterpret_cast<uint4*>(dst + (long long)row * q_rs + ch * 8) =
            *reinterpret_cast<const uint4*>(&tile[row * LD + ch * 8]);
    }
}

// dQ = scale * dq_acc in q's layout. dq_acc holds, per (batch, head), T x D floats: each whole
// 64-query block q0 .. q0+63 is D/64 parts of 64 x 64 (part c = columns 64c .. 64c+63) in the
// backward's fragment order: float4 i = nt * 128 + t holds, for t = 32 w + l, rows
// 16 w + (l >> 2) (.x, .y) and that + 8 (.z, .w), columns 8 nt + 2 (l & 3) + {0, 1}. The last,
// partial block is row-major [rows][D]. Grid (blocks x D/64, H, B); 256 threads.
// A whole 64 x 64 part goes through shared memory as bf16 ([64][72], conflict-free in both
// phases) and leaves as 128-byte rows of 16-byte stores. Needs dq 16-byte aligned (checked by
// the caller, as q_rs, q_gs multiples of 8 by its layout check).
// With cos_t, sin_t (bf16 [>= T][D/2]; null: none) dQ leaves inverse-rotated (the RoPE
// backward) at position q0 + row: then a block holds whole rows (a pair's partner is D/2
// columns away) and the grid is (blocks, H, B).
extern "C" __global__ void __launch_bounds__(256) flash_bwd_dq2_sm90(const float* __restrict__ dq_acc,
                                                                     bf16* __restrict__ dq, int T, int H, int D,
                                                                     int qpg, int q_rs, int q_gs, float scale,
                                                                     const bf16* __restrict__ cos_t,
                                                                     const bf16* __restrict__ sin_t) {
    __shared__ __align__(16) bf16 tile[64 * 136];
    const bool rope = cos_t != nullptr;
    const int parts = rope ? 1 : D / 64;
    const int qb = blockIdx.x / parts, c = blockIdx.x % parts, h = blockIdx.y, b = blockIdx.z;
    const int q0 = qb * 64;
    const float* src = dq_acc + (((long long)b * H + h) * T + q0) * D;
    bf16* dst = dq + ((long long)b * T + q0) * q_rs + (h / qpg) * q_gs + (h % qpg) * D + c * 64;
    if (rope) {
        if (q0 + 64 <= T) {
            if (D == 128) dq2_rope_block<128>(src, dst, q_rs, scale, q0, cos_t, sin_t, tile);
            else dq2_rope_block<64>(src, dst, q_rs, scale, q0, cos_t, sin_t, tile);
            return;
        }
        const int rows = T - q0, half = D / 2, per_row = D / 4;
        for (int i = threadIdx.x; i < rows * per_row; i += blockDim.x) {
            const int row = i / per_row, p = (i - row * per_row) * 2;
            const float2 x = *reinterpret_cast<const float2*>(src + (long long)row * D + p);
            const float2 y = *reinterpret_cast<const float2*>(src + (long long)row * D + p + half);
            const long long tab = (long long)(q0 + row) * half + p;
            const float2 cs = __bfloat1622float2(*reinterpret_cast<const bf162*>(cos_t + tab));
            const float2 sn = __bfloat1622float2(*reinterpret_cast<const bf162*>(sin_t + tab));
            float x0 = x.x * scale, x1 = x.y * scale, y0 = y.x * scale, y1 = y.y * scale;
            rope_bwd_pair(x0, y0, cs.x, sn.x);
            rope_bwd_pair(x1, y1, cs.y, sn.y);
            *reinterpret_cast<bf162*>(dst + (long long)row * q_rs + p) = __floats2bfloat162_rn(x0, x1);
            *reinterpret_cast<bf162*>(dst + (long long)row * q_rs + p + half) = __floats2bfloat162_rn(y0, y1);
        }
        return;
    }
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
