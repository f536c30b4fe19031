//! LayerNorm (torch, fp32 math): `y = (x − mean)/sqrt(var + eps) · γ + β`, biased variance.

use crate::cpu::float::Real;
use rayon::prelude::*;

/// Per row of `dim`: `y = (x − μ)·rstd·weight + bias`, saving `mean[r] = μ` and `rstd[r]`.
/// `x`, `y`: `[rows, dim]`; `mean`, `rstd`: `[rows]`.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_forward<T: Real>(
    y: &mut [T],
    mean: &mut [T],
    rstd: &mut [T],
    x: &[T],
    weight: &[T],
    bias: &[T],
    dim: usize,
    eps: f64,
) {
    assert_eq!(weight.len(), dim);
    assert_eq!(bias.len(), dim);
    assert_eq!(y.len(), x.len());
    let eps = T::from_f64(eps);
    let inv_dim = T::ONE / T::from_f64(dim as f64);
    y.par_chunks_mut(dim)
        .zip(x.par_chunks(dim))
        .zip(mean.par_iter_mut().zip(rstd.par_iter_mut()))
        .for_each(|((yr, xr), (mu, rs))| {
            let m = xr.iter().copied().sum::<T>() * inv_dim;
            let var = xr.iter().map(|&v| (v - m) * (v - m)).sum::<T>() * inv_dim;
            let r = T::ONE / (var + eps).sqrt();
            *mu = m;
            *rs = r;
            for (((o, &v), &w), &b) in yr.iter_mut().zip(xr).zip(weight).zip(bias) {
                *o = (v - m) * r * w + b;
            }
        });
}

/// Accumulates `dx += rstd·(ĝ − mean(ĝ) − x̂·mean(ĝ·x̂))` with `ĝ = dy·γ`, x̂ the normalised
/// input; `dweight += Σ_r dy·x̂`, `dbias += Σ_r dy`.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward<T: Real>(
    dx: &mut [T],
    dweight: &mut [T],
    dbias: &mut [T],
    dy: &[T],
    x: &[T],
    weight: &[T],
    mean: &[T],
    rstd: &[T],
    dim: usize,
) {
    assert_eq!(dx.len(), x.len());
    assert_eq!(dy.len(), x.len());
    let inv_dim = T::ONE / T::from_f64(dim as f64);
    dx.par_chunks_mut(dim)
        .zip(x.par_chunks(dim))
        .zip(dy.par_chunks(dim))
        .zip(mean.par_iter().zip(rstd.par_iter()))
        .for_each(|(((dxr, xr), dyr), (&m, &r))| {
            let mut sum_g = T::ZERO;
            let mut sum_gx = T::ZERO;
            for ((&v, &g), &w) in xr.iter().zip(dyr).zip(weight) {
                let gh = g * w;
                sum_g += gh;
                sum_gx += gh * (v - m) * r;
            }
            let (mean_g, mean_gx) = (sum_g * inv_dim, sum_gx * inv_dim);
            for (((d, &v), &g), &w) in dxr.iter_mut().zip(xr).zip(dyr).zip(weight) {
                *d += r * (g * w - mean_g - (v - m) * r * mean_gx);
            }
        });
    let mut both = vec![T::ZERO; 2 * dim];
    super::reduce_row_blocks(rstd.len(), 2 * dim, &mut both, |range, part| {
        let (pw, pb) = part.split_at_mut(dim);
        for row in range {
            let (m, r) = (mean[row], rstd[row]);
            let xr = &x[row * dim..(row + 1) * dim];
            let dyr = &dy[row * dim..(row + 1) * dim];
            for (((w, b), &v), &g) in pw.iter_mut().zip(pb.iter_mut()).zip(xr).zip(dyr) {
                *w += g * (v - m) * r;
                *b += g;
            }
        }
    });
    for (d, p) in dweight.iter_mut().zip(&both[..dim]) {
        *d += *p;
    }
    for (d, p) in dbias.iter_mut().zip(&both[dim..]) {
        *d += *p;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::gradcheck::*;

    fn check(&(rows, dim): &(usize, usize)) -> f64 {
        let mut rng = rng(4);
        let inputs = vec![
            ("x", randn(&mut rng, rows * dim, 1.0)),
            ("w", randn(&mut rng, dim, 1.0)),
            ("b", randn(&mut rng, dim, 1.0)),
        ];
        let fwd = move |p: &[Vec<f64>]| {
            let mut y = vec![0.0; rows * dim];
            let (mut mean, mut rstd) = (vec![0.0; rows], vec![0.0; rows]);
            layernorm_forward(&mut y, &mut mean, &mut rstd, &p[0], &p[1], &p[2], dim, 1e-5);
            (y, mean, rstd)
        };
        check_op(
            &mut rng,
            inputs,
            |p| fwd(p).0,
            |p, dy, g| {
                let (_, mean, rstd) = fwd(p);
                let [gx, gw, gb] = g else { unreachable!() };
                layernorm_backward(gx, gw, gb, dy, &p[0], &p[1], &mean, &rstd, dim);
            },
        )
    }
    gradcheck_shapes!(layernorm_grad, check, [(1, 3), (3, 5), (40, 8), (7, 13)]);
}
