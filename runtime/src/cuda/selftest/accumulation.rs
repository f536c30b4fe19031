//! Gradients across optimizer steps. After a step the CUDA backend zeroes only the gradients
//! that kernels add to; the first weight-gradient products of the next step overwrite the
//! others (beta 0). Two optimizer steps of two micro-steps each (an evaluation between them)
//! run on three backends from the same init: that path, and twice the path that zeroes every
//! gradient (the old one; its two runs give the run-to-run noise of the atomics), all three
//! restarted from the same state before the second step. Checked:
//! losses, the accumulated gradients of each step and the parameters after each step against
//! the zero-everything run, the gradients read just after a step (zero), and each step's
//! accumulated gradients and losses against the CPU reference at the CUDA run's parameters.

use super::{gemm_operands_as_bf16, random_rows, rel_err, Check};
use crate::cpu::float::Storage;
use crate::cpu::model::CpuModel;
use crate::cuda::CudaBackend;
use crate::Backend;
use archscale_compiler::Plan;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

const STEPS: usize = 2;
const MICRO_STEPS: usize = 2;
/// Floor of the tolerance of losses against the zero-everything run (which differs from
/// itself by the order of fp32 atomics only).
const SAME_PATH_TOL: f64 = 1e-4;
/// Floor of the per-tensor tolerance of gradients and parameters against the zero-everything
/// run. A zeroing or accumulation fault leaves a whole micro-step's (or step's) gradient in a
/// tensor, an error of order 1; the order of atomics alone moved ill-conditioned tensors (Mamba x_proj
/// B/C rows, LayerNorm weights, differential attention's λ) by up to 3e-3 between runs of
/// the same seed (H200, 2026-11-29), so the other zero-all run is no bound for it.
const GRAD_PATH_TOL: f64 = 1e-2;

fn to64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// The worst tensor of `a` against `b` as one check: relative error and its tolerance
/// (`tol(i)` for tensor `i`); the line names the tensor whose error is largest against its
/// tolerance.
fn worst_tensor(
    plan: &Plan,
    name: &str,
    shape: &str,
    a: &[Vec<f32>],
    b: &[Vec<f32>],
    tol: &dyn Fn(usize) -> f64,
) -> Check {
    let mut worst = (f64::NEG_INFINITY, 0.0, 0.0, 0);
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        let (x, y) = (to64(x), to64(y));
        let e = if x == y { 0.0 } else { rel_err(&x, &y) };
        let t = tol(i);
        let ratio = if e.is_nan() { f64::INFINITY } else { e / t };
        if ratio > worst.0 {
            worst = (ratio, e, t, i);
        }
    }
    Check {
        name: format!("{name} (worst: {})", plan.params[worst.3].name),
        shape: shape.to_string(),
        rel_err: worst.1,
        tol: worst.2,
        seconds: 0.0,
    }
}

/// Relative error over all tensors together.
fn overall(a: &[Vec<f32>], b: &[Vec<f32>]) -> f64 {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (x, y) in a.iter().zip(b) {
        for (&p, &q) in x.iter().zip(y) {
            num += (p as f64 - q as f64).powi(2);
            den += (q as f64).powi(2);
        }
    }
    if den > 0.0 {
        (num / den).sqrt()
    } else if num == 0.0 {
        0.0
    } else {
        f64::NAN
    }
}

pub fn accumulation_parity(plan: &Plan, seed: u64) -> crate::Result<Vec<Check>> {
    let model = CpuModel::<f32>::new(plan)?;
    let init = model.init_params();
    let (micro, seq) = (plan.layout.micro_batch, plan.layout.seq_len);
    let smoothing = plan.training.label_smoothing;
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x9e37_79b9_7f4a_7c15);
    let batches: Vec<Vec<u32>> = (0..STEPS * MICRO_STEPS)
        .map(|_| random_rows(&mut rng, plan, micro))
        .collect();
    let lrs: Vec<f64> = plan
        .optimizer
        .groups
        .iter()
        .map(|g| g.peak_group_lr())
        .collect();
    // [overwrite path, zero-everything path, zero-everything again]
    let mut runs = Vec::new();
    for overwrite in [true, false, false] {
        let mut be = CudaBackend::new(plan, 0, &init)?;
        be.set_grad_overwrite(overwrite)?;
        // two micro-steps: weight gradients accumulate in fp32
        be.set_weight_grads_bf16(false)?;
        runs.push(be);
    }
    let rounded = CpuModel::<f32>::new(plan)?
        .with_storage(Storage::Bf16)
        .with_bf16_branches(runs[0].branches_in_bf16());
    let shape = format!(
        "{} B{micro} T{seq}, {STEPS} steps x {MICRO_STEPS} micro",
        plan.model.name
    );
    let scale = 1.0 / MICRO_STEPS as f32;
    let mut out = Vec::new();
    let push = |out: &mut Vec<Check>, name: String, rel_err: f64, tol: f64| {
        out.push(Check {
            name,
            shape: shape.clone(),
            rel_err,
            tol,
            seconds: 0.0,
        })
    };
    for step in 0..STEPS {
        let params_before = runs[0].read_params()?;
        let mut losses = [[0.0f64; 3]; MICRO_STEPS];
        for (k, rows) in batches[step * MICRO_STEPS..(step + 1) * MICRO_STEPS]
            .iter()
            .enumerate()
        {
            for (r, be) in runs.iter_mut().enumerate() {
                losses[k][r] = be.forward_backward(rows, micro, scale)?;
            }
        }
        let grads: Vec<Vec<Vec<f32>>> = runs
            .iter()
            .map(|be| be.read_grads())
            .collect::<crate::Result<_>>()?;
        // CPU reference at the overwrite run's parameters (its GEMM weights rounded to bf16
        // as the GPU multiplies them); the all-fp32 model gives each tensor's sensitivity
        // to that rounding.
        let operands = gemm_operands_as_bf16(plan, &params_before);
        let (mut g_cpu, mut g_f32) = (rounded.zero_grads(), rounded.zero_grads());
        let mut loss_cpu = Vec::new();
        for rows in &batches[step * MICRO_STEPS..(step + 1) * MICRO_STEPS] {
            loss_cpu.push(
                rounded.forward_backward(&operands, &mut g_cpu, rows, micro, scale, smoothing)?,
            );
            model.forward_backward(&params_before, &mut g_f32, rows, micro, scale, smoothing)?;
        }
        let sens: Vec<f64> = g_f32
            .iter()
            .zip(&g_cpu)
            .map(|(w, b)| rel_err(&to64(w), &to64(b)))
            .collect();
        let s = step + 1;
        let loss_noise = losses
            .iter()
            .map(|l| ((l[2] - l[1]) / l[1]).abs())
            .fold(0.0, f64::max);
        let loss_diff = losses
            .iter()
            .map(|l| ((l[0] - l[1]) / l[1]).abs())
            .fold(0.0, f64::max);
        push(
            &mut out,
            format!("accum step {s}: losses, overwrite vs zero-all path"),
            loss_diff,
            SAME_PATH_TOL.max(4.0 * loss_noise),
        );
        let loss_vs_cpu = losses
            .iter()
            .zip(&loss_cpu)
            .map(|(l, c)| ((l[0] - c) / c).abs())
            .fold(0.0, f64::max);
        if step == 0 {
            push(
                &mut out,
                format!("accum step {s}: losses vs CPU"),
                loss_vs_cpu,
                1e-2,
            );
        }
        let noise: Vec<f64> = grads[2]
            .iter()
            .zip(&grads[1])
            .map(|(a, b)| {
                if a == b {
                    0.0
                } else {
                    rel_err(&to64(a), &to64(b))
                }
            })
            .collect();
        out.push(worst_tensor(
            plan,
            &format!("accum step {s}: grads, overwrite vs zero-all path"),
            &shape,
            &grads[0],
            &grads[1],
            // an ill-conditioned tensor's atomics noise is not bounded by one other run's
            &|i| GRAD_PATH_TOL.max(4.0 * noise[i]).max(4.0 * sens[i]),
        ));
        // Against the CPU over all tensors together, and at the first step: the second
        // starts from parameters that one AdamW step moved by ≈ ±lr per element, where the
        // ill-conditioned blocks (Mamba x_proj B/C rows, differential attention) dominate the
        // comparison on both paths alike; per-tensor CPU parity is model_parity's question.
        for (r, label) in [(0, "overwrite"), (1, "zero-all")] {
            if step > 0 {
                break;
            }
            push(
                &mut out,
                format!("accum step {s}: all grads vs CPU, {label} path"),
                overall(&grads[r], &g_cpu),
                2e-2,
            );
        }
        let norm = runs[0].grad_norm()?;
        for be in runs.iter_mut().skip(1) {
            be.grad_norm()?;
        }
        // one clip coefficient for all three, so the runs differ by their gradients only
        let mult = crate::optim::clip_coefficient(norm, plan.optimizer.grad_clip);
        for be in runs.iter_mut() {
            be.optimizer_step(&lrs, mult)?;
        }
        let after = runs[0].read_grads()?;
        let nonzero = after.iter().flatten().filter(|&&x| x != 0.0).count();
        push(
            &mut out,
            format!("accum step {s}: gradients read after the step are zero (count non-zero)"),
            nonzero as f64,
            0.0,
        );
        if step + 1 < STEPS {
            // an evaluation between steps must leave the gradients alone: step 2's gradient
            // comparison sees it (its losses and parameters are not compared: AdamW turns
            // atomics' sign flips of near-zero gradients into whole-step differences)
            for be in runs.iter_mut() {
                be.eval_loss(&batches[0], micro, seq + 1, &[seq])?;
            }
            // The next step starts all three from the same parameters and optimizer state:
            // its comparison then sees the gradient path, not this step's atomics noise
            // amplified by AdamW (an element whose gradient is ≈ 0 moves by ±lr) into
            // ill-conditioned gradients (differential attention's λ moved by 30 % so).
            let p = runs[1].read_params()?;
            let st = runs[1].read_optimizer_state()?;
            for r in [0, 2] {
                runs[r].write_params(&p)?;
                runs[r].write_optimizer_state(&st)?;
            }
        }
    }
    // a norm taken after a step sees zero gradients
    let norm = runs[0].grad_norm()?;
    push(
        &mut out,
        "accum: grad norm right after a step".into(),
        norm,
        0.0,
    );
    Ok(out)
}
