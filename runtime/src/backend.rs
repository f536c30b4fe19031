//! The seam between the training loop and a device. A backend owns the model parameters,
//! their gradients and the optimizer state (so the CUDA backend keeps all three on the GPU);
//! the loop only hands it token batches and per-group learning rates.

use archscale_compiler::Plan;

/// What the loop asks of a backend. Parameters are exchanged as f32 in `plan.params` order.
pub trait Backend {
    /// `cpu` or `cuda:<ordinal>`.
    fn name(&self) -> String;

    /// Forward and backward on `micro` rows of `T + 1` tokens each (inputs `[0, T)`,
    /// targets `[1, T + 1)`). Gradients accumulate, scaled by `grad_scale` (1/gas).
    /// Returns the mean loss of these rows (unscaled).
    fn forward_backward(
        &mut self,
        rows: &[u32],
        micro: usize,
        grad_scale: f32,
    ) -> crate::Result<f64>;

    /// Global L2 norm of the accumulated gradients.
    fn grad_norm(&mut self) -> crate::Result<f64>;

    /// Multiplies gradients by `grad_mult` (the clip coefficient), applies one optimizer step
    /// with `group_lrs[g]` for `plan.optimizer.groups[g]`, and zeroes the gradients.
    fn optimizer_step(&mut self, group_lrs: &[f64], grad_mult: f64) -> crate::Result<()>;

    /// Mean cross-entropy (no label smoothing, no gradients) of `rows` rows of `row_len`
    /// tokens, measured on the first `p` predictions of each row for every `p` in `prefixes`.
    fn eval_loss(
        &mut self,
        tokens: &[u32],
        rows: usize,
        row_len: usize,
        prefixes: &[usize],
    ) -> crate::Result<Vec<f64>>;

    /// Logits (the padded vocabulary) of the prediction after the last of `tokens`, one row
    /// and no cache: the step of greedy decoding on a device (`eval::sampling::GreedyDecoder`).
    fn last_logits(&mut self, tokens: &[u32]) -> crate::Result<Vec<f32>> {
        let _ = tokens;
        Err(crate::RuntimeError::Message(format!(
            "{}: decoding (last_logits) is not implemented on this backend",
            self.name()
        )))
    }

    /// Parameters in plan order.
    fn read_params(&mut self) -> crate::Result<Vec<Vec<f32>>>;
    fn write_params(&mut self, params: &[Vec<f32>]) -> crate::Result<()>;

    /// Optimizer state as named f32 tensors (`<param>.exp_avg`, ...) plus the step count.
    fn read_optimizer_state(&mut self) -> crate::Result<OptimizerState>;
    /// Takes the full optimizer state (any world size wrote it); a sharded backend keeps
    /// its own part.
    fn write_optimizer_state(&mut self, state: &OptimizerState) -> crate::Result<()>;

    /// Whether the next `forward_backward` is the last micro-step of an optimizer step, so
    /// its backward pass should also reduce the gradients over ranks (overlapped). Backends
    /// without a collective ignore it.
    fn set_gradient_sync(&mut self, _sync: bool) {}

    /// This rank's shard of the optimizer state when the backend shards it (ZeRO-1/3);
    /// `None` when `read_optimizer_state` holds everything.
    fn optimizer_shard(&mut self) -> crate::Result<Option<OptimizerShard>> {
        Ok(None)
    }

    /// How this rank's optimizer state is cut, when it is sharded: the manifest
    /// [`Self::optimizer_shard`] writes and the chunk this rank holds.
    fn optimizer_shard_layout(&self) -> Option<(crate::distributed::manifest::Manifest, usize)> {
        None
    }

    /// This rank's part of a sharded optimizer state, cut as [`Self::optimizer_shard_layout`]
    /// says (a resume on the same world and layout reads only its own shard files).
    fn write_optimizer_shard(&mut self, shard: &OptimizerShard) -> crate::Result<()> {
        let _ = shard;
        Err(crate::RuntimeError::Message(format!(
            "{}: the optimizer state is not sharded here; load it whole",
            self.name()
        )))
    }

    /// Device memory of this rank: (peak bytes allocated, bytes of parameters + gradients
    /// + optimizer state). `None` on the CPU.
    fn device_memory(&self) -> Option<(usize, usize)> {
        None
    }

    /// Whether `read_params` is a collective every rank must call (ZeRO-3 gathers).
    fn read_params_is_collective(&self) -> bool {
        false
    }

    /// Whether `optimizer_shard` returns a shard (then every rank takes part in saving).
    fn optimizer_is_sharded(&self) -> bool {
        false
    }
}

/// One rank's part of a sharded AdamW state: flat local buffers of both moments and the
/// manifest saying where each tensor's pieces sit in every rank's buffer.
#[derive(Clone, Debug)]
pub struct OptimizerShard {
    pub step: u64,
    pub rank: usize,
    pub manifest: crate::distributed::manifest::Manifest,
    pub exp_avg: Vec<f32>,
    pub exp_avg_sq: Vec<f32>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct OptimizerState {
    pub step: u64,
    pub tensors: Vec<(String, Vec<f32>)>,
}

/// Builds the backend `choice` names for `plan`.
pub type BackendFactory = fn(&Plan) -> crate::Result<Box<dyn Backend>>;
