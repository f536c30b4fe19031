//! RMSNorm (`FusedRMSNorm`, fp32 math): `y = x / sqrt(mean(x²) + eps) · γ`, no bias.

use crate::cpu::float::Real;
use rayon::prelude::*;

/// `y[r] = x[r] · rstd[r] · weight`, `rstd[r] = 1/sqrt(mean(x[r]²) + eps)` over rows of `dim`.
/// `x`, `y`: `[rows, dim]`; `rstd`: `[rows]` (saved for backward).
pub fn rmsnorm_forward<T: Real>(
    y: &mut [T],
    rstd: &mut [T],
    x: &[T],
    weight: &[T],
    dim: usize,
    eps: f64,
) {
    assert_eq!(weight.len(), dim);
    assert_eq!(y.len(), x.len());
    assert_eq!(rstd.len() * dim, x.len());
    let eps = T::from_f64(eps);
    let inv_dim = T::ONE / T::from_f64(dim as f64);
    y.par_chunks_mut(dim)
        .zip(x.par_chunks(dim))
        .zip(rstd.par_iter_mut())
        .for_each(|((yr, xr), rs)| {
            let ms = xr.iter().map(|&v| v * v).sum::<T>() * inv_dim;
            let r = T::ONE / (ms + eps).sqrt();
            *rs = r;
            for ((o, &v), &w) in yr.iter_mut().zip(xr).zip(weight) {
                *o = v * r * w;
            }
        });
}

/// Accumulates `dx += rstd·(dy·γ − x̂·mean(dy·γ·x̂))` (x̂ = x·rstd) and `dweight += Σ_r dy·x̂`.
pub fn rmsnorm_backward<T: Real>(
    dx: &mut [T],
    dweight: &mut [T],
    dy: &[T],
    x: &[T],
    weight: &[T],
    rstd: &[T],
    dim: usize,
) {
    assert_eq!(dx.len(), x.len());
    assert_eq!(dy.len(), x.len());
    let inv_dim = T::ONE / T::from_f64(dim as f64);
    dx.par_chunks_mut(dim)
        .zip(x.par_chunks(dim))
        .zip(dy.par_chunks(dim))
        .zip(rstd.par_iter())
        .for_each(|(((dxr, xr), dyr), &r)| {
            let dot = xr
                .iter()
                .zip(dyr)
                .zip(weight)
                .map(|((&v, &g), &w)| g * w * v * r)
                .sum::<T>()
                * inv_dim;
            for (((d, &v), &g), &w) in dxr.iter_mut().zip(xr).zip(dyr).zip(weight) {
                *d += r * (g * w - v * r * dot);
            }
        });
    super::reduce_row_blocks(rstd.len(), dim, dweight, |range, part| {
        for row in range {
            let r = rstd[row];
            let xr = &x[row * dim..(row + 1) * dim];
            let dyr = &dy[row * dim..(row + 1) * dim];
            for ((p, &v), &g) in part.iter_mut().zip(xr).zip(dyr) {
                *p += g * v * r;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::gradcheck::*;

    fn check(&(rows, dim): &(usize, usize)) -> f64 {
        let mut rng = rng(3);
        let inputs = vec![
            ("x", randn(&mut rng, rows * dim, 1.0)),
            ("w", randn(&mut rng, dim, 1.0)),
        ];
        check_op(
            &mut rng,
            inputs,
            |p| {
                let mut y = vec![0.0; rows * dim];
                let mut rstd = vec![0.0; rows];
                rmsnorm_forward(&mut y, &mut rstd, &p[0], &p[1], dim, 1e-5);
                y
            },
            |p, dy, g| {
                let mut y = vec![0.0; rows * dim];
                let mut rstd = vec![0.0; rows];
                rmsnorm_forward(&mut y, &mut rstd, &p[0], &p[1], dim, 1e-5);
                let (gx, gw) = g.split_at_mut(1);
                rmsnorm_backward(&mut gx[0], &mut gw[0], dy, &p[0], &p[1], &rstd, dim);
            },
        )
    }
    gradcheck_shapes!(rmsnorm_grad, check, [(1, 1), (3, 5), (40, 8), (7, 13)]);

    #[test]
    fn rmsnorm_value() {
        let mut y = [0.0f64; 2];
        let mut r = [0.0f64; 1];
        rmsnorm_forward(&mut y, &mut r, &[3.0, 4.0], &[1.0, 2.0], 2, 0.0);
        let rms = (12.5f64).sqrt();
        assert!((y[0] - 3.0 / rms).abs() < 1e-12 && (y[1] - 8.0 / rms).abs() < 1e-12);
    }
}
