// Fused softmax cross-entropy (label smoothing, in-place bf16 dlogits), AdamW, grad norm.

// One block per row of bf16 logits [rows, V]. losses[r] = (1-eps)(lse - z_y) + eps(lse - mean z).
// If write_grad: logits row <- bf16((softmax - (1-eps)onehot - eps/V) * grad_scale).
extern "C" __global__ void cross_entropy(bf16* __restrict__ logits, const int* __restrict__ targets,
                                         float* __restrict__ losses, int rows, int V, float smoothing,
                                         float grad_scale, int write_grad) {
    __shared__ float scratch[32];
    const int r = blockIdx.x;
    if (r >= rows) return;
    bf16* z = logits + (size_t)r * V;
    const int y = targets[r];
    const float zy = bf(z[y]);
    float m = -INF_F, s = 0.f, sz = 0.f;
    const bool vec = (V & 7) == 0;
    if (vec) {
        for (int c = threadIdx.x * 8; c < V; c += blockDim.x * 8) {
            uint4 raw = *reinterpret_cast<const uint4*>(z + c);
            const bf162* h = reinterpret_cast<const bf162*>(&raw);
            float v[8];
#pragma unroll
            for (int k = 0; k < 4; k++) {
                float2 f = __bfloat1622float2(h[k]);
                v[2 * k] = f.x;
                v[2 * k + 1] = f.y;
            }
            float lm = v[0];
#pragma unroll
            for (int k = 1; k < 8; k++) lm = fmaxf(lm, v[k]);
            const float nm = fmaxf(m, lm);
            s *= __expf(m - nm);
#pragma unroll
            for (int k = 0; k < 8; k++) {
                s += __expf(v[k] - nm);
                sz += v[k];
            }
            m = nm;
        }
    } else {
        for (int c = threadIdx.x; c < V; c += blockDim.x) {
            const float v = bf(z[c]);
            const float nm = fmaxf(m, v);
            s = s * __expf(m - nm) + __expf(v - nm);
            sz += v;
            m = nm;
        }
    }
    const float gm = block_max(m, scratch);
    const float st = block_sum(m == -INF_F ? 0.f : s * __expf(m - gm), scratch);
    const float szt = block_sum(sz, scratch);
    const float lse = gm + logf(st);
    if (threadIdx.x == 0) {
        losses[r] = (1.f - smoothing) * (lse - zy) + smoothing * (lse - szt / (float)V);
    }
    if (!write_grad) return;
    const float off = smoothing / (float)V;
    if (vec) {
        for (int c = threadIdx.x * 8; c < V; c += blockDim.x * 8) {
            uint4 raw = *reinterpret_cast<const uint4*>(z + c);
            bf162* h = reinterpret_cast<bf162*>(&raw);
#pragma unroll
            for (int k = 0; k < 4; k++) {
                float2 f = __bfloat1622float2(h[k]);
                float g0 = __expf(f.x - lse) - off - (c + 2 * k == y ? 1.f - smoothing : 0.f);
                float g1 = __expf(f.y - lse) - off - (c + 2 * k + 1 == y ? 1.f - smoothing : 0.f);
                h[k] = __floats2bfloat162_rn(g0 * grad_scale, g1 * grad_scale);
            }
            *reinterpret_cast<uint4*>(z + c) = raw;
        }
    } else {
        for (int c = threadIdx.x; c < V; c += blockDim.x) {
            const float g = __expf(bf(z[c]) - lse) - off - (c == y ? 1.f - smoothing : 0.f);
            z[c] = tobf(g * grad_scale);
        }
    }
}

// Per-group hyperparameters, 8 floats each:
// [lr, beta1, beta2, eps, decay = 1 - lr*wd, step_size = lr/(1-beta1^t), bias2_sqrt, unused]
struct AdamWHyper {
    float b1, b2, eps, decay, step_size, bias2_sqrt;
};

// One element: moments from the (clip-scaled) gradient, then the decoupled-decay update.
__device__ __forceinline__ float adamw_one(const AdamWHyper& h, float gr, float& m, float& v, float p) {
    m = h.b1 * m + (1.f - h.b1) * gr;
    v = h.b2 * v + (1.f - h.b2) * gr * gr;
    const float denom = sqrtf(v) / h.bias2_sqrt + h.eps;
    return p * h.decay - h.step_size * m / denom;
}

// A chunk's gradient: fp32, or bf16 (a weight gradient that one product wrote in bf16, as
// ArchScale's autocast hands it to the optimizer after one micro-step). Four at a time.
__device__ __forceinline__ float4 grad4(const float* g, int i) { return reinterpret_cast<const float4*>(g)[i]; }
__device__ __forceinline__ float4 grad4(const bf16* g, int i) {
    const uint2 raw = reinterpret_cast<const uint2*>(g)[i];
    const float2 lo = __bfloat1622float2(*reinterpret_cast<const bf162*>(&raw.x));
    const float2 hi = __bfloat1622float2(*reinterpret_cast<const bf162*>(&raw.y));
    return make_float4(lo.x, lo.y, hi.x, hi.y);
}
__device__ __forceinline__ float grad1(const float* g, int i) { return g[i]; }
__device__ __forceinline__ float grad1(const bf16* g, int i) { return bf(g[i]); }
// Zeroing after use: fp32 gradients only (a bf16 one is overwritten by its product).
__device__ __forceinline__ void zero4(float* g, int i) { reinterpret_cast<float4*>(g)[i] = make_float4(0.f, 0.f, 0.f, 0.f); }
__device__ __forceinline__ void zero4(bf16*, int) {}
__device__ __forceinline__ void zero1(float* g, int i) { g[i] = 0.f; }
__device__ __forceinline__ void zero1(bf16*, int) {}

// AdamW over one chunk of `len` elements with gradient gc (zeroed after use when `zero`,
// fp32 only). Goes by float4 when every pointer allows.
template <typename G>
__device__ __forceinline__ void adamw_chunk(const AdamWHyper& h, float* pc, G* gc, float* mc, float* vc, bf16* bc,
                                            int len, float grad_mult, bool zero) {
    const bool vec = ((reinterpret_cast<unsigned long long>(pc) | reinterpret_cast<unsigned long long>(mc) |
                       reinterpret_cast<unsigned long long>(vc)) &
                      15) == 0 &&
                     (reinterpret_cast<unsigned long long>(gc) & (4 * sizeof(G) - 1)) == 0 &&
                     (reinterpret_cast<unsigned long long>(bc) & 7) == 0;
    const int nvec = vec ? len >> 2 : 0;
    for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
        const float4 g4 = grad4(gc, i);
        float4 m4 = reinterpret_cast<const float4*>(mc)[i];
        float4 v4 = reinterpret_cast<const float4*>(vc)[i];
        float4 p4 = reinterpret_cast<const float4*>(pc)[i];
        p4.x = adamw_one(h, g4.x * grad_mult, m4.x, v4.x, p4.x);
        p4.y = adamw_one(h, g4.y * grad_mult, m4.y, v4.y, p4.y);
        p4.z = adamw_one(h, g4.z * grad_mult, m4.z, v4.z, p4.z);
        p4.w = adamw_one(h, g4.w * grad_mult, m4.w, v4.w, p4.w);
        reinterpret_cast<float4*>(mc)[i] = m4;
        reinterpret_cast<float4*>(vc)[i] = v4;
        reinterpret_cast<float4*>(pc)[i] = p4;
        if (zero) zero4(gc, i);
        if (bc != nullptr) {
            bf162 lo = __floats2bfloat162_rn(p4.x, p4.y), hi = __floats2bfloat162_rn(p4.z, p4.w);
            uint2 raw;
            raw.x = *reinterpret_cast<unsigned int*>(&lo);
            raw.y = *reinterpret_cast<unsigned int*>(&hi);
            reinterpret_cast<uint2*>(bc)[i] = raw;
        }
    }
    for (int i = 4 * nvec + threadIdx.x; i < len; i += blockDim.x) {
        float mk = mc[i], vk = vc[i];
        const float pk = adamw_one(h, grad1(gc, i) * grad_mult, mk, vk, pc[i]);
        mc[i] = mk;
        vc[i] = vk;
        if (zero) zero1(gc, i);
        pc[i] = pk;
        if (bc != nullptr) bc[i] = tobf(pk);
    }
}

// One block per chunk (offset, len, group) of the flat parameter buffer; chunks are at most
// 8192 elements, so a unit's launch fills the GPU. Gradients are scaled by grad_mult; the
// first zero_chunks chunks then zero theirs (the others are left for the next backward pass
// to overwrite). p_bf (optional) receives bf16(p). chunk_gbf (optional): a chunk with
// chunk_gbf >= 0 reads a bf16 gradient at ((bf16*)g)[chunk_gbf] (never a zeroed chunk).
// chunk_voff (optional): the chunk's second moment is at v + chunk_voff, in a buffer that
// only AdamW's tensors have slots in; without it at v + offset, as p, g and m.
// Tensors start 64-element aligned, so every chunk goes by float4 in practice.
extern "C" __global__ void adamw_step(float* __restrict__ p, float* __restrict__ g, float* __restrict__ m,
                                      float* __restrict__ v, bf16* __restrict__ p_bf,
                                      const long long* __restrict__ chunk_off, const int* __restrict__ chunk_len,
                                      const int* __restrict__ chunk_group, const long long* __restrict__ chunk_gbf,
                                      const long long* __restrict__ chunk_voff, const float* __restrict__ hyper,
                                      float grad_mult, int zero_chunks) {
    const long long off = chunk_off[blockIdx.x];
    v += chunk_voff != nullptr ? chunk_voff[blockIdx.x] : off;
    const int len = chunk_len[blockIdx.x];
    const float* hp = hyper + 8 * chunk_group[blockIdx.x];
    const AdamWHyper h = {hp[1], hp[2], hp[3], hp[4], hp[5], hp[6]};
    bf16* bc = p_bf != nullptr ? p_bf + off : nullptr;
    const long long gbf = chunk_gbf != nullptr ? chunk_gbf[blockIdx.x] : -1;
    if (gbf >= 0)
        adamw_chunk(h, p + off, reinterpret_cast<bf16*>(g) + gbf, m + off, v, bc, len, grad_mult, false);
    else
        adamw_chunk(h, p + off, g + off, m + off, v, bc, len, grad_mult, (int)blockIdx.x < zero_chunks);
}

template <typename G>
__device__ __forceinline__ float chunk_sum_squares(const G* gc, int len) {
    float acc = 0.f;
    const bool vec = (reinterpret_cast<unsigned long long>(gc) & (4 * sizeof(G) - 1)) == 0;
    const int nvec = vec ? len >> 2 : 0;
    for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
        const float4 x = grad4(gc, i);
        acc += x.x * x.x + x.y * x.y + x.z * x.z + x.w * x.w;
    }
    for (int i = 4 * nvec + threadIdx.x; i < len; i += blockDim.x) {
        const float x = grad1(gc, i);
        acc += x * x;
    }
    return acc;
}

// out[0] += sum of squares of the gradients of AdamW's chunks (the tables of adamw_step, with
// chunk_gbf), blocks striding over chunks: a thread sums at most 32 elements of a chunk in
// fp32, chunks add up in fp64. out must be zeroed first.
extern "C" __global__ void grad_sum_squares(const float* __restrict__ g, const long long* __restrict__ chunk_off,
                                            const int* __restrict__ chunk_len,
                                            const long long* __restrict__ chunk_gbf, int chunks,
                                            double* __restrict__ out) {
    double acc = 0.0;
    for (int c = blockIdx.x; c < chunks; c += gridDim.x) {
        const long long gbf = chunk_gbf != nullptr ? chunk_gbf[c] : -1;
        acc += gbf >= 0 ? chunk_sum_squares(reinterpret_cast<const bf16*>(g) + gbf, chunk_len[c])
                        : chunk_sum_squares(g + chunk_off[c], chunk_len[c]);
    }
    add_block_sum_f64(acc, out);
}

// out[0] += sum(x^2) (fp64); out must be zeroed first.
extern "C" __global__ void sum_squares(const float* __restrict__ x, long long n, double* __restrict__ out) {
    double acc = 0.0;
    float facc = 0.f;
    int count = 0;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        facc += x[i] * x[i];
        if (++count == 256) {
            acc += facc;
            facc = 0.f;
            count = 0;
        }
    }
    add_block_sum_f64(acc + facc, out);
}

// x *= s
extern "C" __global__ void scale_f32(float* __restrict__ x, long long n, float s) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        x[i] *= s;
}
