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
// One block per chunk (offset, len, group) of the flat parameter buffer.
// Gradients are scaled by grad_mult, then zeroed. p_bf (optional) receives bf16(p).
extern "C" __global__ void adamw_step(float* __restrict__ p, float* __restrict__ g, float* __restrict__ m,
                                      float* __restrict__ v, bf16* __restrict__ p_bf,
                                      const long long* __restrict__ chunk_off, const int* __restrict__ chunk_len,
                                      const int* __restrict__ chunk_group, const float* __restrict__ hyper,
                                      float grad_mult) {
    const long long off = chunk_off[blockIdx.x];
    const int len = chunk_len[blockIdx.x];
    const float* hp = hyper + 8 * chunk_group[blockIdx.x];
    const float b1 = hp[1], b2 = hp[2], eps = hp[3], decay = hp[4], step_size = hp[5], bias2_sqrt = hp[6];
    for (int i = threadIdx.x; i < len; i += blockDim.x) {
        const long long k = off + i;
        const float gr = g[k] * grad_mult;
        const float mk = b1 * m[k] + (1.f - b1) * gr;
        const float vk = b2 * v[k] + (1.f - b2) * gr * gr;
        m[k] = mk;
        v[k] = vk;
        g[k] = 0.f;
        const float denom = sqrtf(vk) / bias2_sqrt + eps;
        const float pk = p[k] * decay - step_size * mk / denom;
        p[k] = pk;
        if (p_bf != nullptr) p_bf[k] = tobf(pk);
    }
}

// out[0] += sum(x^2) (fp64); out must be zeroed first.
extern "C" __global__ void sum_squares(const float* __restrict__ x, long long n, double* __restrict__ out) {
    __shared__ double part[32];
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
    acc += facc;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) part[warp] = acc;
    __syncthreads();
    if (warp == 0) {
        double t = (lane < (int)(blockDim.x >> 5)) ? part[lane] : 0.0;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
        if (lane == 0) atomicAdd(out, t);
    }
}

// x *= s
extern "C" __global__ void scale_f32(float* __restrict__ x, long long n, float s) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        x[i] *= s;
}
