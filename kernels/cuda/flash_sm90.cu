// The Hopper flash backward's passes around its main kernel (flash_sm90_ws.cu's
// flash_bwd_ws_leanv_*): delta and the dq_acc zeroing before it, the dQ conversion after it.
// No wgmma here. (The non-warp-specialised wgmma kernels this file held, variant sm90, were
// retired 2026-11-29: bench/NOTES.md, "Retired kernel variants".)

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

// dQ = scale * dq_acc in q's layout. dq_acc holds, per (batch, head), T x D floats: each whole
// 64-query block q0 .. q0+63 is D/64 parts of 64 x 64 (part c = columns 64c .. 64c+63) in the
// backward's fragment order: float4 i = nt * 128 + t holds, for t = 32 w + l, rows
// 16 w + (l >> 2) (.x, .y) and that + 8 (.z, .w), columns 8 nt + 2 (l & 3) + {0, 1}. The last,
// partial block is row-major [rows][D]. Grid (blocks x D/64, H, B); 256 threads.
// A whole 64 x 64 part goes through shared memory as bf16 ([64][72], conflict-free in both
// phases) and leaves as 128-byte rows of 16-byte stores. Needs dq 16-byte aligned (checked by
// the caller, as q_rs, q_gs multiples of 8 by its layout check).
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
