//! Times cuBLASLt's candidate algorithms for the products of a Transformer++ step at
//! ArchScale's d8 (micro 8) and d16 (micro 4) shapes, ctx 4096, vocab 32000, on random bf16
//! data: the heuristic's first choice against the fastest candidate. Needs a GPU.
//!     gemm_tune [reps]
use archscale_kernels::cublaslt::{Gemm, Lt, OutType};
use archscale_kernels::gpu::Gpu;

fn random_bf16(n: usize, seed: u64) -> Vec<u16> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let u = (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5; // uniform in [-0.5, 0.5)
            half::bf16::from_f32(u * 0.1).to_bits()
        })
        .collect()
}

fn main() {
    let reps = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(10usize);
    if let Err(e) = run(reps) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run(reps: usize) -> archscale_kernels::Result<()> {
    let gpu = Gpu::new(0)?;
    let lt = Lt::new(&gpu)?;
    // the largest operand of any product below, in elements
    let big = 32768 * 32000;
    let a = gpu.alloc(big * 2)?;
    let b = gpu.alloc(big * 2)?;
    let c = gpu.alloc(big * 4)?;
    let d = gpu.alloc(big * 4)?;
    gpu.upload(a.ptr, &random_bf16(big, 1))?;
    gpu.upload(b.ptr, &random_bf16(big, 2))?;
    gpu.memset_zero(c.ptr, big * 4)?;
    gpu.memset_zero(d.ptr, big * 4)?;
    println!(
        "{:<28} {:>6} {:>6} {:>6}  {:>9} {:>9} {:>5} {:>7} {:>8}",
        "product", "m", "n", "k", "first ms", "best ms", "rank", "gain", "TFLOP/s"
    );
    for (depth, micro) in [(8usize, 8usize), (16, 4)] {
        let n = 128 * depth;
        let inner = 4 * n;
        let qkv = (depth + 2 * (depth / 4)) * 128;
        let rows = micro * 4096;
        let v = 32000;
        // (name, in, out, fwd output type, fwd beta), per layer and for the head
        let linears = [
            ("qkv", n, qkv, OutType::Bf16, 0.0, depth),
            ("proj", n, n, OutType::F32, 1.0, depth),
            ("w1", n, 2 * inner, OutType::Bf16, 0.0, depth),
            ("w3", inner, n, OutType::F32, 1.0, depth),
            ("head", n, v, OutType::Bf16, 0.0, 1),
        ];
        let mut sum = (0.0f64, 0.0f64);
        for (name, inp, out, ty, beta, count) in linears {
            let products = [
                // y = x·Wᵀ (Lt::linear)
                (
                    "fwd",
                    Gemm {
                        trans_a: true,
                        trans_b: false,
                        m: out,
                        n: rows,
                        k: inp,
                        a: a.ptr,
                        lda: inp,
                        b: b.ptr,
                        ldb: inp,
                        c: c.ptr,
                        d: d.ptr,
                        ldd: out,
                        out: ty,
                        alpha: 1.0,
                        beta,
                    },
                ),
                // dx = dy·W (Lt::linear_grad_input)
                (
                    "dx",
                    Gemm {
                        trans_a: false,
                        trans_b: false,
                        m: inp,
                        n: rows,
                        k: out,
                        a: a.ptr,
                        lda: inp,
                        b: b.ptr,
                        ldb: out,
                        c: d.ptr,
                        d: d.ptr,
                        ldd: inp,
                        out: OutType::Bf16,
                        alpha: 1.0,
                        beta: 0.0,
                    },
                ),
                // dW += dyᵀ·x (Lt::linear_grad_weight, fp32, accumulating)
                (
                    "dW",
                    Gemm {
                        trans_a: false,
                        trans_b: true,
                        m: inp,
                        n: out,
                        k: rows,
                        a: a.ptr,
                        lda: inp,
                        b: b.ptr,
                        ldb: out,
                        c: d.ptr,
                        d: d.ptr,
                        ldd: inp,
                        out: OutType::F32,
                        alpha: 1.0,
                        beta: 1.0,
                    },
                ),
            ];
            for (what, g) in products {
                let times = lt.tune(&gpu, &g, reps)?;
                let first = times
                    .iter()
                    .find(|t| t.rank == 0)
                    .map_or(f32::NAN, |t| t.ms);
                let best = times[0];
                let flops = 2.0 * g.m as f64 * g.n as f64 * g.k as f64;
                println!(
                    "d{depth:<2} {:<24} {:>6} {:>6} {:>6}  {:>9.4} {:>9.4} {:>5} {:>6.1}% {:>8.0}",
                    format!("{name} {what} (x{count})"),
                    g.m,
                    g.n,
                    g.k,
                    first,
                    best.ms,
                    best.rank,
                    100.0 * (first - best.ms) / first,
                    flops / best.ms as f64 / 1e9
                );
                sum.0 += first as f64 * count as f64;
                sum.1 += best.ms as f64 * count as f64;
            }
        }
        println!(
            "d{depth} step GEMMs: heuristic first {:.2} ms, best {:.2} ms ({:.1} % less)",
            sum.0,
            sum.1,
            100.0 * (sum.0 - sum.1) / sum.0
        );
    }
    Ok(())
}
