//! CPU reference backend: the numerical oracle for every CUDA kernel.
//!
//! Two layers:
//! - [`ops`]: one file per op, forward and backward side by side, generic over [`Real`]
//!   (`f32` to train, `f64` for gradient checks). Plain slices plus shape arguments, so the
//!   CUDA self-test can call them as references.
//! - [`CpuModel`]: a Plan's model (Transformer++, sliding-window attention, Mamba-1, GMU,
//!   YOCO cross-attention, differential attention, LayerNorm and biases, varlen) with
//!   seeded init ([`init`]), `forward_backward` and prefix `forward_loss`.
//!
//! # Conventions of every op
//! - Tensors are flat row-major slices; `N` = rows (tokens, `B·T`), `B` batch, `T` sequence,
//!   `H` query heads, `G` kv heads, `hs` head size. "Head-major" is `[B, heads, T, d]`.
//! - `*_forward` overwrites its outputs; `*_backward` ACCUMULATES (`+=`) into every gradient
//!   it writes (callers zero them first). Layout ops (`split_qkv`, `merge_qkv`,
//!   `tokens_to_heads`, `heads_to_tokens`) and `rope_backward` (in place) overwrite.
//! - Results do not depend on the thread count (fixed blocks, ordered reductions).
//! - Shape mismatches are programming errors and panic; the model validates user input.
//!
//! # Ops
//! | op | forward | backward |
//! |---|---|---|
//! | [`ops::embedding`] | `out[r] = table[tok[r]]` | scatter-add into `dtable` |
//! | [`ops::linear`] | `y = x·Wᵀ + b`, `W: [out, in]` | `dx`, `dW`, `db` |
//! | [`ops::rmsnorm`] | `x/√(mean x² + eps)·γ`, saves `rstd` | `dx`, `dγ` |
//! | [`ops::layernorm`] | `(x−μ)/√(var + eps)·γ + β`, saves `mean`, `rstd` | `dx`, `dγ`, `dβ` |
//! | [`ops::rope`] | NeoX rotate-half on `[B·heads, T, hs]`, bf16-rounded tables ([`ops::rope::RopeTable`]) | rotation with `−sin` |
//! | [`ops::attention`] | causal softmax attention, GQA, window `W` (keys `[t−W+1, t]`), varlen `seg_start`; fused grouped QKV layout helpers | `dq`, `dk`, `dv` from saved probabilities |
//! | [`ops::diff_attention`] | differential attention: paired heads, λ, per-pair RMSNorm, `(1−λ_init)` | `dq`, `dk`, `dv`, `dλ*`, `dsubln` |
//! | [`ops::swiglu`] | `silu(g)·u` on `[g ‖ u]` (gate = first half) | `d[g ‖ u]` |
//! | [`ops::silu_gate`] | `a·silu(g)` (Mamba z-gate, GMU) | `da`, `dg` |
//! | [`ops::silu`] | `silu(x)` | `dx` |
//! | [`ops::conv1d`] | causal depthwise conv (`[C, K]` taps, bias), varlen reset | `dx`, `dw`, `db` |
//! | [`ops::selective_scan`] | Mamba-1 scan with `delta_bias` + softplus (threshold 20), `D` skip, varlen reset | all inputs; states recomputed |
//! | [`ops::cross_entropy`] | `(1−ε)(lse − z_y) + ε(lse − mean z)` per row | `dz += dloss·(softmax − (1−ε)·onehot − ε/V)` |
//! | [`ops::scale`] | residual `x += s·h`; logit scale `y = s·x` | `dh += s·dx`; `dx += s·dy` |
//! | [`ops::mask`] | document starts from EOS (`cu_seqlens` semantics) | — |
//!
//! Matrix products go through [`float::gemm`] (`matrixmultiply` sgemm/dgemm, rows of large
//! products split over rayon).

pub mod float;
pub mod init;
pub mod model;
pub mod ops;

pub use float::Real;
pub use model::CpuModel;

#[cfg(test)]
pub(crate) mod gradcheck;
#[cfg(test)]
pub(crate) mod model_tests;
