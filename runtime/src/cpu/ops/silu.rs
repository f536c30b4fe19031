//! SiLU `y = x·σ(x)` (the activation after Mamba's causal conv).

use crate::cpu::float::{silu, silu_grad, Real};
use rayon::prelude::*;

const CHUNK: usize = 1 << 14;

/// `y = silu(x)` elementwise.
pub fn silu_forward<T: Real>(y: &mut [T], x: &[T]) {
    assert_eq!(x.len(), y.len());
    y.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(yc, xc)| {
            for (o, &v) in yc.iter_mut().zip(xc) {
                *o = silu(v);
            }
        });
}

/// Accumulates `dx += dy · silu'(x)`.
pub fn silu_backward<T: Real>(dx: &mut [T], dy: &[T], x: &[T]) {
    assert_eq!(x.len(), dx.len());
    dx.par_chunks_mut(CHUNK)
        .zip(dy.par_chunks(CHUNK))
        .zip(x.par_chunks(CHUNK))
        .for_each(|((dc, gc), xc)| {
            for ((d, &g), &v) in dc.iter_mut().zip(gc).zip(xc) {
                *d += g * silu_grad(v);
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::gradcheck::*;

    fn check(&n: &usize) -> f64 {
        let mut rng = rng(6);
        check_op(
            &mut rng.clone(),
            vec![("x", randn(&mut rng, n, 3.0))],
            |p| {
                let mut y = vec![0.0; n];
                silu_forward(&mut y, &p[0]);
                y
            },
            |p, dy, g| silu_backward(&mut g[0], dy, &p[0]),
        )
    }
    gradcheck_shapes!(silu_grad_check, check, [1usize, 9, 33]);
}
