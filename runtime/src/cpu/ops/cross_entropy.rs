//! Softmax cross-entropy with label smoothing (arch-spec §3, flash-attn `xentropy`):
//! `loss_i = (1−ε)(lse_i − z_{i,y}) + ε(lse_i − (1/V)Σ_j z_{ij})`.

use crate::cpu::float::Real;
use rayon::prelude::*;

/// Writes the per-row loss `losses[r]` for `logits` `[rows, vocab]` and `targets[r] < vocab`.
pub fn cross_entropy_forward<T: Real>(
    losses: &mut [T],
    logits: &[T],
    targets: &[u32],
    vocab: usize,
    smoothing: f64,
) {
    assert_eq!(logits.len(), targets.len() * vocab);
    assert_eq!(losses.len(), targets.len());
    let eps = T::from_f64(smoothing);
    let inv_v = T::ONE / T::from_f64(vocab as f64);
    losses
        .par_iter_mut()
        .zip(logits.par_chunks(vocab))
        .zip(targets.par_iter())
        .for_each(|((loss, z), &y)| {
            let lse = log_sum_exp(z);
            let mean_z = z.iter().copied().sum::<T>() * inv_v;
            *loss = (T::ONE - eps) * (lse - z[y as usize]) + eps * (lse - mean_z);
        });
}

/// Accumulates `dlogits[r] += dloss · (softmax(z_r) − (1−ε)·onehot(y_r) − ε/V)`, with the
/// same upstream gradient `dloss` for every row (`1/N` for a mean over N rows).
pub fn cross_entropy_backward<T: Real>(
    dlogits: &mut [T],
    logits: &[T],
    targets: &[u32],
    vocab: usize,
    smoothing: f64,
    dloss: T,
) {
    assert_eq!(logits.len(), targets.len() * vocab);
    assert_eq!(dlogits.len(), logits.len());
    let eps = T::from_f64(smoothing);
    let uniform = eps / T::from_f64(vocab as f64);
    dlogits
        .par_chunks_mut(vocab)
        .zip(logits.par_chunks(vocab))
        .zip(targets.par_iter())
        .for_each(|((d, z), &y)| {
            let lse = log_sum_exp(z);
            for (dv, &zv) in d.iter_mut().zip(z) {
                *dv += dloss * ((zv - lse).exp() - uniform);
            }
            d[y as usize] -= dloss * (T::ONE - eps);
        });
}

fn log_sum_exp<T: Real>(z: &[T]) -> T {
    let max = z.iter().copied().fold(z[0], T::max);
    max + z.iter().map(|&v| (v - max).exp()).sum::<T>().ln()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::gradcheck::*;

    fn check(&(rows, vocab, eps): &(usize, usize, f64)) -> f64 {
        let mut rng = rng(9);
        let targets: Vec<u32> = (0..rows).map(|r| ((r * 5 + 1) % vocab) as u32).collect();
        check_op(
            &mut rng.clone(),
            vec![("logits", randn(&mut rng, rows * vocab, 2.0))],
            |p| {
                let mut l = vec![0.0; rows];
                cross_entropy_forward(&mut l, &p[0], &targets, vocab, eps);
                l
            },
            |p, dl, g| {
                // Rows carry different upstream gradients here, so apply them row by row.
                for r in 0..rows {
                    let s = r * vocab..(r + 1) * vocab;
                    cross_entropy_backward(
                        &mut g[0][s.clone()],
                        &p[0][s],
                        &targets[r..r + 1],
                        vocab,
                        eps,
                        dl[r],
                    );
                }
            },
        )
    }
    gradcheck_shapes!(
        cross_entropy_grad,
        check,
        [(1, 2, 0.0), (4, 7, 0.1), (9, 33, 0.1), (3, 5, 0.0)]
    );

    #[test]
    fn smoothing_formula() {
        let z = [1.0f64, 2.0, 0.5];
        let lse = (1f64.exp() + 2f64.exp() + 0.5f64.exp()).ln();
        let mut l = [0.0];
        cross_entropy_forward(&mut l, &z, &[1], 3, 0.1);
        let want = 0.9 * (lse - 2.0) + 0.1 * (lse - 3.5 / 3.0);
        assert!((l[0] - want).abs() < 1e-14);
    }
}
