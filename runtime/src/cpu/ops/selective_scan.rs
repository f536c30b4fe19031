//! Mamba-1 selective scan (`selective_scan_ref` semantics, arch-spec §1.9) with the
//! `delta_bias` + softplus of the fused kernel, f32 state (for `T = f32`), and varlen state
//! reset at document starts.
//!
//! Per row b, channel c < D, state k < N:
//! ```text
//! δ_t   = softplus(delta[t,c] + delta_bias[c])          (softplus(u) = u for u > 20)
//! A     = −exp(a_log)
//! h_t   = exp(δ_t·A[c,k])·h_{t−1} + δ_t·B[t,k]·x[t,c]     (h = 0 before a row/document start)
//! y[t,c] = Σ_k C[t,k]·h_t[c,k] + d_skip[c]·x[t,c]
//! ```
//! B and C are shared by all channels (one group). The backward pass recomputes the states
//! (no `T×D×N` tensor is kept).

use crate::cpu::float::{sigmoid, Real};
use rayon::prelude::*;

/// Channels per parallel task (fixed, so reductions do not depend on the thread count).
const CHANNEL_BLOCK: usize = 16;
const SOFTPLUS_THRESHOLD: f64 = 20.0;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScanShape {
    pub batch: usize,
    pub seq: usize,
    /// Channels D (`d_inner`).
    pub d_inner: usize,
    /// States N (`d_state`).
    pub d_state: usize,
}

/// Inputs of the scan. Layouts: `x`, `delta`: `[B, T, D]` (delta before bias and softplus);
/// `b_mat`, `c_mat`: `[B, T, N]`; `delta_bias`, `d_skip`: `[D]`; `a_log`: `[D, N]`;
/// `seg_start`: optional `[B, T]` document starts ([`super::mask::segment_starts`]).
#[derive(Clone, Copy)]
pub struct ScanInputs<'a, T> {
    pub x: &'a [T],
    pub delta: &'a [T],
    pub delta_bias: &'a [T],
    pub a_log: &'a [T],
    pub b_mat: &'a [T],
    pub c_mat: &'a [T],
    pub d_skip: &'a [T],
    pub seg_start: Option<&'a [u32]>,
}

/// Gradients of [`ScanInputs`], accumulated.
pub struct ScanGrads<'a, T> {
    pub x: &'a mut [T],
    pub delta: &'a mut [T],
    pub delta_bias: &'a mut [T],
    pub a_log: &'a mut [T],
    pub b_mat: &'a mut [T],
    pub c_mat: &'a mut [T],
    pub d_skip: &'a mut [T],
}

/// Writes `y` `[B, T, D]`.
pub fn selective_scan_forward<T: Real>(y: &mut [T], inp: &ScanInputs<T>, s: &ScanShape) {
    check(inp, s);
    assert_eq!(y.len(), s.batch * s.seq * s.d_inner);
    let (tl, d, n) = (s.seq, s.d_inner, s.d_state);
    let x_cm = to_channel_major(inp.x, s);
    let delta_cm = to_channel_major(inp.delta, s);
    let neg_a: Vec<T> = inp.a_log.iter().map(|&v| -v.exp()).collect();
    let mut y_cm = vec![T::ZERO; y.len()];
    let tasks: Vec<(usize, usize, &mut [T])> = y_cm
        .chunks_mut((d * tl).max(1))
        .enumerate()
        .flat_map(|(b, yb)| {
            yb.chunks_mut(CHANNEL_BLOCK * tl)
                .enumerate()
                .map(move |(blk, yc)| (b, blk * CHANNEL_BLOCK, yc))
        })
        .collect();
    tasks.into_par_iter().for_each(|(b, c0, yc)| {
        let mut h = vec![T::ZERO; n];
        for (ci, yrow) in yc.chunks_mut(tl).enumerate() {
            let c = c0 + ci;
            let row = (b * d + c) * tl;
            h.fill(T::ZERO);
            for t in 0..tl {
                if resets(inp.seg_start, b, tl, t) {
                    h.fill(T::ZERO);
                }
                let xv = x_cm[row + t];
                let dt = softplus(delta_cm[row + t] + inp.delta_bias[c]);
                let bt = &inp.b_mat[(b * tl + t) * n..(b * tl + t + 1) * n];
                let ct = &inp.c_mat[(b * tl + t) * n..(b * tl + t + 1) * n];
                let mut acc = T::ZERO;
                for k in 0..n {
                    h[k] = (dt * neg_a[c * n + k]).exp() * h[k] + dt * bt[k] * xv;
                    acc += ct[k] * h[k];
                }
                yrow[t] = acc + inp.d_skip[c] * xv;
            }
        }
    });
    from_channel_major(y, &y_cm, s, false);
}

/// Accumulates every gradient in `g` given `dy` `[B, T, D]`.
pub fn selective_scan_backward<T: Real>(
    g: ScanGrads<T>,
    dy: &[T],
    inp: &ScanInputs<T>,
    s: &ScanShape,
) {
    check(inp, s);
    let (tl, d, n) = (s.seq, s.d_inner, s.d_state);
    let x_cm = to_channel_major(inp.x, s);
    let delta_cm = to_channel_major(inp.delta, s);
    let dy_cm = to_channel_major(dy, s);
    let neg_a: Vec<T> = inp.a_log.iter().map(|&v| -v.exp()).collect();
    let mut dx_cm = vec![T::ZERO; x_cm.len()];
    let mut ddelta_cm = vec![T::ZERO; x_cm.len()];

    struct Partial<T> {
        da: Vec<T>,
        dd: Vec<T>,
        dbias: Vec<T>,
        db: Vec<T>,
        dc: Vec<T>,
    }
    type Task<'a, T> = (usize, usize, &'a mut [T], &'a mut [T]);
    let tasks: Vec<Task<T>> = dx_cm
        .chunks_mut((d * tl).max(1))
        .zip(ddelta_cm.chunks_mut((d * tl).max(1)))
        .enumerate()
        .flat_map(|(b, (xb, db))| {
            xb.chunks_mut(CHANNEL_BLOCK * tl)
                .zip(db.chunks_mut(CHANNEL_BLOCK * tl))
                .enumerate()
                .map(move |(blk, (xc, dc))| (b, blk * CHANNEL_BLOCK, xc, dc))
        })
        .collect();
    let origins: Vec<(usize, usize)> = tasks.iter().map(|t| (t.0, t.1)).collect();
    let partials: Vec<Partial<T>> = tasks
        .into_par_iter()
        .map(|(b, c0, dxc, ddc)| {
            let nc = dxc.len() / tl;
            let mut p = Partial {
                da: vec![T::ZERO; nc * n],
                dd: vec![T::ZERO; nc],
                dbias: vec![T::ZERO; nc],
                db: vec![T::ZERO; tl * n],
                dc: vec![T::ZERO; tl * n],
            };
            let mut states = vec![T::ZERO; tl * n];
            let mut dts = vec![T::ZERO; tl];
            let mut lam = vec![T::ZERO; n];
            for ci in 0..nc {
                let c = c0 + ci;
                let row = (b * d + c) * tl;
                let a = &neg_a[c * n..(c + 1) * n];
                // Recompute the states h_t (after the update at t).
                for t in 0..tl {
                    let dt = softplus(delta_cm[row + t] + inp.delta_bias[c]);
                    dts[t] = dt;
                    let xv = x_cm[row + t];
                    let bt = &inp.b_mat[(b * tl + t) * n..(b * tl + t + 1) * n];
                    let reset = resets(inp.seg_start, b, tl, t);
                    for k in 0..n {
                        let prev = if reset {
                            T::ZERO
                        } else {
                            states[(t - 1) * n + k]
                        };
                        states[t * n + k] = (dt * a[k]).exp() * prev + dt * bt[k] * xv;
                    }
                }
                // Reverse pass; lam = ∂L/∂h_t.
                lam.fill(T::ZERO);
                for t in (0..tl).rev() {
                    let gy = dy_cm[row + t];
                    let xv = x_cm[row + t];
                    let dt = dts[t];
                    let bt = &inp.b_mat[(b * tl + t) * n..(b * tl + t + 1) * n];
                    let ct = &inp.c_mat[(b * tl + t) * n..(b * tl + t + 1) * n];
                    let reset = resets(inp.seg_start, b, tl, t);
                    p.dd[ci] += gy * xv;
                    let mut dx = gy * inp.d_skip[c];
                    let mut ddt = T::ZERO;
                    let (db_t, dc_t) =
                        (&mut p.db[t * n..(t + 1) * n], &mut p.dc[t * n..(t + 1) * n]);
                    for k in 0..n {
                        let h = states[t * n + k];
                        dc_t[k] += gy * h;
                        lam[k] += gy * ct[k];
                        let prev = if reset {
                            T::ZERO
                        } else {
                            states[(t - 1) * n + k]
                        };
                        let decay = (dt * a[k]).exp();
                        dx += lam[k] * dt * bt[k];
                        ddt += lam[k] * (a[k] * decay * prev + bt[k] * xv);
                        // d/dA_log = d/dA · A.
                        p.da[ci * n + k] += lam[k] * dt * decay * prev * a[k];
                        db_t[k] += lam[k] * dt * xv;
                        lam[k] = if reset { T::ZERO } else { lam[k] * decay };
                    }
                    let pre = delta_cm[row + t] + inp.delta_bias[c];
                    let dpre = if pre.to_f64() > SOFTPLUS_THRESHOLD {
                        ddt
                    } else {
                        ddt * sigmoid(pre)
                    };
                    dxc[ci * tl + t] = dx;
                    ddc[ci * tl + t] = dpre;
                    p.dbias[ci] += dpre;
                }
            }
            p
        })
        .collect();

    // Reduce in task order: per-channel sums over rows, per-token sums over channel blocks.
    for (&(b, c0), p) in origins.iter().zip(&partials) {
        let nc = p.dd.len();
        for ci in 0..nc {
            g.d_skip[c0 + ci] += p.dd[ci];
            g.delta_bias[c0 + ci] += p.dbias[ci];
        }
        for (dst, src) in g.a_log[c0 * n..(c0 + nc) * n].iter_mut().zip(&p.da) {
            *dst += *src;
        }
        for (dst, src) in g.b_mat[b * tl * n..(b + 1) * tl * n].iter_mut().zip(&p.db) {
            *dst += *src;
        }
        for (dst, src) in g.c_mat[b * tl * n..(b + 1) * tl * n].iter_mut().zip(&p.dc) {
            *dst += *src;
        }
    }
    from_channel_major(g.x, &dx_cm, s, true);
    from_channel_major(g.delta, &ddelta_cm, s, true);
}

#[inline]
fn softplus<T: Real>(u: T) -> T {
    if u.to_f64() > SOFTPLUS_THRESHOLD {
        u
    } else {
        u.exp().ln_1p()
    }
}

/// Whether the state is reset before token `t` of row `b` (row start or document start).
#[inline]
fn resets(seg_start: Option<&[u32]>, b: usize, seq: usize, t: usize) -> bool {
    t == 0 || seg_start.is_some_and(|s| s[b * seq + t] as usize == t)
}

fn check<T>(inp: &ScanInputs<T>, s: &ScanShape) {
    let (btd, btn) = (s.batch * s.seq * s.d_inner, s.batch * s.seq * s.d_state);
    assert_eq!(inp.x.len(), btd);
    assert_eq!(inp.delta.len(), btd);
    assert_eq!(inp.b_mat.len(), btn);
    assert_eq!(inp.c_mat.len(), btn);
    assert_eq!(inp.delta_bias.len(), s.d_inner);
    assert_eq!(inp.d_skip.len(), s.d_inner);
    assert_eq!(inp.a_log.len(), s.d_inner * s.d_state);
}

/// `[B, T, D]` → `[B, D, T]`.
fn to_channel_major<T: Real>(x: &[T], s: &ScanShape) -> Vec<T> {
    let (tl, d) = (s.seq, s.d_inner);
    let mut out = vec![T::ZERO; x.len()];
    out.par_chunks_mut((tl * d).max(1))
        .zip(x.par_chunks((tl * d).max(1)))
        .for_each(|(o, xb)| {
            for t in 0..tl {
                for c in 0..d {
                    o[c * tl + t] = xb[t * d + c];
                }
            }
        });
    out
}

/// `[B, D, T]` → `[B, T, D]`, written or added into `out`.
fn from_channel_major<T: Real>(out: &mut [T], x_cm: &[T], s: &ScanShape, add: bool) {
    let (tl, d) = (s.seq, s.d_inner);
    out.par_chunks_mut((tl * d).max(1))
        .zip(x_cm.par_chunks((tl * d).max(1)))
        .for_each(|(o, xb)| {
            for t in 0..tl {
                for c in 0..d {
                    if add {
                        o[t * d + c] += xb[c * tl + t];
                    } else {
                        o[t * d + c] = xb[c * tl + t];
                    }
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::gradcheck::*;
    use crate::cpu::ops::mask::segment_starts;

    /// (batch, seq, d_inner, d_state, varlen)
    type Case = (usize, usize, usize, usize, bool);

    fn check(&(batch, seq, d, n, varlen): &Case) -> f64 {
        let mut rng = rng(16);
        let s = ScanShape {
            batch,
            seq,
            d_inner: d,
            d_state: n,
        };
        let tokens: Vec<u32> = (0..batch * seq)
            .map(|i| if i % 4 == 2 { 2 } else { 5 })
            .collect();
        let mut seg = vec![0u32; batch * seq];
        segment_starts(&tokens, seq, 2, &mut seg);
        let seg = varlen.then_some(seg);
        // Keep some pre-softplus values above the threshold (u > 20 ⇒ identity).
        let mut delta = randn(&mut rng, batch * seq * d, 1.0);
        if delta.len() > 3 {
            delta[3] = 22.0;
        }
        let inputs = vec![
            ("x", randn(&mut rng, batch * seq * d, 1.0)),
            ("delta", delta),
            ("delta_bias", randn(&mut rng, d, 0.5)),
            ("a_log", randn(&mut rng, d * n, 0.5)),
            ("b", randn(&mut rng, batch * seq * n, 1.0)),
            ("c", randn(&mut rng, batch * seq * n, 1.0)),
            ("d_skip", randn(&mut rng, d, 1.0)),
        ];
        let mk = |p: &'_ [Vec<f64>], seg: Option<&'_ [u32]>| -> Vec<f64> {
            let inp = ScanInputs {
                x: &p[0],
                delta: &p[1],
                delta_bias: &p[2],
                a_log: &p[3],
                b_mat: &p[4],
                c_mat: &p[5],
                d_skip: &p[6],
                seg_start: seg,
            };
            let mut y = vec![0.0; batch * seq * d];
            selective_scan_forward(&mut y, &inp, &s);
            y
        };
        check_op(
            &mut rng,
            inputs,
            |p| mk(p, seg.as_deref()),
            |p, dy, gr| {
                let inp = ScanInputs {
                    x: &p[0],
                    delta: &p[1],
                    delta_bias: &p[2],
                    a_log: &p[3],
                    b_mat: &p[4],
                    c_mat: &p[5],
                    d_skip: &p[6],
                    seg_start: seg.as_deref(),
                };
                let [x, delta, delta_bias, a_log, b_mat, c_mat, d_skip] = gr else {
                    unreachable!()
                };
                selective_scan_backward(
                    ScanGrads {
                        x,
                        delta,
                        delta_bias,
                        a_log,
                        b_mat,
                        c_mat,
                        d_skip,
                    },
                    dy,
                    &inp,
                    &s,
                );
            },
        )
    }
    gradcheck_shapes!(
        selective_scan_grad,
        check,
        [
            (1, 1, 1, 1, false),
            (2, 5, 3, 2, false),
            (1, 7, 18, 3, false),
            (2, 9, 4, 4, true),
            (1, 6, 17, 2, true)
        ]
    );

    /// Naive recurrence with an explicit state tensor.
    #[test]
    fn matches_naive_recurrence() {
        let (batch, seq, d, n) = (2, 6, 3, 4);
        let s = ScanShape {
            batch,
            seq,
            d_inner: d,
            d_state: n,
        };
        let mut rng = rng(17);
        let (x, delta, bias, a_log) = (
            randn(&mut rng, batch * seq * d, 1.0),
            randn(&mut rng, batch * seq * d, 1.0),
            randn(&mut rng, d, 1.0),
            randn(&mut rng, d * n, 1.0),
        );
        let (bm, cm, dsk) = (
            randn(&mut rng, batch * seq * n, 1.0),
            randn(&mut rng, batch * seq * n, 1.0),
            randn(&mut rng, d, 1.0),
        );
        let inp = ScanInputs {
            x: &x,
            delta: &delta,
            delta_bias: &bias,
            a_log: &a_log,
            b_mat: &bm,
            c_mat: &cm,
            d_skip: &dsk,
            seg_start: None,
        };
        let mut y = vec![0.0; batch * seq * d];
        selective_scan_forward(&mut y, &inp, &s);
        for b in 0..batch {
            let mut h = vec![0.0f64; d * n];
            for t in 0..seq {
                for c in 0..d {
                    let i = (b * seq + t) * d + c;
                    let dt = (delta[i] + bias[c]).exp().ln_1p();
                    let mut want = dsk[c] * x[i];
                    for k in 0..n {
                        let a = -a_log[c * n + k].exp();
                        h[c * n + k] =
                            (dt * a).exp() * h[c * n + k] + dt * bm[(b * seq + t) * n + k] * x[i];
                        want += cm[(b * seq + t) * n + k] * h[c * n + k];
                    }
                    assert!((y[i] - want).abs() < 1e-12);
                }
            }
        }
    }
}
