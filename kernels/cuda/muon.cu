// Muon (arch-spec §6.3) around the Newton–Schulz GEMMs that cuBLASLt runs (see muon.rs).
//
// A [rows, cols] fp32 matrix is worked on as a bf16 copy X with row stride cols_p and
// rows_p rows (both padded to multiples of 8 with zeros, so every GEMM has 16-byte aligned
// leading dimensions; zero rows and columns stay zero through the iteration).

// m <- beta·m + (1-beta)·g·grad_mult;  x <- bf16((1-beta)·g·grad_mult + beta·m) (padded);
// sumsq[0] += Σ x² over the bf16 values (sumsq zeroed by the caller).
extern "C" __global__ void muon_momentum(const float* __restrict__ g, float* __restrict__ m,
                                         bf16* __restrict__ x, int rows, int cols, int rows_p,
                                         int cols_p, float beta, float grad_mult,
                                         double* __restrict__ sumsq) {
    const long long n = (long long)rows_p * cols_p;
    const float one_minus = 1.f - beta;
    double acc = 0.0;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const int r = (int)(i / cols_p), c = (int)(i % cols_p);
        float v = 0.f;
        if (r < rows && c < cols) {
            const long long k = (long long)r * cols + c;
            const float gr = g[k] * grad_mult;
            const float mk = beta * m[k] + one_minus * gr;
            m[k] = mk;
            v = one_minus * gr + beta * mk;
        }
        const bf16 b = tobf(v);
        x[i] = b;
        const float q = bf(b);
        acc += (double)(q * q);
    }
    add_block_sum_f64(acc, sumsq);
}

// x <- bf16(x / (‖x‖ + 1e-7)) with ‖x‖ = sqrt(sumsq[0]) rounded to fp32 (as the CPU does).
extern "C" __global__ void muon_normalize(bf16* __restrict__ x, long long n,
                                          const double* __restrict__ sumsq) {
    const float denom = (float)sqrt(sumsq[0]) + 1e-7f;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        x[i] = tobf(bf(x[i]) / denom);
}

// Sharded Muon (ZeRO), first phase on this rank's n elements of a matrix: the momentum
// update as in muon_momentum, with the fp32 Nesterov mix written to `mix` (the rank's slice
// of a buffer the ranks then all-gather). `mix` may alias `g`.
extern "C" __global__ void muon_momentum_part(const float* g, float* __restrict__ m,
                                              float* mix, long long n, float beta,
                                              float grad_mult) {
    const float one_minus = 1.f - beta;
    for (long long k = blockIdx.x * (long long)blockDim.x + threadIdx.x; k < n;
         k += (long long)gridDim.x * blockDim.x) {
        const float gr = g[k] * grad_mult;
        const float mk = beta * m[k] + one_minus * gr;
        m[k] = mk;
        mix[k] = one_minus * gr + beta * mk;
    }
}

// Sharded Muon, second phase: the gathered fp32 mix [rows, cols] -> the padded bf16 working
// copy x, sumsq[0] += Σ x² (the same values muon_momentum writes on one GPU).
extern "C" __global__ void muon_pack(const float* __restrict__ mix, bf16* __restrict__ x,
                                     int rows, int cols, int rows_p, int cols_p,
                                     double* __restrict__ sumsq) {
    const long long n = (long long)rows_p * cols_p;
    double acc = 0.0;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const int r = (int)(i / cols_p), c = (int)(i % cols_p);
        const float v = (r < rows && c < cols) ? mix[(long long)r * cols + c] : 0.f;
        const bf16 b = tobf(v);
        x[i] = b;
        const float q = bf(b);
        acc += (double)(q * q);
    }
    add_block_sum_f64(acc, sumsq);
}

// p <- p·decay − scale·o  (o: the padded bf16 Newton–Schulz output); g <- 0; p_bf <- bf16(p)
// when given. Covers the matrix's elements k0 .. k0+n (row-major index k = r·cols + c);
// p, g and p_bf point at element k0 (one GPU: k0 = 0, n = rows·cols; ZeRO: the rank's part).
extern "C" __global__ void muon_update(float* __restrict__ p, float* __restrict__ g,
                                       bf16* __restrict__ p_bf, const bf16* __restrict__ o,
                                       long long k0, long long n, int cols, int cols_p,
                                       float decay, float scale) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const long long k = k0 + i;
        const long long r = k / cols, c = k % cols;
        const float pk = p[i] * decay - scale * bf(o[r * cols_p + c]);
        p[i] = pk;
        g[i] = 0.f;
        if (p_bf != nullptr) p_bf[i] = tobf(pk);
    }
}
