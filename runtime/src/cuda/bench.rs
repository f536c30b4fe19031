//! Training-throughput benchmark of the CUDA backend on a Plan: full optimizer steps
//! (forward, backward, grad norm, clip, AdamW) on a fixed random batch, timed after warm-up.

use super::backend::{dims_of, CudaBackend};
use crate::{Backend, Result};
use archscale_compiler::plan::{InitRule, Plan};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

/// Dense bf16 peak used for MFU (H100/H200 SXM datasheet, as ArchScale and torch_ref.py).
pub const PEAK_FLOPS: f64 = 989e12;

#[derive(Clone, Debug, serde::Serialize)]
pub struct BenchResult {
    pub run_name: String,
    pub device: String,
    pub depth: usize,
    pub params: u64,
    pub micro: usize,
    pub seq: usize,
    pub steps: usize,
    pub step_s: f64,
    pub tokens_per_s: f64,
    /// MFU on ArchScale's basis: 6N + 12·L·n·T per token, N = all parameters.
    pub mfu: f64,
    /// MFU on torch_ref.py's basis: 6(N − embedding) + 12·L·n·T.
    pub mfu_torch_basis: f64,
    pub peak_gib: f64,
    /// The plan's per-GPU memory estimate at this micro-batch (`archscale plan`), to set
    /// beside the measured peak.
    pub planned_gib: f64,
    pub loss: f64,
    /// Milliseconds per op kind in one profiled step (events between ops), if asked for.
    pub profile: Vec<(String, f64)>,
}

/// Fast parallel init for benchmarking: each rule's distribution matched in mean and
/// variance (normal as uniform of the same std), seeded per chunk.
pub fn bench_init(plan: &Plan, seed: u64) -> Vec<Vec<f32>> {
    plan.params
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let n = p.numel();
            let mut v = vec![0f32; n];
            match &p.init {
                InitRule::Ones => v.iter_mut().for_each(|x| *x = 1.0),
                InitRule::Zeros => {}
                rule => {
                    let bound = match rule {
                        InitRule::Normal { std } => (3.0f64).sqrt() * std,
                        InitRule::Uniform { bound } => *bound,
                        _ => 0.02,
                    } as f32;
                    v.par_chunks_mut(1 << 16)
                        .enumerate()
                        .for_each(|(c, chunk)| {
                            let mut rng =
                                ChaCha8Rng::seed_from_u64(seed ^ ((i as u64) << 32) ^ c as u64);
                            for x in chunk.iter_mut() {
                                *x = rng.gen_range(-bound..bound);
                            }
                        });
                }
            }
            v
        })
        .collect()
}

/// Runs `warmup + steps` optimizer steps (gas 1) and reports the timed ones.
pub fn bench_plan(plan: &Plan, steps: usize, warmup: usize, profile: bool) -> Result<BenchResult> {
    let d = dims_of(plan)?;
    let init = bench_init(plan, 3407);
    // one micro-step per optimizer step, whatever the plan's batch says
    let mut plan = plan.clone();
    plan.layout.gas = 1;
    let plan = &plan;
    let mut be = CudaBackend::new(plan, 0, &init)?;
    drop(init);
    let micro = d.batch;
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let rows: Vec<u32> = (0..micro * (d.seq + 1))
        .map(|_| rng.gen_range(0..d.vocab as u32))
        .collect();
    let lrs: Vec<f64> = plan
        .optimizer
        .groups
        .iter()
        .map(|g| g.peak_group_lr())
        .collect();
    let clip = plan.optimizer.grad_clip;
    let step = |be: &mut CudaBackend| -> Result<f64> {
        let loss = be.forward_backward(&rows, micro, 1.0)?;
        let norm = be.grad_norm()?;
        let mult = if clip > 0.0 {
            (clip / (norm + 1e-6)).min(1.0)
        } else {
            1.0
        };
        be.optimizer_step(&lrs, mult)?;
        Ok(loss)
    };
    for _ in 0..warmup {
        step(&mut be)?;
    }
    be.gpu().sync()?;
    let t = std::time::Instant::now();
    let mut loss = 0.0;
    for _ in 0..steps {
        loss = step(&mut be)?;
    }
    be.gpu().sync()?;
    let step_s = t.elapsed().as_secs_f64() / steps.max(1) as f64;
    let profile = if profile {
        be.profile_step(&rows, micro, &lrs)?
    } else {
        Vec::new()
    };
    let tokens_per_s = (micro * d.seq) as f64 / step_s;
    let est = &plan.estimates;
    let emb = (d.padded_vocab * d.n) as f64;
    let torch_fpt = 6.0 * (est.params_total as f64 - emb) + 12.0 * (d.layers * d.n * d.seq) as f64;
    Ok(BenchResult {
        run_name: plan.run_name.clone(),
        device: be.gpu().name.clone(),
        depth: d.layers,
        params: est.params_total,
        micro,
        seq: d.seq,
        steps,
        step_s,
        tokens_per_s,
        mfu: tokens_per_s * est.flops_per_token_archscale / PEAK_FLOPS,
        mfu_torch_basis: tokens_per_s * torch_fpt / PEAK_FLOPS,
        peak_gib: be.peak_bytes() as f64 / (1u64 << 30) as f64,
        planned_gib: archscale_compiler::estimates::plan_memory(plan).total_bytes as f64
            / (1u64 << 30) as f64,
        loss,
        profile,
    })
}
