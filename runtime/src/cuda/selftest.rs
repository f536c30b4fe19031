//! `archscale selftest`: every CUDA kernel against the CPU reference (`crate::cpu::ops`),
//! with fresh random inputs, several shapes (odd sizes included), outputs poisoned with NaN
//! before each launch. Error measure: ‖out − ref‖ / ‖ref‖ over all elements, with the
//! reference computed in f64 from the same (bf16-rounded where the kernel reads bf16) inputs.

use crate::cpu::ops;
use crate::optim::adamw::{adamw_step, AdamWHyper};
use archscale_kernels::cublaslt::{Lt, OutType, WeightGrad};
use archscale_kernels::ops::{AttnLayout, Ops, OptChunkTables, RopeTables};
use archscale_kernels::{DeviceBuffer, Gpu, KernelError};
use half::bf16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use std::sync::Arc;

mod accumulation;
mod hybrid;
mod muon;

/// One line of the report.
#[derive(Clone, Debug)]
pub struct Check {
    pub name: String,
    pub shape: String,
    pub rel_err: f64,
    pub tol: f64,
    pub seconds: f64,
}

impl Check {
    pub fn passed(&self) -> bool {
        self.rel_err.is_finite() && self.rel_err <= self.tol
    }
}

/// What the self-test did.
#[derive(Debug)]
pub struct Report {
    pub seed: u64,
    /// NVRTC compile of every module for this arch (CPU-side check), or why skipped.
    pub compile: Result<Vec<(String, usize)>, String>,
    pub compile_arch: String,
    /// Device description, or why GPU checks were skipped.
    pub device: Result<String, String>,
    pub checks: Vec<Check>,
    /// A check that could not run at all (launch failure).
    pub errors: Vec<String>,
    /// Timing lines (`--bench-scan`), already formatted.
    pub bench: Vec<String>,
}

/// What to run.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Only the suites whose name contains this (e.g. `mamba`, `flash`).
    pub only: Option<String>,
    /// Also time the selective scan at SambaY-d16 and d8 shapes (CUDA events).
    pub bench_scan: bool,
}

impl Report {
    pub fn all_passed(&self) -> bool {
        self.compile.is_ok()
            && self.device.is_ok()
            && self.errors.is_empty()
            && self.checks.iter().all(Check::passed)
    }
}

impl Default for Check {
    fn default() -> Self {
        Check {
            name: String::new(),
            shape: String::new(),
            rel_err: f64::NAN,
            tol: 0.0,
            seconds: 0.0,
        }
    }
}

/// Relative L2 error; NaN anywhere in `out` gives NaN.
pub fn rel_err(out: &[f64], reference: &[f64]) -> f64 {
    assert_eq!(out.len(), reference.len());
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&o, &r) in out.iter().zip(reference) {
        if !o.is_finite() {
            return f64::NAN;
        }
        num += (o - r) * (o - r);
        den += r * r;
    }
    if den == 0.0 {
        return if num == 0.0 { 0.0 } else { f64::INFINITY };
    }
    (num / den).sqrt()
}

struct Env {
    gpu: Arc<Gpu>,
    ops: Ops,
    lt: Lt,
    /// Hybrid-family kernels (mamba.cu, hybrid.cu); None when they failed to load.
    hy: Option<archscale_kernels::ops::HybridOps>,
    rng: ChaCha8Rng,
    bufs: Vec<DeviceBuffer>,
}

type R<T> = std::result::Result<T, KernelError>;

fn round_bf16(v: &mut [f64]) {
    for x in v.iter_mut() {
        *x = bf16::from_f32(*x as f32).to_f64();
    }
}

impl Env {
    fn randn(&mut self, n: usize, std: f64) -> Vec<f64> {
        (0..n)
            .map(|_| {
                std * <StandardNormal as Distribution<f64>>::sample(&StandardNormal, &mut self.rng)
            })
            .collect()
    }
    fn randn_bf16(&mut self, n: usize, std: f64) -> Vec<f64> {
        let mut v = self.randn(n, std);
        round_bf16(&mut v);
        v
    }
    /// Allocates a buffer poisoned with 0xFF bytes (NaN as f32 and as bf16).
    fn poisoned(&mut self, bytes: usize) -> R<u64> {
        let b = self.gpu.alloc(bytes)?;
        self.gpu.memset_byte(b.ptr, 0xFF, b.bytes)?;
        let p = b.ptr;
        self.bufs.push(b);
        Ok(p)
    }
    fn f32_buf(&mut self, v: &[f64]) -> R<u64> {
        let p = self.poisoned(v.len() * 4)?;
        let host: Vec<f32> = v.iter().map(|&x| x as f32).collect();
        self.gpu.upload(p, &host)?;
        Ok(p)
    }
    fn bf16_buf(&mut self, v: &[f64]) -> R<u64> {
        let p = self.poisoned(v.len() * 2)?;
        let host: Vec<u16> = v
            .iter()
            .map(|&x| bf16::from_f32(x as f32).to_bits())
            .collect();
        self.gpu.upload(p, &host)?;
        Ok(p)
    }
    fn i32_buf(&mut self, v: &[u32]) -> R<u64> {
        let p = self.poisoned(v.len() * 4)?;
        let host: Vec<i32> = v.iter().map(|&x| x as i32).collect();
        self.gpu.upload(p, &host)?;
        Ok(p)
    }
    fn read_f32(&self, p: u64, n: usize) -> R<Vec<f64>> {
        let v: Vec<f32> = self.gpu.download_vec(p, n)?;
        Ok(v.into_iter().map(|x| x as f64).collect())
    }
    fn read_bf16(&self, p: u64, n: usize) -> R<Vec<f64>> {
        let v: Vec<u16> = self.gpu.download_vec(p, n)?;
        Ok(v.into_iter().map(|x| bf16::from_bits(x).to_f64()).collect())
    }
    fn release(&mut self) {
        for b in self.bufs.drain(..) {
            self.gpu.free(b);
        }
    }
}

/// Runs the self-test. `seed` = None draws a fresh one from the clock.
pub fn run(seed: Option<u64>) -> Report {
    run_with(seed, &Options::default())
}

/// Runs the self-test with `opts` (suite filter, scan benchmark).
pub fn run_with(seed: Option<u64>, opts: &Options) -> Report {
    let seed = seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    let mut report = Report {
        seed,
        compile_arch: String::new(),
        compile: Err(String::new()),
        device: Err(String::new()),
        checks: Vec::new(),
        errors: Vec::new(),
        bench: Vec::new(),
    };

    // CPU side: NVRTC compile of every module (for the device's arch if one is present).
    let gpu = Gpu::new(0);
    let arch = match &gpu {
        Ok(g) => g.arch(),
        Err(_) => "sm_90a".to_string(),
    };
    report.compile_arch = arch.clone();
    report.compile = archscale_kernels::compile_all(&arch).map_err(|e| e.to_string());

    let gpu = match gpu {
        Ok(g) => g,
        Err(e) => {
            report.device = Err(e.to_string());
            return report;
        }
    };
    report.device = Ok(format!(
        "{} (sm_{}{}, {} SMs, {:.1} GiB)",
        gpu.name,
        gpu.cc.0,
        gpu.cc.1,
        gpu.sm_count,
        gpu.total_mem as f64 / (1u64 << 30) as f64
    ));
    if report.compile.is_err() {
        return report;
    }
    let ops = match Ops::new(gpu.clone()) {
        Ok(o) => o,
        Err(e) => {
            report.errors.push(format!("loading kernels: {e}"));
            return report;
        }
    };
    let lt = match Lt::new(&gpu) {
        Ok(l) => l,
        Err(e) => {
            report.errors.push(format!("cuBLASLt: {e}"));
            return report;
        }
    };
    let hy = match archscale_kernels::ops::HybridOps::new(gpu.clone()) {
        Ok(h) => Some(h),
        Err(e) => {
            report.errors.push(format!("loading hybrid kernels: {e}"));
            None
        }
    };
    let mut env = Env {
        gpu,
        ops,
        lt,
        hy,
        rng: ChaCha8Rng::seed_from_u64(seed),
        bufs: Vec::new(),
    };

    type CheckFn = fn(&mut Env, &mut Vec<Check>) -> R<()>;
    let suites: [(&str, CheckFn); 18] = [
        ("gemm", check_gemm),
        ("embedding", check_embedding),
        ("rmsnorm", check_rmsnorm),
        ("rope", check_rope),
        ("swiglu", check_swiglu),
        ("cross_entropy", check_cross_entropy),
        ("adamw", check_adamw),
        ("grad_norm+cast", check_norm_cast),
        ("flash_attention", check_flash),
        ("mamba_conv", hybrid::check_conv),
        ("mamba_scan", hybrid::check_scan),
        ("mamba_pad_weights", hybrid::check_pad_weights),
        ("layernorm", hybrid::check_layernorm),
        ("gmu", hybrid::check_gmu),
        ("diff_attention", hybrid::check_diff_attention),
        ("bias", hybrid::check_bias),
        ("yoco_kv_grad", hybrid::check_kv_grad),
        ("muon", muon::muon_checks),
    ];
    for (name, f) in suites {
        if opts.only.as_deref().is_some_and(|o| !name.contains(o)) {
            continue;
        }
        let mut checks = Vec::new();
        let t = std::time::Instant::now();
        let r = f(&mut env, &mut checks).and_then(|_| env.gpu.sync());
        let secs = t.elapsed().as_secs_f64();
        for c in checks.iter_mut() {
            c.seconds = secs;
        }
        report.checks.extend(checks);
        if let Err(e) = r {
            report.errors.push(format!("{name}: {e}"));
        }
        env.release();
    }
    if opts.bench_scan {
        match hybrid::bench_scan(&mut env) {
            Ok(lines) => report.bench.extend(lines),
            Err(e) => report.errors.push(format!("scan benchmark: {e}")),
        }
        env.release();
    }
    report
}

fn push(out: &mut Vec<Check>, name: &str, shape: String, err: f64, tol: f64) {
    out.push(Check {
        name: name.to_string(),
        shape,
        rel_err: err,
        tol,
        seconds: 0.0,
    });
}

const TOL_BF16: f64 = 1e-2;
const TOL_F32: f64 = 1e-5;

fn check_gemm(env: &mut Env, out: &mut Vec<Check>) -> R<()> {
    for &(rows, d_in, d_out) in &[
        (64usize, 128usize, 256usize),
        (37, 72, 136),
        (1000, 520, 392),
    ] {
        let shape = format!("{rows}x{d_in}->{d_out}");
        let x = env.randn_bf16(rows * d_in, 1.0);
        let w = env.randn_bf16(d_out * d_in, 0.05);
        let mut y_ref = vec![0.0; rows * d_out];
        ops::linear::linear_forward(&mut y_ref, &x, &w, None, rows, d_in, d_out);
        let (xp, wp) = (env.bf16_buf(&x)?, env.bf16_buf(&w)?);
        let yp = env.poisoned(rows * d_out * 2)?;
        env.lt.linear(
            &env.gpu,
            xp,
            wp,
            yp,
            0,
            rows,
            d_in,
            d_out,
            OutType::Bf16,
            1.0,
            0.0,
        )?;
        push(
            out,
            "gemm y=x·Wᵀ (bf16 out)",
            shape.clone(),
            rel_err(&env.read_bf16(yp, rows * d_out)?, &y_ref),
            TOL_BF16,
        );

        // residual epilogue: r_new = r + 0.5·x·Wᵀ (fp32 C and D, distinct buffers)
        let r = env.randn(rows * d_out, 1.0);
        let rp = env.f32_buf(&r)?;
        let dp = env.poisoned(rows * d_out * 4)?;
        env.lt.linear(
            &env.gpu,
            xp,
            wp,
            dp,
            rp,
            rows,
            d_in,
            d_out,
            OutType::F32,
            0.5,
            1.0,
        )?;
        let want: Vec<f64> = r.iter().zip(&y_ref).map(|(a, b)| a + 0.5 * b).collect();
        push(
            out,
            "gemm r+0.5·x·Wᵀ (fp32 out)",
            shape.clone(),
            rel_err(&env.read_f32(dp, rows * d_out)?, &want),
            TOL_F32 * 10.0,
        );

        // grads: dx = dy·W (bf16), dW += dyᵀ·x (fp32, accumulating)
        let dy = env.randn_bf16(rows * d_out, 1.0);
        let dw0 = env.randn(d_out * d_in, 1.0);
        let mut dx_ref = vec![0.0; rows * d_in];
        let mut dw_ref = dw0.clone();
        ops::linear::linear_backward(
            Some(&mut dx_ref),
            &mut dw_ref,
            None,
            &dy,
            &x,
            &w,
            rows,
            d_in,
            d_out,
        );
        let dyp = env.bf16_buf(&dy)?;
        let dxp = env.poisoned(rows * d_in * 2)?;
        let dwp = env.f32_buf(&dw0)?;
        env.lt.linear_grad_input(
            &env.gpu,
            dyp,
            wp,
            dxp,
            rows,
            d_in,
            d_out,
            OutType::Bf16,
            1.0,
            0.0,
        )?;
        env.lt.linear_grad_weight(
            &env.gpu,
            dyp,
            xp,
            WeightGrad {
                ptr: dwp,
                ty: OutType::F32,
            },
            rows,
            d_in,
            d_out,
            1.0,
            1.0,
        )?;
        // the one-micro-step form: dW = dyᵀ·x written in bf16 (beta 0)
        let dwbp = env.poisoned(d_out * d_in * 2)?;
        env.lt.linear_grad_weight(
            &env.gpu,
            dyp,
            xp,
            WeightGrad {
                ptr: dwbp,
                ty: OutType::Bf16,
            },
            rows,
            d_in,
            d_out,
            1.0,
            0.0,
        )?;
        let dw_only: Vec<f64> = dw_ref.iter().zip(&dw0).map(|(a, b)| a - b).collect();
        push(
            out,
            "gemm dW=dyᵀ·x (bf16)",
            shape.clone(),
            rel_err(&env.read_bf16(dwbp, d_out * d_in)?, &dw_only),
            TOL_BF16,
        );
        push(
            out,
            "gemm dx=dy·W (bf16)",
            shape.clone(),
            rel_err(&env.read_bf16(dxp, rows * d_in)?, &dx_ref),
            TOL_BF16,
        );
        push(
            out,
            "gemm dW+=dyᵀ·x (fp32)",
            shape,
            rel_err(&env.read_f32(dwp, d_out * d_in)?, &dw_ref),
            TOL_F32 * 10.0,
        );
    }
    Ok(())
}

fn check_embedding(env: &mut Env, out: &mut Vec<Check>) -> R<()> {
    for &(rows, vocab, dim) in &[(300usize, 1000usize, 256usize), (77, 50, 30)] {
        let shape = format!("{rows} tok, V={vocab}, n={dim}");
        // values exactly representable in f32, so the copy must be exact
        let table: Vec<f64> = env
            .randn(vocab * dim, 1.0)
            .iter()
            .map(|&v| v as f32 as f64)
            .collect();
        let tokens: Vec<u32> = (0..rows)
            .map(|_| env.rng.gen_range(0..vocab as u32))
            .collect();
        let mut y_ref = vec![0.0; rows * dim];
        ops::embedding::embedding_forward(&mut y_ref, &tokens, &table, dim);
        let (tp, ip) = (env.f32_buf(&table)?, env.i32_buf(&tokens)?);
        let yp = env.poisoned(rows * dim * 4)?;
        env.ops.embedding_fwd(ip, tp, yp, rows, dim)?;
        push(
            out,
            "embedding fwd",
            shape.clone(),
            rel_err(&env.read_f32(yp, rows * dim)?, &y_ref),
            0.0,
        );
        let dy = env.randn(rows * dim, 1.0);
        let mut dt_ref = vec![0.0; vocab * dim];
        ops::embedding::embedding_backward(&mut dt_ref, &tokens, &dy, dim);
        let dyp = env.f32_buf(&dy)?;
        let dtp = env.poisoned(vocab * dim * 4)?;
        env.gpu.memset_zero(dtp, vocab * dim * 4)?;
        env.ops.embedding_bwd(ip, dyp, dtp, rows, dim)?;
        push(
            out,
            "embedding bwd",
            shape,
            rel_err(&env.read_f32(dtp, vocab * dim)?, &dt_ref),
            TOL_F32,
        );
    }
    Ok(())
}

fn check_rmsnorm(env: &mut Env, out: &mut Vec<Check>) -> R<()> {
    for &(rows, dim, scale) in &[
        // widths of each register-resident kernel (V = 1…4, 128 and 256 threads) and of
        // the one-block-per-row fallback (odd, over 4096)
        (512usize, 1024usize, 1.0f64),
        (33, 100, 0.5),
        (5, 2048, 2.0),
        (7, 1536, 1.0),
        (64, 3072, 1.0),
        (600, 4096, 0.5),
        (9, 130, 1.0),
        (3, 6000, 1.0),
    ] {
        let shape = format!("{rows}x{dim} s={scale}");
        let x = env.randn(rows * dim, 1.0);
        let gamma: Vec<f64> = env.randn(dim, 0.2).iter().map(|v| 1.0 + v).collect();
        let gamma_s: Vec<f64> = gamma.iter().map(|g| g * scale).collect();
        let mut y_ref = vec![0.0; rows * dim];
        let mut rstd_ref = vec![0.0; rows];
        ops::rmsnorm::rmsnorm_forward(&mut y_ref, &mut rstd_ref, &x, &gamma_s, dim, 1e-5);
        let (xp, gp) = (env.f32_buf(&x)?, env.f32_buf(&gamma)?);
        let yp = env.poisoned(rows * dim * 2)?;
        let rp = env.poisoned(rows * 4)?;
        env.ops
            .rmsnorm_fwd(xp, gp, yp, rp, rows, dim, 1e-5, scale as f32)?;
        push(
            out,
            "rmsnorm fwd (bf16 out)",
            shape.clone(),
            rel_err(&env.read_bf16(yp, rows * dim)?, &y_ref),
            TOL_BF16,
        );
        push(
            out,
            "rmsnorm rstd",
            shape.clone(),
            rel_err(&env.read_f32(rp, rows)?, &rstd_ref),
            TOL_F32,
        );

        // backward with accumulation into an existing residual gradient
        let dy = env.randn_bf16(rows * dim, 1.0);
        let dres0 = env.randn(rows * dim, 1.0);
        let mut dx_ref = dres0.clone();
        let mut dg_ref_s = vec![0.0; dim];
        ops::rmsnorm::rmsnorm_backward(
            &mut dx_ref,
            &mut dg_ref_s,
            &dy,
            &x,
            &gamma_s,
            &rstd_ref,
            dim,
        );
        // d gamma = d(gamma_s) * scale
        let dg0 = env.randn(dim, 1.0);
        let dg_ref: Vec<f64> = dg_ref_s
            .iter()
            .zip(&dg0)
            .map(|(d, a)| a + d * scale)
            .collect();
        let dyp = env.bf16_buf(&dy)?;
        let dresp = env.f32_buf(&dres0)?;
        let dresb = env.poisoned(rows * dim * 2)?;
        let dgp = env.f32_buf(&dg0)?;
        env.ops.rmsnorm_bwd(
            xp,
            gp,
            rp,
            dyp,
            dresp,
            dresb,
            dgp,
            rows,
            dim,
            scale as f32,
            true,
            dyp, // the forward output again, over dy (as the MLP backward asks for it)
        )?;
        let h_ref: Vec<f64> = (0..rows * dim)
            .map(|i| x[i] * rstd_ref[i / dim] * gamma[i % dim])
            .collect();
        push(
            out,
            "rmsnorm bwd: x·rstd·gamma over dy",
            shape.clone(),
            rel_err(&env.read_bf16(dyp, rows * dim)?, &h_ref),
            TOL_BF16,
        );
        push(
            out,
            "rmsnorm bwd dx (fp32, +=)",
            shape.clone(),
            rel_err(&env.read_f32(dresp, rows * dim)?, &dx_ref),
            1e-4,
        );
        push(
            out,
            "rmsnorm bwd dx (bf16 copy)",
            shape.clone(),
            rel_err(&env.read_bf16(dresb, rows * dim)?, &dx_ref),
            TOL_BF16,
        );
        push(
            out,
            "rmsnorm bwd dgamma (+=)",
            shape.clone(),
            rel_err(&env.read_f32(dgp, dim)?, &dg_ref),
            1e-4,
        );

        // residual add + norm in one pass, in place as the forward runs it: the branch
        // (bf16) in the output buffer, the stream updated where it lies
        if env.ops.rmsnorm_add_available(dim) {
            let delta = env.randn_bf16(rows * dim, 1.0);
            let rs = 0.7;
            let x_sum: Vec<f64> = x.iter().zip(&delta).map(|(a, b)| a + rs * b).collect();
            let (mut y2_ref, mut rstd2_ref) = (vec![0.0; rows * dim], vec![0.0; rows]);
            ops::rmsnorm::rmsnorm_forward(&mut y2_ref, &mut rstd2_ref, &x_sum, &gamma_s, dim, 1e-5);
            let xsp = env.f32_buf(&x)?;
            let dp = env.bf16_buf(&delta)?;
            let rp2 = env.poisoned(rows * 4)?;
            env.ops.rmsnorm_fwd_add(
                xsp,
                dp,
                rs as f32,
                xsp,
                gp,
                dp,
                rp2,
                rows,
                dim,
                1e-5,
                scale as f32,
            )?;
            push(
                out,
                "rmsnorm fwd + residual add: stream (fp32, in place)",
                shape.clone(),
                rel_err(&env.read_f32(xsp, rows * dim)?, &x_sum),
                TOL_F32,
            );
            push(
                out,
                "rmsnorm fwd + residual add: out (bf16, over the branch)",
                shape.clone(),
                rel_err(&env.read_bf16(dp, rows * dim)?, &y2_ref),
                TOL_BF16,
            );
            push(
                out,
                "rmsnorm fwd + residual add: rstd",
                shape,
                rel_err(&env.read_f32(rp2, rows)?, &rstd2_ref),
                TOL_F32,
            );
        }
    }
    Ok(())
}

/// Splits the fused grouped layout `[rows, G, qpg+2, hs]` into per-slot vectors for the CPU.
fn check_rope(env: &mut Env, out: &mut Vec<Check>) -> R<()> {
    for &(batch, seq, heads, groups, hs) in &[
        (2usize, 100usize, 4usize, 2usize, 128usize),
        (1, 37, 6, 3, 64),
        // hs/2 not a multiple of 8: the kernel's scalar path
        (1, 19, 2, 1, 40),
    ] {
        let shape = format!("B{batch} T{seq} H{heads} G{groups} hs{hs}");
        let qpg = heads / groups;
        let rows = batch * seq;
        let width = groups * (qpg + 2) * hs;
        let qkv = env.randn_bf16(rows * width, 1.0);
        let table = ops::rope::RopeTable::new(seq, hs, 10000.0);
        // reference: rotate each rotated slot as one "head" sequence
        let mut want = qkv.clone();
        for b in 0..batch {
            for slot in 0..groups * (qpg + 2) {
                if slot % (qpg + 2) == qpg + 1 {
                    continue; // v is not rotated
                }
                let mut head: Vec<f64> = (0..seq)
                    .flat_map(|t| qkv[((b * seq + t) * width + slot * hs)..][..hs].to_vec())
                    .collect();
                ops::rope::rope_forward(&mut head, &table, seq, hs);
                for t in 0..seq {
                    want[((b * seq + t) * width + slot * hs)..][..hs]
                        .copy_from_slice(&head[t * hs..(t + 1) * hs]);
                }
            }
        }
        let cos: Vec<f64> = table.cos.iter().map(|&c| c as f64).collect();
        let sin: Vec<f64> = table.sin.iter().map(|&c| c as f64).collect();
        let (cp, sp) = (env.bf16_buf(&cos)?, env.bf16_buf(&sin)?);
        let p = env.bf16_buf(&qkv)?;
        env.ops
            .rope_qkv(p, cp, sp, rows, seq, groups, qpg, hs, 1.0)?;
        push(
            out,
            "rope fwd (fused qkv, in place)",
            shape.clone(),
            rel_err(&env.read_bf16(p, rows * width)?, &want),
            TOL_BF16,
        );
        // backward: inverse rotation of a random gradient
        let g = env.randn_bf16(rows * width, 1.0);
        let mut gwant = g.clone();
        for b in 0..batch {
            for slot in 0..groups * (qpg + 2) {
                if slot % (qpg + 2) == qpg + 1 {
                    continue;
                }
                let mut head: Vec<f64> = (0..seq)
                    .flat_map(|t| g[((b * seq + t) * width + slot * hs)..][..hs].to_vec())
                    .collect();
                ops::rope::rope_backward(&mut head, &table, seq, hs);
                for t in 0..seq {
                    gwant[((b * seq + t) * width + slot * hs)..][..hs]
                        .copy_from_slice(&head[t * hs..(t + 1) * hs]);
                }
            }
        }
        let gp = env.bf16_buf(&g)?;
        env.ops
            .rope_qkv(gp, cp, sp, rows, seq, groups, qpg, hs, -1.0)?;
        push(
            out,
            "rope bwd",
            shape,
            rel_err(&env.read_bf16(gp, rows * width)?, &gwant),
            TOL_BF16,
        );
    }
    Ok(())
}

fn check_swiglu(env: &mut Env, out: &mut Vec<Check>) -> R<()> {
    for &(rows, inner) in &[(256usize, 1024usize), (13, 301), (7, 50)] {
        let shape = format!("{rows}x{inner}");
        let h = env.randn_bf16(rows * 2 * inner, 2.0);
        let mut a_ref = vec![0.0; rows * inner];
        ops::swiglu::swiglu_forward(&mut a_ref, &h, inner);
        let hp = env.bf16_buf(&h)?;
        let ap = env.poisoned(rows * inner * 2)?;
        env.ops.swiglu_fwd(hp, ap, rows, inner)?;
        push(
            out,
            "swiglu fwd",
            shape.clone(),
            rel_err(&env.read_bf16(ap, rows * inner)?, &a_ref),
            TOL_BF16,
        );
        let da = env.randn_bf16(rows * inner, 1.0);
        let mut dh_ref = vec![0.0; rows * 2 * inner];
        ops::swiglu::swiglu_backward(&mut dh_ref, &da, &h, inner);
        let dap = env.bf16_buf(&da)?;
        env.ops.swiglu_bwd(hp, dap, rows, inner)?;
        push(
            out,
            "swiglu bwd (in place)",
            shape.clone(),
            rel_err(&env.read_bf16(hp, rows * 2 * inner)?, &dh_ref),
            TOL_BF16,
        );
        // the backward also leaves the forward output where da was
        push(
            out,
            "swiglu bwd: a over da",
            shape,
            rel_err(&env.read_bf16(dap, rows * inner)?, &a_ref),
            TOL_BF16,
        );
    }
    Ok(())
}

fn check_cross_entropy(env: &mut Env, out: &mut Vec<Check>) -> R<()> {
    for &(rows, vocab, eps) in &[
        (64usize, 32000usize, 0.1f64),
        (37, 1001, 0.0),
        (8, 50304, 0.1),
    ] {
        let shape = format!("{rows}x{vocab} ε={eps}");
        let z = env.randn_bf16(rows * vocab, 3.0);
        let targets: Vec<u32> = (0..rows)
            .map(|_| env.rng.gen_range(0..vocab as u32))
            .collect();
        let mut loss_ref = vec![0.0; rows];
        ops::cross_entropy::cross_entropy_forward(&mut loss_ref, &z, &targets, vocab, eps);
        let scale = 1.0 / rows as f64;
        let mut dz_ref = vec![0.0; rows * vocab];
        ops::cross_entropy::cross_entropy_backward(&mut dz_ref, &z, &targets, vocab, eps, scale);
        let zp = env.bf16_buf(&z)?;
        let tp = env.i32_buf(&targets)?;
        let lp = env.poisoned(rows * 4)?;
        env.ops
            .cross_entropy(zp, tp, lp, rows, vocab, eps as f32, scale as f32, true)?;
        push(
            out,
            "cross-entropy loss",
            shape.clone(),
            rel_err(&env.read_f32(lp, rows)?, &loss_ref),
            1e-5,
        );
        push(
            out,
            "cross-entropy dlogits (bf16 in place)",
            shape,
            rel_err(&env.read_bf16(zp, rows * vocab)?, &dz_ref),
            TOL_BF16,
        );
    }
    Ok(())
}

fn check_adamw(env: &mut Env, out: &mut Vec<Check>) -> R<()> {
    // all gradients fp32 (every one zeroed), then the first two tensors' gradients in bf16
    // inside their fp32 slots, as the backend holds one-micro-step weight gradients, with the
    // second moments in a compact buffer of their own order (as when Muon matrices have none)
    check_adamw_with(env, out, [false; 3], false)?;
    check_adamw_with(env, out, [true, true, false], true)
}

fn check_adamw_with(
    env: &mut Env,
    out: &mut Vec<Check>,
    in_bf16: [bool; 3],
    compact_v: bool,
) -> R<()> {
    // three tensors in three groups, three steps, clip multiplier 0.7; the third starts at an
    // element offset that is not a multiple of 4 (the kernel's scalar path)
    let sizes = [70_000usize, 1234, 999];
    let groups = [(3e-3f64, 0.1f64), (1e-3, 0.0), (2e-3, 0.05)];
    let n: usize = sizes.iter().sum();
    let starts: Vec<usize> = sizes
        .iter()
        .scan(0, |s, &x| {
            let t = *s;
            *s += x;
            Some(t)
        })
        .collect();
    let p0 = env.randn(n, 1.0);
    let mut p_ref = p0.iter().map(|&v| v as f32).collect::<Vec<f32>>();
    let (mut m_ref, mut v_ref) = (vec![0f32; n], vec![0f32; n]);
    let pp = env.f32_buf(&p0)?;
    // compact second moments: the tensors in reverse order, 64-aligned, 64 apart
    let mut vstarts = [0usize; 3];
    let mut vlen = 0;
    for t in (0..3).rev() {
        vstarts[t] = vlen;
        vlen += sizes[t].div_ceil(64) * 64 + 64;
    }
    let vstart = |t: usize| if compact_v { vstarts[t] } else { starts[t] };
    let zeros = vec![0.0; n];
    let mp = env.f32_buf(&zeros)?;
    let vp = env.f32_buf(&vec![0.0; if compact_v { vlen } else { n }])?;
    let gp = env.poisoned(n * 4)?;
    let pb = env.poisoned(n * 2)?;
    // chunk table: fp32-gradient items first (the zeroed ones), then the bf16 ones
    let (mut offs, mut lens, mut grps, mut gbf, mut voff) = (
        Vec::<i64>::new(),
        Vec::<i32>::new(),
        Vec::<i32>::new(),
        Vec::<i64>::new(),
        Vec::<i64>::new(),
    );
    for bf in [false, true] {
        for t in (0..3).filter(|&t| in_bf16[t] == bf) {
            let mut o = 0;
            while o < sizes[t] {
                let len = (sizes[t] - o).min(crate::distributed::flat_layout::OPT_CHUNK);
                offs.push((starts[t] + o) as i64);
                lens.push(len as i32);
                grps.push(t as i32);
                // a bf16 gradient fills the first half of its tensor's fp32 slot
                gbf.push(if bf { (2 * starts[t] + o) as i64 } else { -1 });
                voff.push((vstart(t) + o) as i64);
                o += len;
            }
        }
    }
    let zeroed = gbf.iter().filter(|&&x| x < 0).count();
    let any_bf16 = in_bf16.iter().any(|&b| b);
    let table = |env: &mut Env, bytes: usize, upload: &dyn Fn(&Env, u64) -> R<()>| -> R<u64> {
        let ptr = env.poisoned(offs.len() * bytes)?;
        upload(env, ptr)?;
        Ok(ptr)
    };
    let t = OptChunkTables {
        off: table(env, 8, &|e, p| e.gpu.upload(p, &offs))?,
        len: table(env, 4, &|e, p| e.gpu.upload(p, &lens))?,
        group: table(env, 4, &|e, p| e.gpu.upload(p, &grps))?,
        gbf: if any_bf16 {
            table(env, 8, &|e, p| e.gpu.upload(p, &gbf))?
        } else {
            0
        },
        voff: if compact_v {
            table(env, 8, &|e, p| e.gpu.upload(p, &voff))?
        } else {
            0
        },
        count: offs.len(),
    };
    let hp = env.poisoned(8 * 4 * groups.len())?;
    let norm = env.poisoned(8)?;
    let (mut norm_err, mut g_last) = (0.0f64, Vec::new());
    for step in 1..=3u64 {
        let g = env.randn(n, 0.1);
        // what the optimizer sees: bf16-held gradients rounded, as ArchScale's autocast does
        let mut g32: Vec<f32> = g.iter().map(|&x| x as f32).collect();
        let mut bits = vec![0u32; n];
        for (t, &bf) in in_bf16.iter().enumerate() {
            let r = starts[t]..starts[t] + sizes[t];
            if bf {
                let h: Vec<u16> = g32[r.clone()]
                    .iter()
                    .map(|&x| bf16::from_f32(x).to_bits())
                    .collect();
                for (k, x) in g32[r.clone()].iter_mut().enumerate() {
                    *x = bf16::from_bits(h[k]).to_f32();
                }
                // two bf16 per u32 word, from the slot's first word on (little-endian)
                for (k, pair) in h.chunks(2).enumerate() {
                    bits[starts[t] + k] =
                        pair[0] as u32 | (pair.get(1).copied().unwrap_or(0) as u32) << 16;
                }
            } else {
                for k in r {
                    bits[k] = g32[k].to_bits();
                }
            }
        }
        env.gpu.upload(gp, &bits)?;
        env.gpu.memset_zero(norm, 8)?;
        env.ops.grad_sum_squares(gp, &t, norm)?;
        let want_norm: f64 = g32.iter().map(|&x| x as f64 * x as f64).sum();
        let got: Vec<f64> = env.gpu.download_vec(norm, 1)?;
        norm_err = norm_err.max(((got[0] - want_norm) / want_norm).abs());
        let mut hyper = Vec::new();
        for (t, &(lr, wd)) in groups.iter().enumerate() {
            let h = AdamWHyper {
                lr,
                beta1: 0.9,
                beta2: 0.95,
                eps: 1e-8,
                weight_decay: wd,
                step,
            };
            hyper.extend(adamw_hyper(&h));
            let r = starts[t]..starts[t] + sizes[t];
            adamw_step(
                &mut p_ref[r.clone()],
                &g32[r.clone()],
                &mut m_ref[r.clone()],
                &mut v_ref[r],
                h,
                0.7,
            );
        }
        env.gpu.upload(hp, &hyper)?;
        env.ops.adamw(pp, gp, mp, vp, pb, &t, zeroed, hp, 0.7)?;
        g_last = bits;
    }
    let want: Vec<f64> = p_ref.iter().map(|&x| x as f64).collect();
    let shape = format!(
        "{n} params, 3 groups, 3 steps{}{}",
        if any_bf16 {
            ", 2 tensors' gradients in bf16"
        } else {
            ""
        },
        if compact_v {
            ", compact exp_avg_sq"
        } else {
            ""
        }
    );
    push(
        out,
        "adamw params",
        shape.clone(),
        rel_err(&env.read_f32(pp, n)?, &want),
        1e-6,
    );
    let mw: Vec<f64> = m_ref.iter().map(|&x| x as f64).collect();
    push(
        out,
        "adamw exp_avg",
        shape.clone(),
        rel_err(&env.read_f32(mp, n)?, &mw),
        1e-6,
    );
    let vw: Vec<f64> = v_ref.iter().map(|&x| x as f64).collect();
    let v_all = env.read_f32(vp, if compact_v { vlen } else { n })?;
    let v_got: Vec<f64> = (0..3)
        .flat_map(|t| v_all[vstart(t)..vstart(t) + sizes[t]].to_vec())
        .collect();
    push(
        out,
        "adamw exp_avg_sq",
        shape.clone(),
        rel_err(&v_got, &vw),
        1e-6,
    );
    if compact_v {
        // the compact buffer's padding between tensors stays as it was (zero)
        let stray = (0..vlen)
            .filter(|&k| !(0..3).any(|t| (vstart(t)..vstart(t) + sizes[t]).contains(&k)))
            .map(|k| v_all[k].abs())
            .fold(0.0f64, f64::max);
        push(
            out,
            "adamw compact exp_avg_sq padding untouched",
            shape.clone(),
            stray,
            0.0,
        );
    }
    push(
        out,
        "adamw bf16 shadow",
        shape.clone(),
        rel_err(&env.read_bf16(pb, n)?, &want),
        TOL_BF16,
    );
    push(
        out,
        "grad sum of squares (chunk tables)",
        shape.clone(),
        norm_err,
        1e-6,
    );
    // fp32 gradients are zeroed; bf16 ones are left for their product to overwrite
    let after: Vec<u32> = env.gpu.download_vec(gp, n)?;
    let wrong = (0..3)
        .flat_map(|t| (starts[t]..starts[t] + sizes[t]).map(move |k| (t, k)))
        .filter(|&(t, k)| {
            let bf_word = in_bf16[t] && k < starts[t] + sizes[t].div_ceil(2);
            if bf_word {
                after[k] != g_last[k]
            } else if in_bf16[t] {
                false // the slot's second half is not read
            } else {
                after[k] != 0
            }
        })
        .count();
    push(
        out,
        "adamw zeroes fp32 grads only",
        shape,
        wrong as f64,
        0.0,
    );
    Ok(())
}

/// The 8 floats per group that `adamw_step` reads, computed as the CPU optimizer does.
pub fn adamw_hyper(h: &AdamWHyper) -> [f32; 8] {
    let bias1 = 1.0 - h.beta1.powi(h.step as i32);
    let bias2 = 1.0 - h.beta2.powi(h.step as i32);
    [
        h.lr as f32,
        h.beta1 as f32,
        h.beta2 as f32,
        h.eps as f32,
        (1.0 - h.lr * h.weight_decay) as f32,
        (h.lr / bias1) as f32,
        bias2.sqrt() as f32,
        0.0,
    ]
}

fn check_norm_cast(env: &mut Env, out: &mut Vec<Check>) -> R<()> {
    for &n in &[1usize << 20, 12345] {
        let x: Vec<f64> = env.randn(n, 1.0).iter().map(|&v| v as f32 as f64).collect();
        let want = x.iter().map(|v| (*v as f32 as f64).powi(2)).sum::<f64>();
        let xp = env.f32_buf(&x)?;
        let op = env.poisoned(8)?;
        env.gpu.memset_zero(op, 8)?;
        env.ops.sum_squares(xp, n, op)?;
        let got: Vec<f64> = env.gpu.download_vec(op, 1)?;
        push(
            out,
            "grad norm Σx² (fp64 acc)",
            format!("{n}"),
            ((got[0] - want) / want).abs(),
            1e-6,
        );
        let bp = env.poisoned(n * 2)?;
        env.ops.cast_f32_bf16(xp, bp, n)?;
        let mut xb = x.clone();
        round_bf16(&mut xb);
        push(
            out,
            "cast f32->bf16",
            format!("{n}"),
            rel_err(&env.read_bf16(bp, n)?, &xb),
            0.0,
        );
        let fp = env.poisoned(n * 4)?;
        env.ops.cast_bf16_f32(bp, fp, n)?;
        push(
            out,
            "cast bf16->f32",
            format!("{n}"),
            rel_err(&env.read_f32(fp, n)?, &xb),
            0.0,
        );
    }
    Ok(())
}

/// Every flash variant the device runs (`sm80`, mma.sync, everywhere; on Hopper also
/// `sm90ws-leanv`, the warp-specialised wgmma/TMA kernels), each on the same cases with fresh
/// inputs; the default variant is restored afterwards.
fn check_flash(env: &mut Env, out: &mut Vec<Check>) -> R<()> {
    let default = env.ops.flash_variant();
    let mut result = Ok(());
    for variant in env.ops.flash_variants() {
        env.ops.set_flash_variant(variant)?;
        result = check_flash_variant(env, out, variant.name());
        if result.is_err() {
            break;
        }
    }
    env.ops.set_flash_variant(default)?;
    result
}

/// Document starts for varlen cases: each row split at random points (mean document length
/// `mean`), so `seg[b·T + t]` is the start of t's document within row b.
fn random_segments(rng: &mut ChaCha8Rng, batch: usize, seq: usize, mean: usize) -> Vec<u32> {
    let mut seg = vec![0u32; batch * seq];
    for b in 0..batch {
        let mut start = 0;
        for t in 0..seq {
            if t > 0 && rng.gen_range(0..mean) == 0 {
                start = t;
            }
            seg[b * seq + t] = start as u32;
        }
    }
    seg
}

fn check_flash_variant(env: &mut Env, out: &mut Vec<Check>, variant: &str) -> R<()> {
    // (batch, seq, heads, groups, head_dim, window, mean document length; 0 = no varlen)
    let cases: [(usize, usize, usize, usize, usize, usize, usize); 10] = [
        (2, 200, 4, 2, 64, 0, 0),
        // 4 query heads per kv group: long per-CTA loops of the Hopper backward (up to 48 items)
        (1, 768, 8, 2, 128, 0, 0),
        (1, 256, 8, 2, 128, 64, 0),
        (1, 129, 2, 1, 128, 0, 0),
        (1, 1024, 4, 4, 128, 0, 0),
        (2, 77, 6, 3, 64, 16, 0),
        (2, 300, 4, 2, 128, 0, 60),
        (1, 333, 4, 1, 64, 48, 40),
        (2, 1000, 2, 1, 128, 0, 300),
        (1, 520, 2, 2, 64, 0, 7),
    ];
    for &(batch, seq, heads, groups, hs, window, doc) in &cases {
        let shape = format!(
            "B{batch} T{seq} H{heads} G{groups} hs{hs}{}{} [{variant}]",
            if window > 0 {
                format!(" W{window}")
            } else {
                String::new()
            },
            if doc > 0 {
                format!(" varlen~{doc}")
            } else {
                String::new()
            }
        );
        let scale = 1.0 / (hs as f64).sqrt();
        let seg = (doc > 0).then(|| random_segments(&mut env.rng, batch, seq, doc));
        let segp = match &seg {
            Some(sg) => env.i32_buf(sg)?,
            None => 0,
        };
        let l = AttnLayout::fused_qkv(batch, seq, heads, groups, hs, scale as f32, window)
            .with_seg(segp);
        let seg_row = |b: usize| seg.as_deref().map(|sg| &sg[b * seq..(b + 1) * seq]);
        let rows = batch * seq;
        let width = l.q_row_stride;
        let qkv = env.randn_bf16(rows * width, 1.0);
        // Reference: the CPU oracle called once per query head (batch 1, one kv head), with
        // the head's kv group picked here; dK/dV of a group accumulate over its heads.
        let qpg = heads / groups;
        let s1 = ops::attention::AttnShape {
            batch: 1,
            seq,
            n_head: 1,
            n_kv: 1,
            head_size: hs,
            window: if window > 0 { Some(window) } else { None },
            scale,
        };
        let slot = |r: usize, sl: usize| r * width + sl * hs;
        let gather = |b: usize, sl: usize, src: &[f64]| -> Vec<f64> {
            (0..seq)
                .flat_map(|t| src[slot(b * seq + t, sl)..][..hs].to_vec())
                .collect()
        };
        let mut o_ref = vec![0.0; rows * heads * hs];
        let mut probs_all = Vec::new();
        for b in 0..batch {
            for h in 0..heads {
                let (g, j) = (h / qpg, h % qpg);
                let q = gather(b, g * (qpg + 2) + j, &qkv);
                let k = gather(b, g * (qpg + 2) + qpg, &qkv);
                let v = gather(b, g * (qpg + 2) + qpg + 1, &qkv);
                let mut o = vec![0.0; seq * hs];
                let mut probs = vec![0.0; seq * seq];
                ops::attention::attention_forward(&mut o, &mut probs, &q, &k, &v, &s1, seg_row(b));
                for t in 0..seq {
                    o_ref[((b * seq + t) * heads + h) * hs..][..hs]
                        .copy_from_slice(&o[t * hs..(t + 1) * hs]);
                }
                probs_all.push(probs);
            }
        }

        let qkvp = env.bf16_buf(&qkv)?;
        let op = env.poisoned(rows * heads * hs * 2)?;
        let lsep = env.poisoned(batch * heads * seq * 4)?;
        let k_off = (l.fused_k_offset() * 2) as u64;
        let v_off = (l.fused_v_offset() * 2) as u64;
        env.ops
            .flash_fwd(&l, qkvp, qkvp + k_off, qkvp + v_off, op, lsep)?;
        let o_gpu = env.read_bf16(op, rows * heads * hs)?;
        push(
            out,
            "flash fwd O",
            shape.clone(),
            rel_err(&o_gpu, &o_ref),
            TOL_BF16,
        );

        // backward from a random dO
        let dout = env.randn_bf16(rows * heads * hs, 1.0);
        let mut dqkv_ref = vec![0.0; rows * width];
        for b in 0..batch {
            for g in 0..groups {
                let k = gather(b, g * (qpg + 2) + qpg, &qkv);
                let v = gather(b, g * (qpg + 2) + qpg + 1, &qkv);
                let (mut dk, mut dv) = (vec![0.0; seq * hs], vec![0.0; seq * hs]);
                for j in 0..qpg {
                    let h = g * qpg + j;
                    let q = gather(b, g * (qpg + 2) + j, &qkv);
                    let d_o: Vec<f64> = (0..seq)
                        .flat_map(|t| dout[((b * seq + t) * heads + h) * hs..][..hs].to_vec())
                        .collect();
                    let mut dq = vec![0.0; seq * hs];
                    ops::attention::attention_backward(
                        &mut dq,
                        &mut dk,
                        &mut dv,
                        &d_o,
                        &probs_all[b * heads + h],
                        &q,
                        &k,
                        &v,
                        &s1,
                        seg_row(b),
                    );
                    for t in 0..seq {
                        dqkv_ref[slot(b * seq + t, g * (qpg + 2) + j)..][..hs]
                            .copy_from_slice(&dq[t * hs..(t + 1) * hs]);
                    }
                }
                for t in 0..seq {
                    dqkv_ref[slot(b * seq + t, g * (qpg + 2) + qpg)..][..hs]
                        .copy_from_slice(&dk[t * hs..(t + 1) * hs]);
                    dqkv_ref[slot(b * seq + t, g * (qpg + 2) + qpg + 1)..][..hs]
                        .copy_from_slice(&dv[t * hs..(t + 1) * hs]);
                }
            }
        }
        let dop = env.bf16_buf(&dout)?;
        let dq_acc = env.poisoned(rows * heads * hs * 4)?;
        let delta = env.poisoned(batch * heads * seq * 4)?;

        // The same backward with the RoPE backward fused into it (dQ's conversion, dK's
        // store) against the CPU's flash backward then rope_backward on Q and K. The tables
        // hold more positions than seq, as the backend's may.
        let table = ops::rope::RopeTable::new(seq + 3, hs, 10000.0);
        let mut rope_ref = dqkv_ref.clone();
        for b in 0..batch {
            for sl in 0..groups * (qpg + 2) {
                if sl % (qpg + 2) == qpg + 1 {
                    continue; // V is not rotated
                }
                let mut head = gather(b, sl, &dqkv_ref);
                ops::rope::rope_backward(&mut head, &table, seq, hs);
                for t in 0..seq {
                    rope_ref[slot(b * seq + t, sl)..][..hs]
                        .copy_from_slice(&head[t * hs..(t + 1) * hs]);
                }
            }
        }
        let cos: Vec<f64> = table.cos.iter().map(|&c| c as f64).collect();
        let sin: Vec<f64> = table.sin.iter().map(|&c| c as f64).collect();
        let rope = RopeTables {
            cos: env.bf16_buf(&cos)?,
            sin: env.bf16_buf(&sin)?,
            len: table.seq,
        };
        let fused = FusedQkv {
            rows,
            groups,
            qpg,
            hs,
        };
        for (name, rope, want) in [
            ("flash bwd", None, &dqkv_ref),
            ("flash bwd+rope", Some(rope), &rope_ref),
        ] {
            let dqkvp = env.poisoned(rows * width * 2)?;
            env.ops.flash_bwd(
                &l,
                qkvp,
                qkvp + k_off,
                qkvp + v_off,
                op,
                dop,
                lsep,
                dqkvp,
                dqkvp + k_off,
                dqkvp + v_off,
                dq_acc,
                delta,
                rope,
            )?;
            let got = env.read_bf16(dqkvp, rows * width)?;
            // split the error by slot kind
            for (slot_name, pick) in [
                ("dQ", SlotKind::Q),
                ("dK", SlotKind::K),
                ("dV", SlotKind::V),
            ] {
                let (a, b) = (fused.pick(&got, pick), fused.pick(want, pick));
                push(
                    out,
                    &format!("{name} {slot_name}"),
                    shape.clone(),
                    rel_err(&a, &b),
                    TOL_BF16,
                );
            }
        }
    }
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum SlotKind {
    Q,
    K,
    V,
}

/// The fused grouped QKV layout `[rows, G, qpg + 2, hs]` (per group: qpg query slots, K, V).
struct FusedQkv {
    rows: usize,
    groups: usize,
    qpg: usize,
    hs: usize,
}

impl FusedQkv {
    /// Every slot of kind `kind` of `buf`, row by row.
    fn pick(&self, buf: &[f64], kind: SlotKind) -> Vec<f64> {
        let (slots, hs) = (self.groups * (self.qpg + 2), self.hs);
        let mut v = Vec::new();
        for r in 0..self.rows {
            for sl in 0..slots {
                let k = match sl % (self.qpg + 2) {
                    x if x < self.qpg => SlotKind::Q,
                    x if x == self.qpg => SlotKind::K,
                    _ => SlotKind::V,
                };
                if k == kind {
                    v.extend_from_slice(&buf[(r * slots + sl) * hs..][..hs]);
                }
            }
        }
        v
    }
}

/// `micro` rows of `seq_len + 1` uniformly random token ids of `plan`'s vocabulary.
pub(super) fn random_rows(
    rng: &mut ChaCha8Rng,
    plan: &archscale_compiler::Plan,
    micro: usize,
) -> Vec<u32> {
    (0..micro * (plan.layout.seq_len + 1))
        .map(|_| rng.gen_range(0..plan.model.vocab_size as u32))
        .collect()
}

/// Whole-model parity: from the same init and batch, the CUDA backend's loss and every
/// parameter gradient against the CPU reference model (f32, no bf16 rounding). The CUDA side
/// runs bf16 matmuls and activations, so agreement is at bf16 level, not bit level.
pub fn model_parity(plan: &archscale_compiler::Plan, seed: u64) -> crate::Result<Vec<Check>> {
    use crate::Backend;
    let model = crate::cpu::model::CpuModel::<f32>::new(plan)?;
    let init = model.init_params();
    let micro = plan.layout.micro_batch;
    let seq = plan.layout.seq_len;
    let rows = random_rows(&mut ChaCha8Rng::seed_from_u64(seed), plan, micro);
    let smoothing = plan.training.label_smoothing;
    // The reference multiplies by the same bf16 weights the GPU does and stores in bf16 what
    // the GPU stores in bf16 where gradients are ill-conditioned (`CpuModel::with_storage`);
    // the all-fp32 model measures how much each tensor moves under that rounding alone.
    let operands = gemm_operands_as_bf16(plan, &init);
    let mut be = super::CudaBackend::new(plan, 0, &init)?;
    // one micro-step: the weight gradients as ArchScale hands them over, in bf16
    be.set_weight_grads_bf16(true)?;
    let rounded = crate::cpu::model::CpuModel::<f32>::new(plan)?
        .with_storage(crate::cpu::float::Storage::Bf16)
        .with_bf16_branches(be.branches_in_bf16());
    let mut grads = model.zero_grads();
    let t = std::time::Instant::now();
    let loss_cpu = rounded.forward_backward(&operands, &mut grads, &rows, micro, 1.0, smoothing)?;
    let cpu_s = t.elapsed().as_secs_f64();
    let mut grads_f32w = model.zero_grads();
    model.forward_backward(&init, &mut grads_f32w, &rows, micro, 1.0, smoothing)?;
    // A second draw of the same roundings: the weights nudged by 2⁻²⁰ of themselves, about
    // the size of the GPU's own accumulation-order differences, so only the values next to a
    // bf16 boundary round the other way. An ill-conditioned gradient moves between two such
    // draws by as much as under the rounding itself, or more (SambaY-DA's λ tolerances: up to 5×).
    let nudged = nudged_params(&init, seed);
    let mut grads_draw = model.zero_grads();
    rounded.forward_backward(
        &gemm_operands_as_bf16(plan, &nudged),
        &mut grads_draw,
        &rows,
        micro,
        1.0,
        smoothing,
    )?;
    let loss_gpu = be.forward_backward(&rows, micro, 1.0)?;
    let ggpu = be.read_grads()?;
    for (i, _) in be.grads_in_bf16().iter().enumerate().filter(|(_, b)| **b) {
        for x in grads[i].iter_mut().chain(grads_draw[i].iter_mut()) {
            *x = bf16::from_f32(*x).to_f32();
        }
    }
    let shape = format!("{} B{micro} T{seq}", plan.model.name);
    let mut out = vec![Check {
        name: "model loss".into(),
        shape: shape.clone(),
        rel_err: ((loss_gpu - loss_cpu) / loss_cpu).abs(),
        tol: 1e-2,
        seconds: cpu_s,
    }];
    let to64 = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<f64>>();
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (i, p) in plan.params.iter().enumerate() {
        let a = to64(&ggpu[i]);
        let b = to64(&grads[i]);
        let w = to64(&grads_f32w[i]);
        let b2 = to64(&grads_draw[i]);
        for (x, y) in a.iter().zip(&b) {
            num += (x - y) * (x - y);
            den += y * y;
        }
        // Mamba x_proj stacks three projections (dt, B, C): check each block of rows too.
        let mut blocks = vec![(p.name.clone(), 0..a.len())];
        if let (true, Some(m)) = (p.name.ends_with("x_proj.weight"), plan.model.mamba) {
            let cols = m.d_inner;
            let (r, ns) = (m.dt_rank, m.d_state);
            for (part, rows) in [("dt", 0..r), ("B", r..r + ns), ("C", r + ns..r + 2 * ns)] {
                blocks.push((
                    format!("{} [{part} rows]", p.name),
                    rows.start * cols..rows.end * cols,
                ));
            }
        }
        for (name, span) in blocks {
            let sens = rel_err(&w[span.clone()], &b[span.clone()])
                .max(rel_err(&b2[span.clone()], &b[span.clone()]));
            let (rel, tol) = (
                rel_err(&a[span.clone()], &b[span]),
                conditioned_tolerance(5e-2, sens),
            );
            let name = if tol > 5e-2 {
                format!("grad {name} (ill-conditioned: bf16 rounding alone moves it {sens:.1e})")
            } else {
                format!("grad {name}")
            };
            out.push(Check {
                name,
                shape: shape.clone(),
                rel_err: rel,
                tol,
                seconds: 0.0,
            });
        }
    }
    out.push(Check {
        name: "all gradients".into(),
        shape,
        rel_err: if den > 0.0 {
            (num / den).sqrt()
        } else {
            f64::NAN
        },
        tol: 2e-2,
        seconds: 0.0,
    });
    out.extend(accumulation::accumulation_parity(plan, seed)?);
    Ok(out)
}

/// `params` with every value times (1 ± 2⁻²⁰), the sign drawn per element from `seed`: a
/// second, equally valid draw of which values land on which side of a bf16 boundary.
fn nudged_params(params: &[Vec<f32>], seed: u64) -> Vec<Vec<f32>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x6e75_6467_6521);
    let eps = (2.0f32).powi(-20);
    params
        .iter()
        .map(|t| {
            t.iter()
                .map(|&x| {
                    x * if rng.gen::<bool>() {
                        1.0 + eps
                    } else {
                        1.0 - eps
                    }
                })
                .collect()
        })
        .collect()
}

/// The parameters as the GPU's matrix multiplies see them: every 2-D `.weight` except the
/// embedding (looked up in fp32) rounded to bf16; vectors, `A_log` and the conv taps stay fp32.
pub fn gemm_operands_as_bf16(
    plan: &archscale_compiler::Plan,
    params: &[Vec<f32>],
) -> Vec<Vec<f32>> {
    params
        .iter()
        .zip(&plan.params)
        .map(|(v, p)| {
            let gemm = p.shape.len() == 2 && p.name.ends_with(".weight") && !p.name.contains("wte");
            if gemm {
                v.iter().map(|&x| bf16::from_f32(x).to_f32()).collect()
            } else {
                v.clone()
            }
        })
        .collect()
}

/// Tolerance of a gradient block whose CPU value moves by `sens` (relative) when the weights
/// and the reference's bf16-stored activations are rounded, or between two draws of those
/// roundings (`model_parity` takes the larger): the GPU rounds every other activation and the
/// upstream gradients as well, so an ill-conditioned block (λ of differential attention,
/// Mamba's B/C rows at init) may differ by a few times that and still be right.
pub fn conditioned_tolerance(base: f64, sens: f64) -> f64 {
    if sens.is_finite() {
        base.max(4.0 * sens)
    } else {
        base
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_rounding_draw_moves_every_value_by_2_pow_minus_20_and_flips_a_few_roundings() {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let params: Vec<Vec<f32>> = vec![(0..100_000).map(|_| rng.gen_range(-1.0..1.0)).collect()];
        let nudged = nudged_params(&params, 1);
        let eps = 2f64.powi(-20);
        let (mut up, mut flips) = (0, 0);
        for (&x, &y) in params[0].iter().zip(&nudged[0]) {
            let r = (y as f64 - x as f64) / x as f64;
            // x·(1 ± 2⁻²⁰) rounded to fp32: off by at most one fp32 rounding (2⁻²⁴)
            assert!((r.abs() - eps).abs() <= 2f64.powi(-24), "{x} -> {y}");
            up += (r > 0.0) as usize;
            flips += (bf16::from_f32(x) != bf16::from_f32(y)) as usize;
        }
        // both signs, about half each; a few in 2^12 values cross a bf16 boundary
        assert!((45_000..55_000).contains(&up), "{up}");
        assert!((1..200).contains(&flips), "{flips}");
        assert_eq!(nudged, nudged_params(&params, 1), "deterministic per seed");
    }

    #[test]
    fn the_reference_rounds_exactly_the_gemm_weights() {
        use crate::cpu::model_tests::{model_config, plan, sambay_layers, Tiny};
        let p = plan(
            model_config(
                Tiny {
                    rope: false,
                    tied: false,
                    ..Tiny::default()
                },
                8,
                true,
            ),
            sambay_layers(true, "mamba"),
        );
        // Random values (not the init: some tensors start at zero, which rounding keeps).
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let init: Vec<Vec<f32>> = p
            .params
            .iter()
            .map(|s| (0..s.numel()).map(|_| rng.gen_range(-1.0..1.0)).collect())
            .collect();
        let ops = gemm_operands_as_bf16(&p, &init);
        let mut rounded = Vec::new();
        for ((spec, a), b) in p.params.iter().zip(&init).zip(&ops) {
            let is_bf16 = b.iter().all(|&x| bf16::from_f32(x).to_f32() == x);
            if a != b {
                assert!(is_bf16, "{} was changed but is not bf16", spec.name);
                rounded.push(spec.name.clone());
            }
        }
        let has = |s: &str| rounded.iter().any(|n| n.ends_with(s));
        for gemm in [
            "in_proj.weight",
            "x_proj.weight",
            "dt_proj.weight",
            "out_proj.weight",
            "attn.attn.weight",
            "lm_head.weight",
        ] {
            assert!(has(gemm), "{gemm} not rounded: {rounded:?}");
        }
        for fp32 in [
            "wte.weight",
            "A_log",
            "conv1d.weight",
            "lambda_q1",
            "norm_1.weight",
            "dt_proj.bias",
        ] {
            assert!(!has(fp32), "{fp32} must stay fp32");
        }
        assert_eq!(conditioned_tolerance(5e-2, 1e-3), 5e-2);
        assert_eq!(conditioned_tolerance(5e-2, 0.1), 0.4);
        assert_eq!(conditioned_tolerance(5e-2, f64::NAN), 5e-2);
    }

    #[test]
    fn relative_error_is_scale_free_and_nan_never_passes() {
        let r = vec![1.0, -2.0, 3.0];
        assert_eq!(rel_err(&r, &r), 0.0);
        let o: Vec<f64> = r.iter().map(|x| x * 1.01).collect();
        assert!((rel_err(&o, &r) - 0.01).abs() < 1e-12);
        let big: Vec<f64> = r.iter().map(|x| x * 1e6).collect();
        let ob: Vec<f64> = big.iter().map(|x| x * 1.01).collect();
        assert!((rel_err(&ob, &big) - 0.01).abs() < 1e-12);
        let nan = vec![1.0, f64::NAN, 3.0];
        let c = Check {
            name: "x".into(),
            shape: String::new(),
            rel_err: rel_err(&nan, &r),
            tol: 1.0,
            seconds: 0.0,
        };
        assert!(!c.passed());
        assert!(rel_err(&[1.0], &[0.0]).is_infinite());
    }

    #[test]
    fn adamw_hyper_matches_the_cpu_optimizer_constants() {
        let h = AdamWHyper {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            step: 2,
        };
        let v = adamw_hyper(&h);
        assert_eq!(v[0], 1e-3);
        assert!((v[4] as f64 - (1.0 - 1e-4)).abs() < 1e-7);
        assert!((v[5] as f64 - 1e-3 / (1.0 - 0.81)).abs() < 1e-9);
        assert!((v[6] as f64 - (1.0f64 - 0.9025).sqrt()).abs() < 1e-7);
    }

    #[test]
    fn without_a_gpu_the_selftest_reports_why_and_runs_no_gpu_check() {
        let r = run(Some(7));
        assert_eq!(r.seed, 7);
        if r.device.is_err() {
            assert!(r.checks.is_empty());
            assert!(!r.all_passed());
        }
    }
}
