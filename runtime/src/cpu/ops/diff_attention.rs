//! Differential attention (arch-spec §1.8, ArchScale `FlashDiffAttention`).
//!
//! With H query heads and G kv heads (both even), pair `j < H/2` uses query heads `2j` (q1)
//! and `2j+1` (q2) and kv heads `2jj` (k1, v1) and `2jj+1` (k2, v2), `jj = j / (H/G)`:
//! ```text
//! A1 = softmax(s·q1·k1ᵀ + mask)   O1 = [A1·v1 ‖ A1·v2]          (width 2hs)
//! A2 = softmax(s·q2·k2ᵀ + mask)   O2 = [A2·v1 ‖ A2·v2]
//! λ  = exp(Σ λq1⊙λk1) − exp(Σ λq2⊙λk2) + λ_init
//! O  = RMSNorm_{2hs}(O1 − λ·O2; eps 1e-5, γ = subln) · (1 − λ_init)
//! ```
//! Output `[B, H/2, T, 2hs]`; pair `j`'s first `hs` are head `2j`, the last `hs` head `2j+1`,
//! so [`super::attention::heads_to_tokens`] with `heads = H/2, d = 2hs` gives `[B, T, H·hs]`.
//! λ is kept in `T` (ArchScale rounds it to bf16 under autocast, like its matmul inputs).

use super::attention::{
    masked_softmax_rows, query_blocks, softmax_backward_rows, AttnShape, QUERY_BLOCK,
};
use super::rmsnorm::{rmsnorm_backward, rmsnorm_forward};
use crate::cpu::float::{gemm, Layout, Real, Storage};
use rayon::prelude::*;

/// RMSNorm epsilon of the per-pair `subln`.
pub const SUBLN_EPS: f64 = 1e-5;

/// The four λ vectors (`[hs]` each): `lambda_q1, lambda_k1, lambda_q2, lambda_k2`.
pub struct Lambdas<'a, T> {
    pub q1: &'a [T],
    pub k1: &'a [T],
    pub q2: &'a [T],
    pub k2: &'a [T],
}

/// Gradients of the four λ vectors.
pub struct LambdaGrads<'a, T> {
    pub q1: &'a mut [T],
    pub k1: &'a mut [T],
    pub q2: &'a mut [T],
    pub k2: &'a mut [T],
}

/// `(λ, exp(λq1·λk1), exp(λq2·λk2))`.
pub fn lambda_full<T: Real>(l: &Lambdas<T>, lambda_init: f64) -> (T, T, T) {
    let dot = |a: &[T], b: &[T]| a.iter().zip(b).map(|(&x, &y)| x * y).sum::<T>();
    let l1 = dot(l.q1, l.k1).exp();
    let l2 = dot(l.q2, l.k2).exp();
    (l1 - l2 + T::from_f64(lambda_init), l1, l2)
}

/// Activations saved by [`diff_attention_forward`] for backward.
pub struct DiffSaved<'a, T> {
    /// `[B, H, T, T]`: A1 of pair j at head 2j, A2 at head 2j+1.
    pub probs: &'a mut [T],
    /// `[B, H/2, T, 2hs]`: O2.
    pub o2: &'a mut [T],
    /// `[B, H/2, T, 2hs]`: O1 − λ·O2 (the subln input).
    pub diff: &'a mut [T],
    /// `[B·H/2·T]`: subln reciprocal RMS.
    pub rstd: &'a mut [T],
}

/// Forward. `q`: `[B, H, T, hs]`; `k`, `v`: `[B, G, T, hs]`; `out`: `[B, H/2, T, 2hs]`;
/// `subln`: `[2hs]`.
#[allow(clippy::too_many_arguments)]
pub fn diff_attention_forward<T: Real>(
    out: &mut [T],
    saved: DiffSaved<T>,
    q: &[T],
    k: &[T],
    v: &[T],
    lambdas: &Lambdas<T>,
    subln: &[T],
    lambda_init: f64,
    s: &AttnShape,
    seg_start: Option<&[u32]>,
    storage: Storage,
) {
    let (tl, hs, qpk) = check(s, q, k, v);
    let (lambda, _, _) = lambda_full(lambdas, lambda_init);
    let scale = T::from_f64(s.scale);
    let rm = Layout::row_major;
    let pair = rm(2 * hs);
    let DiffSaved {
        probs,
        o2,
        diff,
        rstd,
    } = saved;
    assert_eq!(probs.len(), s.batch * s.n_head * tl * tl);
    assert_eq!(diff.len(), q.len());
    assert_eq!(o2.len(), q.len());
    // One task per (row b, kv pair jj): pairs j in [jj·qpk, (jj+1)·qpk).
    let kv_pairs = s.n_kv / 2;
    diff.par_chunks_mut(qpk * tl * 2 * hs)
        .zip(o2.par_chunks_mut(qpk * tl * 2 * hs))
        .zip(probs.par_chunks_mut(2 * qpk * tl * tl))
        .enumerate()
        .for_each(|(i, ((dc, o2c), pc))| {
            let b = i / kv_pairs;
            let qc = &q[i * 2 * qpk * tl * hs..(i + 1) * 2 * qpk * tl * hs];
            let kc = &k[i * 2 * tl * hs..(i + 1) * 2 * tl * hs];
            let vc = &v[i * 2 * tl * hs..(i + 1) * 2 * tl * hs];
            for jl in 0..qpk {
                for half in 0..2 {
                    let p = &mut pc[(2 * jl + half) * tl * tl..(2 * jl + half + 1) * tl * tl];
                    let qh = rm(hs).at((2 * jl + half) * tl * hs);
                    let dst: &mut [T] = if half == 0 { &mut *dc } else { &mut *o2c };
                    for blk in query_blocks(s, seg_start, b) {
                        let (rows, nk) = (blk.rows.len(), blk.keys.len());
                        let (r0, k0) = (blk.rows.start, blk.keys.start);
                        let pb = rm(tl).at(r0 * tl + k0);
                        let kb = rm(hs).at((half * tl + k0) * hs);
                        gemm(
                            rows,
                            hs,
                            nk,
                            scale,
                            qc,
                            qh.at(r0 * hs),
                            kc,
                            kb.t(),
                            T::ZERO,
                            p,
                            pb,
                        );
                        masked_softmax_rows(p, s, seg_start, b, blk.rows.clone());
                        for vi in 0..2 {
                            let vb = rm(hs).at((vi * tl + k0) * hs);
                            let ob = pair.at((jl * tl + r0) * 2 * hs + vi * hs);
                            gemm(rows, nk, hs, T::ONE, p, pb, vc, vb, T::ZERO, dst, ob);
                        }
                    }
                }
            }
            // O1 and O2 are the flash outputs: bf16 on the GPU.
            storage.store(dc);
            storage.store(o2c);
            for (d, &o) in dc.iter_mut().zip(o2c.iter()) {
                *d -= lambda * o;
            }
        });
    rmsnorm_forward(out, rstd, diff, subln, 2 * hs, SUBLN_EPS);
    let post = T::from_f64(1.0 - lambda_init);
    out.par_iter_mut().for_each(|x| *x *= post);
}

/// Backward: accumulates `dq`, `dk`, `dv`, the λ gradients and `dsubln`. `seg_start` as in
/// [`super::attention::attention_backward`].
#[allow(clippy::too_many_arguments)]
pub fn diff_attention_backward<T: Real>(
    dq: &mut [T],
    dk: &mut [T],
    dv: &mut [T],
    dlambdas: LambdaGrads<T>,
    dsubln: &mut [T],
    dout: &[T],
    probs: &[T],
    o2: &[T],
    diff: &[T],
    rstd: &[T],
    q: &[T],
    k: &[T],
    v: &[T],
    lambdas: &Lambdas<T>,
    subln: &[T],
    lambda_init: f64,
    s: &AttnShape,
    seg_start: Option<&[u32]>,
) {
    let (tl, hs, qpk) = check(s, q, k, v);
    let (lambda, l1, l2) = lambda_full(lambdas, lambda_init);
    let scale = T::from_f64(s.scale);
    let rm = Layout::row_major;
    let pair = rm(2 * hs);
    // Through the (1 − λ_init) scale and subln.
    let post = T::from_f64(1.0 - lambda_init);
    let dnormed: Vec<T> = dout.par_iter().map(|&g| g * post).collect();
    let mut ddiff = vec![T::ZERO; diff.len()];
    rmsnorm_backward(&mut ddiff, dsubln, &dnormed, diff, subln, rstd, 2 * hs);
    // dλ = −Σ ddiff ⊙ O2, then through λ = exp(q1·k1) − exp(q2·k2) + λ_init.
    let mut dl = [T::ZERO];
    super::reduce_row_blocks(ddiff.len().div_ceil(2 * hs), 1, &mut dl, |rows, part| {
        let r = rows.start * 2 * hs..(rows.end * 2 * hs).min(ddiff.len());
        part[0] -= ddiff[r.clone()]
            .iter()
            .zip(&o2[r])
            .map(|(&a, &b)| a * b)
            .sum::<T>();
    });
    let dlambda = dl[0];
    for i in 0..hs {
        dlambdas.q1[i] += dlambda * l1 * lambdas.k1[i];
        dlambdas.k1[i] += dlambda * l1 * lambdas.q1[i];
        dlambdas.q2[i] -= dlambda * l2 * lambdas.k2[i];
        dlambdas.k2[i] -= dlambda * l2 * lambdas.q2[i];
    }
    // dO1 = ddiff, dO2 = −λ·ddiff.
    dq.par_chunks_mut(2 * qpk * tl * hs)
        .zip(dk.par_chunks_mut(2 * tl * hs))
        .zip(dv.par_chunks_mut(2 * tl * hs))
        .enumerate()
        .for_each(|(i, ((dqc, dkc), dvc))| {
            let qc = &q[i * 2 * qpk * tl * hs..(i + 1) * 2 * qpk * tl * hs];
            let kc = &k[i * 2 * tl * hs..(i + 1) * 2 * tl * hs];
            let vc = &v[i * 2 * tl * hs..(i + 1) * 2 * tl * hs];
            let pc = &probs[i * 2 * qpk * tl * tl..(i + 1) * 2 * qpk * tl * tl];
            let gc = &ddiff[i * qpk * tl * 2 * hs..(i + 1) * qpk * tl * 2 * hs];
            let b = i / (s.n_kv / 2);
            let mut ds = vec![T::ZERO; QUERY_BLOCK.min(tl) * tl];
            for jl in 0..qpk {
                for half in 0..2 {
                    let alpha = if half == 0 { T::ONE } else { -lambda };
                    let p = &pc[(2 * jl + half) * tl * tl..(2 * jl + half + 1) * tl * tl];
                    let qh = rm(hs).at((2 * jl + half) * tl * hs);
                    for blk in query_blocks(s, seg_start, b) {
                        let (rows, nk) = (blk.rows.len(), blk.keys.len());
                        let (r0, k0) = (blk.rows.start, blk.keys.start);
                        let pb = rm(tl).at(r0 * tl + k0);
                        let (qb, kb) = (qh.at(r0 * hs), rm(hs).at((half * tl + k0) * hs));
                        for vi in 0..2 {
                            let g = pair.at((jl * tl + r0) * 2 * hs + vi * hs);
                            let vb = rm(hs).at((vi * tl + k0) * hs);
                            let beta = if vi == 0 { T::ZERO } else { T::ONE };
                            gemm(
                                rows,
                                hs,
                                nk,
                                alpha,
                                gc,
                                g,
                                vc,
                                vb.t(),
                                beta,
                                &mut ds,
                                rm(nk),
                            );
                            gemm(nk, rows, hs, alpha, p, pb.t(), gc, g, T::ONE, dvc, vb);
                        }
                        softmax_backward_rows(&mut ds[..rows * nk], nk, p, pb);
                        gemm(rows, nk, hs, scale, &ds, rm(nk), kc, kb, T::ONE, dqc, qb);
                        gemm(
                            nk,
                            rows,
                            hs,
                            scale,
                            &ds,
                            rm(nk).t(),
                            qc,
                            qb,
                            T::ONE,
                            dkc,
                            kb,
                        );
                    }
                }
            }
        });
}

fn check<T>(s: &AttnShape, q: &[T], k: &[T], v: &[T]) -> (usize, usize, usize) {
    assert!(
        s.n_head.is_multiple_of(2) && s.n_kv.is_multiple_of(2),
        "differential attention needs even head and kv-group counts"
    );
    assert!(s.n_head.is_multiple_of(s.n_kv));
    assert_eq!(q.len(), s.batch * s.n_head * s.seq * s.head_size);
    assert_eq!(k.len(), s.batch * s.n_kv * s.seq * s.head_size);
    assert_eq!(v.len(), k.len());
    (s.seq, s.head_size, s.q_per_kv())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::gradcheck::*;
    use crate::cpu::ops::mask::segment_starts;

    /// (batch, seq, n_head, n_kv, hs, window, varlen)
    type Case = (usize, usize, usize, usize, usize, Option<usize>, bool);

    fn run(
        p: &[Vec<f64>],
        s: &AttnShape,
        seg: Option<&[u32]>,
        li: f64,
    ) -> (Vec<f64>, Vec<Vec<f64>>) {
        let n = p[0].len();
        let (mut out, mut probs, mut o2, mut diff) = (
            vec![0.0; n],
            vec![0.0; s.batch * s.n_head * s.seq * s.seq],
            vec![0.0; n],
            vec![0.0; n],
        );
        let mut rstd = vec![0.0; n / (2 * s.head_size)];
        let l = Lambdas {
            q1: &p[3],
            k1: &p[4],
            q2: &p[5],
            k2: &p[6],
        };
        let saved = DiffSaved {
            probs: &mut probs,
            o2: &mut o2,
            diff: &mut diff,
            rstd: &mut rstd,
        };
        diff_attention_forward(
            &mut out,
            saved,
            &p[0],
            &p[1],
            &p[2],
            &l,
            &p[7],
            li,
            s,
            seg,
            Storage::Exact,
        );
        (out, vec![probs, o2, diff, rstd])
    }

    fn check(&(batch, seq, h, g, hs, window, varlen): &Case) -> f64 {
        let mut rng = rng(14);
        let s = AttnShape {
            batch,
            seq,
            n_head: h,
            n_kv: g,
            head_size: hs,
            window,
            scale: 0.6,
        };
        let tokens: Vec<u32> = (0..batch * seq)
            .map(|i| if i % 3 == 0 { 2 } else { 5 })
            .collect();
        let mut seg = vec![0u32; batch * seq];
        segment_starts(&tokens, seq, 2, &mut seg);
        let seg = varlen.then_some(seg);
        let li = 0.8 - 0.6 * (-0.3f64 * 3.0).exp();
        let inputs = vec![
            ("q", randn(&mut rng, batch * h * seq * hs, 1.0)),
            ("k", randn(&mut rng, batch * g * seq * hs, 1.0)),
            ("v", randn(&mut rng, batch * g * seq * hs, 1.0)),
            ("lambda_q1", randn(&mut rng, hs, 0.5)),
            ("lambda_k1", randn(&mut rng, hs, 0.5)),
            ("lambda_q2", randn(&mut rng, hs, 0.5)),
            ("lambda_k2", randn(&mut rng, hs, 0.5)),
            ("subln", randn(&mut rng, 2 * hs, 1.0)),
        ];
        check_op(
            &mut rng,
            inputs,
            |p| run(p, &s, seg.as_deref(), li).0,
            |p, dout, gr| {
                let (_, sv) = run(p, &s, seg.as_deref(), li);
                let [dq, dk, dv, dq1, dk1, dq2, dk2, dsub] = gr else {
                    unreachable!()
                };
                let l = Lambdas {
                    q1: &p[3],
                    k1: &p[4],
                    q2: &p[5],
                    k2: &p[6],
                };
                let dl = LambdaGrads {
                    q1: dq1,
                    k1: dk1,
                    q2: dq2,
                    k2: dk2,
                };
                diff_attention_backward(
                    dq,
                    dk,
                    dv,
                    dl,
                    dsub,
                    dout,
                    &sv[0],
                    &sv[1],
                    &sv[2],
                    &sv[3],
                    &p[0],
                    &p[1],
                    &p[2],
                    &l,
                    &p[7],
                    li,
                    &s,
                    seg.as_deref(),
                );
            },
        )
    }
    gradcheck_shapes!(
        diff_attention_grad,
        check,
        [
            (1, 3, 2, 2, 2, None, false),
            (2, 5, 4, 2, 3, None, false),
            (1, 6, 8, 2, 2, Some(2), false),
            (2, 7, 4, 4, 2, None, true),
            (1, 8, 4, 2, 2, Some(3), true),
            (1, 50, 4, 2, 2, Some(36), true),
        ]
    );

    /// Pair structure against plain attention: with λ vectors zero, λ = λ_init, and
    /// O1 = [attn(q_{2j}, k_{2jj}, v_{2jj}) ‖ attn(q_{2j}, k_{2jj}, v_{2jj+1})].
    #[test]
    fn pairs_use_even_and_odd_heads() {
        use crate::cpu::ops::attention::attention_forward;
        let (batch, seq, h, g, hs) = (1, 4, 4, 2, 2);
        let s = AttnShape {
            batch,
            seq,
            n_head: h,
            n_kv: g,
            head_size: hs,
            window: None,
            scale: 0.9,
        };
        let mut rng = rng(15);
        let q = randn(&mut rng, h * seq * hs, 1.0);
        let k = randn(&mut rng, g * seq * hs, 1.0);
        let v = randn(&mut rng, g * seq * hs, 1.0);
        let zero = vec![0.0; hs];
        let li = 0.5;
        let p = vec![
            q.clone(),
            k.clone(),
            v.clone(),
            zero.clone(),
            zero.clone(),
            zero.clone(),
            zero,
            vec![1.0; 2 * hs],
        ];
        let (_, sv) = run(&p, &s, None, li);
        // Plain attention over single heads: q head qh with kv head kh.
        let single = |qh: usize, kh: usize, vh: usize| {
            let s1 = AttnShape {
                n_head: 1,
                n_kv: 1,
                ..s
            };
            let mut out = vec![0.0; seq * hs];
            let mut pr = vec![0.0; seq * seq];
            let sl = |x: &Vec<f64>, i: usize| x[i * seq * hs..(i + 1) * seq * hs].to_vec();
            attention_forward(
                &mut out,
                &mut pr,
                &sl(&q, qh),
                &sl(&k, kh),
                &sl(&v, vh),
                &s1,
                None,
            );
            out
        };
        // H/G = 2 with 2 pairs: both pairs use kv pair jj = j / 2 = 0.
        for j in 0..2 {
            let (a11, a12, a21, a22) = (
                single(2 * j, 0, 0),
                single(2 * j, 0, 1),
                single(2 * j + 1, 1, 0),
                single(2 * j + 1, 1, 1),
            );
            for t in 0..seq {
                for d in 0..hs {
                    let at = |c: usize| sv[2][(j * seq + t) * 2 * hs + c];
                    assert!((at(d) - (a11[t * hs + d] - li * a21[t * hs + d])).abs() < 1e-12);
                    assert!((at(hs + d) - (a12[t * hs + d] - li * a22[t * hs + d])).abs() < 1e-12);
                }
            }
        }
    }
}
