//! CPU reference ops, one file per op with forward and backward side by side.
//!
//! Conventions (all ops):
//! - Tensors are flat row-major slices; each function's doc gives the layout.
//! - `*_forward` overwrites its outputs.
//! - `*_backward` ACCUMULATES (`+=`) into every gradient it writes, input and parameter
//!   gradients alike; callers zero gradient buffers first.
//! - Work is split over rows/heads/channels with rayon in fixed-size blocks, and every
//!   reduction sums its partials in a fixed order, so results do not depend on the thread
//!   count.

pub mod attention;
pub mod conv1d;
pub mod cross_entropy;
pub mod diff_attention;
pub mod embedding;
pub mod layernorm;
pub mod linear;
pub mod mask;
pub mod rmsnorm;
pub mod rope;
pub mod scale;
pub mod selective_scan;
pub mod silu;
pub mod silu_gate;
pub mod swiglu;

use super::float::Real;
use rayon::prelude::*;

/// Rows per parallel block in row-wise ops (fixed, so reductions are thread-count independent).
pub(crate) const ROW_BLOCK: usize = 32;

/// Sums `f(rows, partial)` over fixed blocks of rows in parallel and adds the per-block
/// partials (each `width` long) into `acc` in block order.
pub(crate) fn reduce_row_blocks<T: Real>(
    n_rows: usize,
    width: usize,
    acc: &mut [T],
    f: impl Fn(std::ops::Range<usize>, &mut [T]) + Sync,
) {
    let n_blocks = n_rows.div_ceil(ROW_BLOCK);
    let mut partials = vec![T::ZERO; n_blocks * width];
    partials
        .par_chunks_mut(width.max(1))
        .enumerate()
        .for_each(|(blk, part)| {
            let start = blk * ROW_BLOCK;
            f(start..(start + ROW_BLOCK).min(n_rows), part);
        });
    for part in partials.chunks(width.max(1)) {
        for (a, p) in acc.iter_mut().zip(part) {
            *a += *p;
        }
    }
}
