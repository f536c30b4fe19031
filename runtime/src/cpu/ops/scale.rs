//! Scalar multiples: the residual-branch add (`x += s·h`) and the logit scale (`y = s·x`).

use crate::cpu::float::Real;
use rayon::prelude::*;

const CHUNK: usize = 1 << 14;

/// Residual add `x += scale · h` (μP++ branch scale `1/√(2L)`, else 1).
pub fn scaled_add_forward<T: Real>(x: &mut [T], h: &[T], scale: f64) {
    assert_eq!(x.len(), h.len());
    let s = T::from_f64(scale);
    x.par_chunks_mut(CHUNK)
        .zip(h.par_chunks(CHUNK))
        .for_each(|(xc, hc)| {
            for (a, &b) in xc.iter_mut().zip(hc) {
                *a += s * b;
            }
        });
}

/// Accumulates the branch gradient `dh += scale · dx` (the residual path's `dx` passes through unchanged).
pub fn scaled_add_backward<T: Real>(dh: &mut [T], dx: &[T], scale: f64) {
    scaled_add_forward(dh, dx, scale);
}

/// `y = scale · x` (the μP logit scale `d0/L` on the final-normed hidden state).
pub fn scale_forward<T: Real>(y: &mut [T], x: &[T], scale: f64) {
    assert_eq!(x.len(), y.len());
    let s = T::from_f64(scale);
    y.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(yc, xc)| {
            for (a, &b) in yc.iter_mut().zip(xc) {
                *a = s * b;
            }
        });
}

/// Accumulates `dx += scale · dy`.
pub fn scale_backward<T: Real>(dx: &mut [T], dy: &[T], scale: f64) {
    scaled_add_forward(dx, dy, scale);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::gradcheck::*;

    fn check(&n: &usize) -> f64 {
        let mut rng = rng(5);
        let inputs = vec![
            ("x", randn(&mut rng, n, 1.0)),
            ("h", randn(&mut rng, n, 1.0)),
        ];
        let s = 0.3;
        let e1 = check_op(
            &mut rng,
            inputs.clone(),
            |p| {
                let mut x = p[0].clone();
                scaled_add_forward(&mut x, &p[1], s);
                x
            },
            |_p, dy, g| {
                for (a, b) in g[0].iter_mut().zip(dy) {
                    *a += b;
                }
                scaled_add_backward(&mut g[1], dy, s);
            },
        );
        let e2 = check_op(
            &mut rng,
            inputs[..1].to_vec(),
            |p| {
                let mut y = vec![0.0; n];
                scale_forward(&mut y, &p[0], s);
                y
            },
            |_p, dy, g| scale_backward(&mut g[0], dy, s),
        );
        e1.max(e2)
    }
    gradcheck_shapes!(scale_grad, check, [1usize, 7, 40]);
}
