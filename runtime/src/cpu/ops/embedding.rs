//! Token embedding: gather forward, scatter-add backward.

use crate::cpu::float::Real;
use rayon::prelude::*;

/// `out[r, :] = table[tokens[r], :]`. `table` is `[vocab, dim]`, `out` is `[tokens.len(), dim]`.
/// Every token must be `< vocab` (callers validate user data first).
pub fn embedding_forward<T: Real>(out: &mut [T], tokens: &[u32], table: &[T], dim: usize) {
    assert_eq!(out.len(), tokens.len() * dim);
    out.par_chunks_mut(dim)
        .zip(tokens.par_iter())
        .for_each(|(row, &tok)| {
            let start = tok as usize * dim;
            row.copy_from_slice(&table[start..start + dim]);
        });
}

/// `dtable[tokens[r], :] += dout[r, :]`, rows in order (deterministic).
pub fn embedding_backward<T: Real>(dtable: &mut [T], tokens: &[u32], dout: &[T], dim: usize) {
    assert_eq!(dout.len(), tokens.len() * dim);
    for (row, &tok) in dout.chunks(dim).zip(tokens) {
        let start = tok as usize * dim;
        for (d, g) in dtable[start..start + dim].iter_mut().zip(row) {
            *d += *g;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::gradcheck::*;

    fn check(&(vocab, dim, n): &(usize, usize, usize)) -> f64 {
        let mut rng = rng(1);
        let tokens: Vec<u32> = (0..n).map(|i| ((i * 7 + 3) % vocab) as u32).collect();
        let table = randn(&mut rng, vocab * dim, 1.0);
        check_op(
            &mut rng,
            vec![("table", table)],
            |p| {
                let mut out = vec![0.0; n * dim];
                embedding_forward(&mut out, &tokens, &p[0], dim);
                out
            },
            |_p, dout, g| embedding_backward(&mut g[0], &tokens, dout, dim),
        )
    }
    gradcheck_shapes!(embedding_grad, check, [(5, 3, 7), (11, 4, 20), (3, 1, 4)]);
}
