//! Validation loss and perplexity at 1×..k× the training context (arch-spec §5.1): the
//! plan's validation loader (every rank, sequential blocks, the same set each time),
//! `val_micro_batch` rows per batch, `eval_iters` batches per rank, and the mean
//! cross-entropy of the first `j·T` predictions of each row for j = 1..k. With
//! `k = num_extrapol` and the default batch count this is exactly the number the training
//! loop logs as `val_loss@{j}x`; a larger k reads longer rows (`k·T + 1` tokens).
//! The losses come from a [`Backend`] (CPU or CUDA) holding the checkpoint's parameters.

use super::load::LoadedModel;
use crate::backend::Backend;
use crate::data::ValLoader;
use crate::{Result, RuntimeError};
use serde::Serialize;
use std::path::Path;

#[derive(Clone, Debug, Serialize)]
pub struct ValAt {
    /// Context multiple j (`val_loss@{j}x`).
    pub factor: usize,
    /// Tokens of context per row, `j·T`.
    pub context: usize,
    pub loss: f64,
    pub ppl: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct ValReport {
    /// The backend that computed the losses (`cpu`, `cuda:0`).
    pub backend: String,
    pub seq_len: usize,
    pub rows_per_batch: usize,
    pub batches: usize,
    pub at: Vec<ValAt>,
}

/// The plan a backend for [`evaluate`] is built from: `plan` with validation rows of
/// `k·T + 1` tokens, so a device backend sizes its buffers and RoPE table for them.
pub fn backend_plan(
    plan: &archscale_compiler::Plan,
    extrapolate: Option<usize>,
) -> archscale_compiler::Plan {
    let k = extrapolate.unwrap_or(plan.training.num_extrapol);
    let mut sized = plan.clone();
    sized.data.val_block_size = sized.data.val_block_size.max(k * plan.layout.seq_len + 1);
    sized
}

/// `extrapolate`: largest multiple k (default the plan's `num_extrapol`); `batches`: per
/// rank (default the plan's `eval_iters`). The checkpoint's parameters are written into
/// `backend` (built for `model.plan`) first.
pub fn evaluate(
    model: &LoadedModel,
    backend: &mut dyn Backend,
    data_root: &Path,
    extrapolate: Option<usize>,
    batches: Option<usize>,
) -> Result<ValReport> {
    let plan = &model.plan;
    let t = plan.layout.seq_len;
    let k = extrapolate.unwrap_or(plan.training.num_extrapol);
    if k == 0 || t == 0 {
        return Err(RuntimeError::Message(
            "the context multiple and sequence length must be positive".into(),
        ));
    }
    let n_batches = batches.unwrap_or(plan.training.eval_iters as usize);
    let mut data = plan.data.clone();
    data.val_block_size = k * t + 1;
    if data.val.is_empty() {
        return Err(RuntimeError::Message(
            "the plan has no validation data".into(),
        ));
    }
    let rows = plan.data.val_micro_batch.max(1);
    let world = plan.layout.world.max(1);
    let n_chunks = 8usize.div_ceil(plan.layout.nodes.max(1));
    backend.write_params(&model.params)?;
    let prefixes: Vec<usize> = (1..=k).map(|j| j * t).collect();
    let mut sums = vec![0.0; k];
    let mut count = 0usize;
    for rank in 0..world {
        let loader = ValLoader::from_data_plan(
            &data,
            Some(plan.model.vocab_size),
            n_chunks,
            rank,
            world,
            data_root,
        )?;
        for batch in loader.batches(n_batches, rows)? {
            let losses = backend.eval_loss(&batch, rows, data.val_block_size, &prefixes)?;
            for (s, l) in sums.iter_mut().zip(losses) {
                *s += l;
            }
            count += 1;
        }
    }
    if count == 0 {
        return Err(RuntimeError::Message(
            "validation data yielded no batches".into(),
        ));
    }
    let at = sums
        .iter()
        .enumerate()
        .map(|(j, s)| {
            let loss = s / count as f64;
            ValAt {
                factor: j + 1,
                context: (j + 1) * t,
                loss,
                ppl: loss.exp(),
            }
        })
        .collect();
    Ok(ValReport {
        backend: backend.name(),
        seq_len: t,
        rows_per_batch: rows,
        batches: count,
        at,
    })
}
