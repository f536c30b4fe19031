//! SiLU gate `out = a ⊙ silu(g)`: Mamba's z-gate (`a = y`, `g = z`) and the GMU
//! (`a = memory m`, `g = in_proj(x)`).

use crate::cpu::float::{silu, silu_and_grad, Real};
use rayon::prelude::*;

const CHUNK: usize = 1 << 14;

/// `out = a ⊙ silu(g)` elementwise (all the same length).
pub fn silu_gate_forward<T: Real>(out: &mut [T], a: &[T], g: &[T]) {
    assert_eq!(out.len(), a.len());
    assert_eq!(out.len(), g.len());
    out.par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK))
        .zip(g.par_chunks(CHUNK))
        .for_each(|((oc, ac), gc)| {
            for ((o, &av), &gv) in oc.iter_mut().zip(ac).zip(gc) {
                *o = av * silu(gv);
            }
        });
}

/// Accumulates `da += dout·silu(g)` and `dg += dout·a·silu'(g)`.
pub fn silu_gate_backward<T: Real>(da: &mut [T], dg: &mut [T], dout: &[T], a: &[T], g: &[T]) {
    assert_eq!(da.len(), dout.len());
    assert_eq!(dg.len(), dout.len());
    da.par_chunks_mut(CHUNK)
        .zip(dg.par_chunks_mut(CHUNK))
        .zip(
            dout.par_chunks(CHUNK)
                .zip(a.par_chunks(CHUNK).zip(g.par_chunks(CHUNK))),
        )
        .for_each(|((dac, dgc), (oc, (ac, gc)))| {
            for ((((dav, dgv), &d), &av), &gv) in
                dac.iter_mut().zip(dgc.iter_mut()).zip(oc).zip(ac).zip(gc)
            {
                let (act, grad) = silu_and_grad(gv);
                *dav += d * act;
                *dgv += d * av * grad;
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::gradcheck::*;

    fn check(&n: &usize) -> f64 {
        let mut rng = rng(7);
        let inputs = vec![
            ("a", randn(&mut rng, n, 1.0)),
            ("g", randn(&mut rng, n, 2.0)),
        ];
        check_op(
            &mut rng,
            inputs,
            |p| {
                let mut y = vec![0.0; n];
                silu_gate_forward(&mut y, &p[0], &p[1]);
                y
            },
            |p, dy, g| {
                let [da, dg] = g else { unreachable!() };
                silu_gate_backward(da, dg, dy, &p[0], &p[1]);
            },
        )
    }
    gradcheck_shapes!(silu_gate_grad, check, [1usize, 10, 31]);
}
