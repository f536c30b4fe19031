//! SwiGLU activation on the fused `w1` output: `h = [g ‖ u]` per row, `out = silu(g) ⊙ u`
//! (gate = FIRST half, up = SECOND half, as ArchScale's `LLaMAMLP`).

use crate::cpu::float::{silu, silu_and_grad, Real};
use rayon::prelude::*;

/// `out[r, i] = silu(h[r, i]) · h[r, inter + i]`; `h` is `[rows, 2·inter]`, `out` `[rows, inter]`.
pub fn swiglu_forward<T: Real>(out: &mut [T], h: &[T], inter: usize) {
    assert_eq!(h.len(), 2 * out.len());
    out.par_chunks_mut(inter)
        .zip(h.par_chunks(2 * inter))
        .for_each(|(o, hr)| {
            let (g, u) = hr.split_at(inter);
            for ((ov, &gv), &uv) in o.iter_mut().zip(g).zip(u) {
                *ov = silu(gv) * uv;
            }
        });
}

/// Accumulates `dh[:, :I] += dout·u·silu'(g)` and `dh[:, I:] += dout·silu(g)`.
pub fn swiglu_backward<T: Real>(dh: &mut [T], dout: &[T], h: &[T], inter: usize) {
    assert_eq!(h.len(), 2 * dout.len());
    assert_eq!(dh.len(), h.len());
    dh.par_chunks_mut(2 * inter)
        .zip(h.par_chunks(2 * inter))
        .zip(dout.par_chunks(inter))
        .for_each(|((dhr, hr), dor)| {
            let (g, u) = hr.split_at(inter);
            let (dg, du) = dhr.split_at_mut(inter);
            for i in 0..inter {
                let (act, grad) = silu_and_grad(g[i]);
                dg[i] += dor[i] * u[i] * grad;
                du[i] += dor[i] * act;
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::gradcheck::*;

    fn check(&(rows, inter): &(usize, usize)) -> f64 {
        let mut rng = rng(8);
        check_op(
            &mut rng.clone(),
            vec![("h", randn(&mut rng, rows * 2 * inter, 2.0))],
            |p| {
                let mut y = vec![0.0; rows * inter];
                swiglu_forward(&mut y, &p[0], inter);
                y
            },
            |p, dy, g| swiglu_backward(&mut g[0], dy, &p[0], inter),
        )
    }
    gradcheck_shapes!(swiglu_grad, check, [(1, 1), (3, 5), (8, 12)]);

    #[test]
    fn gate_is_first_half() {
        let mut out = [0.0f64];
        swiglu_forward(&mut out, &[1.0, 3.0], 1);
        assert!((out[0] - silu(1.0) * 3.0).abs() < 1e-15);
    }
}
