//! CPU optimizers, applied per parameter tensor with the Plan's group settings.
//! These are the reference the fused CUDA optimizer kernels are checked against.

pub mod adamw;
pub mod muon;
pub mod nadam;

pub use adamw::{adamw_step, AdamWHyper};
pub use muon::{muon_step, newton_schulz};
pub use nadam::{nadam_step, NAdamHyper};

/// torch's `clip_grad_norm_`: the factor gradients are multiplied by so their global L2
/// norm is at most `max_norm` (1 when already below).
pub fn clip_coefficient(total_norm: f64, max_norm: f64) -> f64 {
    (max_norm / (total_norm + 1e-6)).min(1.0)
}
