//! Causal softmax attention with GQA, optional sliding window and optional varlen
//! (block-diagonal) masking, plus the layout ops around it.
//!
//! Heads are processed in head-major layout (`[B, heads, T, hs]`); [`split_qkv`] turns the
//! fused grouped QKV projection (`[B, T, G, H/G + 2, hs]`, per kv group the H/G query heads,
//! then k, then v — lit-gpt's layout) into that, and [`heads_to_tokens`] turns the output
//! back into `[B, T, H·hs]` for `proj`. Query head `h` uses kv head `h / (H/G)`.
//!
//! Mask: query `t` sees keys `s` with `lo(t) ≤ s ≤ t`, `lo(t) = max(seg_start[t], t−W+1)`
//! (window `W`, FlashAttention `window_size = (W−1, 0)`; `seg_start` from
//! [`super::mask::segment_starts`] in varlen mode, else 0).

use crate::cpu::float::{gemm, Layout, Real};
use rayon::prelude::*;

/// Shape and masking of one attention call.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttnShape {
    pub batch: usize,
    pub seq: usize,
    /// Query heads H.
    pub n_head: usize,
    /// Key/value heads G (H must be a multiple of G).
    pub n_kv: usize,
    pub head_size: usize,
    /// Sliding window W (keys `[t−W+1, t]`), `None` = full causal. `W ≥ 1`.
    pub window: Option<usize>,
    /// Softmax scale (`1/√hs`, or `√128/hs` under μP).
    pub scale: f64,
}

impl AttnShape {
    /// Query heads per kv head.
    pub fn q_per_kv(&self) -> usize {
        self.n_head / self.n_kv
    }

    fn validate(&self) {
        assert!(
            self.n_kv > 0 && self.n_head.is_multiple_of(self.n_kv),
            "n_head must be a multiple of n_kv"
        );
        assert!(
            self.window != Some(0),
            "attention window must be at least 1"
        );
    }

    /// First visible key of query `t` in row `b`.
    #[inline]
    pub fn key_start(&self, seg_start: Option<&[u32]>, b: usize, t: usize) -> usize {
        let mut lo = seg_start.map_or(0, |s| s[b * self.seq + t] as usize);
        if let Some(w) = self.window {
            lo = lo.max((t + 1).saturating_sub(w));
        }
        lo
    }
}

/// `qkv` `[B, T, G, H/G+2, hs]` → `q` `[B, H, T, hs]`, `k`, `v` `[B, G, T, hs]` (overwrites).
pub fn split_qkv<T: Real>(q: &mut [T], k: &mut [T], v: &mut [T], qkv: &[T], s: &AttnShape) {
    s.validate();
    let (t_len, hs, g_n, qpk) = (s.seq, s.head_size, s.n_kv, s.q_per_kv());
    let slots = qpk + 2;
    assert_eq!(qkv.len(), s.batch * t_len * g_n * slots * hs);
    q.par_chunks_mut(qpk * t_len * hs)
        .zip(k.par_chunks_mut(t_len * hs))
        .zip(v.par_chunks_mut(t_len * hs))
        .enumerate()
        .for_each(|(i, ((qc, kc), vc))| {
            let (b, g) = (i / g_n, i % g_n);
            for t in 0..t_len {
                let base = ((b * t_len + t) * g_n + g) * slots * hs;
                for j in 0..qpk {
                    qc[(j * t_len + t) * hs..(j * t_len + t + 1) * hs]
                        .copy_from_slice(&qkv[base + j * hs..base + (j + 1) * hs]);
                }
                kc[t * hs..(t + 1) * hs]
                    .copy_from_slice(&qkv[base + qpk * hs..base + (qpk + 1) * hs]);
                vc[t * hs..(t + 1) * hs]
                    .copy_from_slice(&qkv[base + (qpk + 1) * hs..base + (qpk + 2) * hs]);
            }
        });
}

/// Inverse of [`split_qkv`]: head-major `q`, `k`, `v` → fused `qkv` (overwrites). Used on
/// gradients: `dqkv = merge_qkv(dq, dk, dv)`.
pub fn merge_qkv<T: Real>(qkv: &mut [T], q: &[T], k: &[T], v: &[T], s: &AttnShape) {
    s.validate();
    let (t_len, hs, g_n, qpk) = (s.seq, s.head_size, s.n_kv, s.q_per_kv());
    let slots = qpk + 2;
    qkv.par_chunks_mut(g_n * slots * hs)
        .enumerate()
        .for_each(|(bt, row)| {
            let (b, t) = (bt / t_len, bt % t_len);
            for g in 0..g_n {
                let base = g * slots * hs;
                let kv = ((b * g_n + g) * t_len + t) * hs;
                for j in 0..qpk {
                    let qh = (((b * g_n + g) * qpk + j) * t_len + t) * hs;
                    row[base + j * hs..base + (j + 1) * hs].copy_from_slice(&q[qh..qh + hs]);
                }
                row[base + qpk * hs..base + (qpk + 1) * hs].copy_from_slice(&k[kv..kv + hs]);
                row[base + (qpk + 1) * hs..base + (qpk + 2) * hs].copy_from_slice(&v[kv..kv + hs]);
            }
        });
}

/// `[B, T, heads, d]` → `[B, heads, T, d]` (overwrites).
pub fn tokens_to_heads<T: Real>(
    out: &mut [T],
    x: &[T],
    batch: usize,
    seq: usize,
    heads: usize,
    d: usize,
) {
    assert_eq!(out.len(), batch * seq * heads * d);
    assert_eq!(x.len(), out.len());
    out.par_chunks_mut(seq * d).enumerate().for_each(|(bh, o)| {
        let (b, h) = (bh / heads, bh % heads);
        for t in 0..seq {
            let src = ((b * seq + t) * heads + h) * d;
            o[t * d..(t + 1) * d].copy_from_slice(&x[src..src + d]);
        }
    });
}

/// `[B, heads, T, d]` → `[B, T, heads, d]` (overwrites).
pub fn heads_to_tokens<T: Real>(
    out: &mut [T],
    x: &[T],
    batch: usize,
    seq: usize,
    heads: usize,
    d: usize,
) {
    assert_eq!(out.len(), batch * seq * heads * d);
    assert_eq!(x.len(), out.len());
    out.par_chunks_mut(heads * d)
        .enumerate()
        .for_each(|(bt, o)| {
            let (b, t) = (bt / seq, bt % seq);
            for h in 0..heads {
                let src = ((b * heads + h) * seq + t) * d;
                o[h * d..(h + 1) * d].copy_from_slice(&x[src..src + d]);
            }
        });
}

/// `out[b,h] = softmax(scale·q[b,h]·k[b,h/(H/G)]ᵀ + mask)·v[b,h/(H/G)]`.
/// `q`, `out`: `[B, H, T, hs]`; `k`, `v`: `[B, G, T, hs]`; `probs`: `[B, H, T, T]`, the
/// attention weights saved for backward (masked entries exactly 0). Queries are processed
/// in blocks of [`QUERY_BLOCK`] rows against only the keys the block can see.
#[allow(clippy::too_many_arguments)]
pub fn attention_forward<T: Real>(
    out: &mut [T],
    probs: &mut [T],
    q: &[T],
    k: &[T],
    v: &[T],
    s: &AttnShape,
    seg_start: Option<&[u32]>,
) {
    s.validate();
    let (tl, hs, qpk) = (s.seq, s.head_size, s.q_per_kv());
    check_sizes(s, q, k, v, out.len(), probs.len());
    let scale = T::from_f64(s.scale);
    let rm = Layout::row_major;
    out.par_chunks_mut(qpk * tl * hs)
        .zip(probs.par_chunks_mut(qpk * tl * tl))
        .enumerate()
        .for_each(|(i, (oc, pc))| {
            let b = i / s.n_kv;
            let (kc, vc) = (
                &k[i * tl * hs..(i + 1) * tl * hs],
                &v[i * tl * hs..(i + 1) * tl * hs],
            );
            let qc = &q[i * qpk * tl * hs..(i + 1) * qpk * tl * hs];
            for j in 0..qpk {
                let p = &mut pc[j * tl * tl..(j + 1) * tl * tl];
                let head = rm(hs).at(j * tl * hs);
                for blk in query_blocks(s, seg_start, b) {
                    let (rows, nk) = (blk.rows.len(), blk.keys.len());
                    let (qb, kb) = (head.at(blk.rows.start * hs), rm(hs).at(blk.keys.start * hs));
                    let pb = rm(tl).at(blk.rows.start * tl + blk.keys.start);
                    gemm(rows, hs, nk, scale, qc, qb, kc, kb.t(), T::ZERO, p, pb);
                    masked_softmax_rows(p, s, seg_start, b, blk.rows.clone());
                    gemm(rows, nk, hs, T::ONE, p, pb, vc, kb, T::ZERO, oc, qb);
                }
            }
        });
}

/// Accumulates `dq`, `dk`, `dv` (layouts as `q`, `k`, `v`) for [`attention_forward`] given
/// `dout` and the saved `probs`. kv heads shared by several query heads (GQA) and by later
/// YOCO cross-attention layers sum their gradients. `seg_start` only narrows the key
/// ranges visited (the mask itself is in `probs`): pass the forward's, or `None` (slower).
#[allow(clippy::too_many_arguments)]
pub fn attention_backward<T: Real>(
    dq: &mut [T],
    dk: &mut [T],
    dv: &mut [T],
    dout: &[T],
    probs: &[T],
    q: &[T],
    k: &[T],
    v: &[T],
    s: &AttnShape,
    seg_start: Option<&[u32]>,
) {
    s.validate();
    let (tl, hs, qpk) = (s.seq, s.head_size, s.q_per_kv());
    check_sizes(s, q, k, v, dout.len(), probs.len());
    assert_eq!(dq.len(), q.len());
    assert_eq!(dk.len(), k.len());
    assert_eq!(dv.len(), v.len());
    let scale = T::from_f64(s.scale);
    let rm = Layout::row_major;
    dq.par_chunks_mut(qpk * tl * hs)
        .zip(dk.par_chunks_mut(tl * hs))
        .zip(dv.par_chunks_mut(tl * hs))
        .enumerate()
        .for_each(|(i, ((dqc, dkc), dvc))| {
            let b = i / s.n_kv;
            let (kc, vc) = (
                &k[i * tl * hs..(i + 1) * tl * hs],
                &v[i * tl * hs..(i + 1) * tl * hs],
            );
            let qc = &q[i * qpk * tl * hs..(i + 1) * qpk * tl * hs];
            let doc = &dout[i * qpk * tl * hs..(i + 1) * qpk * tl * hs];
            let pc = &probs[i * qpk * tl * tl..(i + 1) * qpk * tl * tl];
            let mut ds = vec![T::ZERO; QUERY_BLOCK.min(tl) * tl];
            for j in 0..qpk {
                let p = &pc[j * tl * tl..(j + 1) * tl * tl];
                let head = rm(hs).at(j * tl * hs);
                for blk in query_blocks(s, seg_start, b) {
                    let (rows, nk) = (blk.rows.len(), blk.keys.len());
                    let (qb, kb) = (head.at(blk.rows.start * hs), rm(hs).at(blk.keys.start * hs));
                    let pb = rm(tl).at(blk.rows.start * tl + blk.keys.start);
                    // dP = dO·Vᵀ, then dS = P ⊙ (dP − rowsum(P ⊙ dP)).
                    gemm(
                        rows,
                        hs,
                        nk,
                        T::ONE,
                        doc,
                        qb,
                        vc,
                        kb.t(),
                        T::ZERO,
                        &mut ds,
                        rm(nk),
                    );
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
                    gemm(nk, rows, hs, T::ONE, p, pb.t(), doc, qb, T::ONE, dvc, kb);
                }
            }
        });
}

fn check_sizes<T>(s: &AttnShape, q: &[T], k: &[T], v: &[T], out_len: usize, probs_len: usize) {
    let (b, tl, hs) = (s.batch, s.seq, s.head_size);
    assert_eq!(q.len(), b * s.n_head * tl * hs);
    assert_eq!(k.len(), b * s.n_kv * tl * hs);
    assert_eq!(v.len(), k.len());
    assert_eq!(out_len, q.len());
    assert_eq!(probs_len, b * s.n_head * tl * tl);
}

/// Query rows per block.
pub const QUERY_BLOCK: usize = 32;

/// A block of query rows and the keys any of them can see.
#[derive(Clone, Debug)]
pub(crate) struct QueryBlock {
    pub rows: std::ops::Range<usize>,
    pub keys: std::ops::Range<usize>,
}

/// Blocks of [`QUERY_BLOCK`] queries of row `b`; block `[i0, i1)` sees keys
/// `[key_start(i0), i1)` (`key_start` never decreases with `t`).
pub(crate) fn query_blocks<'a>(
    s: &'a AttnShape,
    seg_start: Option<&'a [u32]>,
    b: usize,
) -> impl Iterator<Item = QueryBlock> + 'a {
    (0..s.seq).step_by(QUERY_BLOCK).map(move |i0| {
        let i1 = (i0 + QUERY_BLOCK).min(s.seq);
        QueryBlock {
            rows: i0..i1,
            keys: s.key_start(seg_start, b, i0)..i1,
        }
    })
}

/// Row-wise masked softmax, in place, of the rows `rows` of the `[T, T]` score matrix `p`
/// of batch row `b`: scores are read in `[lo(t), t]`; every other entry becomes exactly 0.
pub(crate) fn masked_softmax_rows<T: Real>(
    p: &mut [T],
    s: &AttnShape,
    seg_start: Option<&[u32]>,
    b: usize,
    rows: std::ops::Range<usize>,
) {
    let tl = s.seq;
    for t in rows {
        let lo = s.key_start(seg_start, b, t);
        let row = &mut p[t * tl..(t + 1) * tl];
        let max = row[lo..=t].iter().copied().fold(row[t], T::max);
        let mut sum = T::ZERO;
        for x in &mut row[lo..=t] {
            *x = (*x - max).exp();
            sum += *x;
        }
        let inv = T::ONE / sum;
        for x in &mut row[lo..=t] {
            *x *= inv;
        }
        row[..lo].fill(T::ZERO);
        row[t + 1..].fill(T::ZERO);
    }
}

/// In place `dp → p ⊙ (dp − rowsum(p ⊙ dp))` for a block: `dp` holds rows of `width`,
/// row `r` of `p` starts at `pl.offset + r·pl.rs` (masked entries of `p` are 0, so stay 0).
pub(crate) fn softmax_backward_rows<T: Real>(dp: &mut [T], width: usize, p: &[T], pl: Layout) {
    for (r, drow) in dp.chunks_mut(width).enumerate() {
        let prow = &p[pl.offset + r * pl.rs..pl.offset + r * pl.rs + width];
        let dot = drow.iter().zip(prow).map(|(&d, &pv)| d * pv).sum::<T>();
        for (d, &pv) in drow.iter_mut().zip(prow) {
            *d = pv * (*d - dot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::gradcheck::*;
    use crate::cpu::ops::mask::segment_starts;

    /// (batch, seq, n_head, n_kv, hs, window, varlen)
    type Case = (usize, usize, usize, usize, usize, Option<usize>, bool);

    fn seg_for(batch: usize, seq: usize, varlen: bool) -> Option<Vec<u32>> {
        let tokens: Vec<u32> = (0..batch * seq)
            .map(|i| if i % 4 == 1 { 2 } else { 5 })
            .collect();
        let mut seg = vec![0u32; batch * seq];
        segment_starts(&tokens, seq, 2, &mut seg);
        varlen.then_some(seg)
    }

    fn check(&(batch, seq, h, g, hs, window, varlen): &Case) -> f64 {
        let mut rng = rng(12);
        let s = AttnShape {
            batch,
            seq,
            n_head: h,
            n_kv: g,
            head_size: hs,
            window,
            scale: 0.7,
        };
        let seg = seg_for(batch, seq, varlen);
        let inputs = vec![
            ("q", randn(&mut rng, batch * h * seq * hs, 1.0)),
            ("k", randn(&mut rng, batch * g * seq * hs, 1.0)),
            ("v", randn(&mut rng, batch * g * seq * hs, 1.0)),
        ];
        let fwd = |p: &[Vec<f64>]| {
            let mut out = vec![0.0; p[0].len()];
            let mut probs = vec![0.0; batch * h * seq * seq];
            attention_forward(
                &mut out,
                &mut probs,
                &p[0],
                &p[1],
                &p[2],
                &s,
                seg.as_deref(),
            );
            (out, probs)
        };
        check_op(
            &mut rng,
            inputs,
            |p| fwd(p).0,
            |p, dout, gr| {
                let (_, probs) = fwd(p);
                let [dq, dk, dv] = gr else { unreachable!() };
                attention_backward(
                    dq,
                    dk,
                    dv,
                    dout,
                    &probs,
                    &p[0],
                    &p[1],
                    &p[2],
                    &s,
                    seg.as_deref(),
                );
            },
        )
    }
    gradcheck_shapes!(
        attention_grad,
        check,
        [
            (1, 1, 1, 1, 2, None, false),
            (2, 5, 2, 2, 3, None, false),
            (1, 7, 4, 2, 4, None, false),
            (2, 6, 4, 1, 2, None, false),
            (1, 9, 2, 1, 4, Some(3), false),
            (2, 8, 4, 2, 2, Some(1), false),
            (2, 9, 2, 2, 3, None, true),
            (1, 11, 4, 1, 3, Some(4), true),
            (1, 70, 2, 1, 2, Some(40), true),
            (1, 45, 2, 2, 2, None, false),
        ]
    );

    /// Naive reference: scores, mask and softmax written out per query.
    #[test]
    fn matches_naive_with_window_and_gqa() {
        let (batch, seq, h, g, hs) = (2, 75, 4, 2, 3);
        let s = AttnShape {
            batch,
            seq,
            n_head: h,
            n_kv: g,
            head_size: hs,
            window: Some(40),
            scale: 0.5,
        };
        let mut rng = rng(13);
        let (q, k, v) = (
            randn(&mut rng, batch * h * seq * hs, 1.0),
            randn(&mut rng, batch * g * seq * hs, 1.0),
            randn(&mut rng, batch * g * seq * hs, 1.0),
        );
        let mut out = vec![0.0; q.len()];
        let mut probs = vec![0.0; batch * h * seq * seq];
        attention_forward(&mut out, &mut probs, &q, &k, &v, &s, None);
        for b in 0..batch {
            for hh in 0..h {
                let kvh = hh / (h / g);
                for t in 0..seq {
                    let lo = (t + 1).saturating_sub(40);
                    let qv = &q[((b * h + hh) * seq + t) * hs..][..hs];
                    let sc: Vec<f64> = (lo..=t)
                        .map(|u| {
                            0.5 * (0..hs)
                                .map(|d| qv[d] * k[((b * g + kvh) * seq + u) * hs + d])
                                .sum::<f64>()
                        })
                        .collect();
                    let m = sc.iter().cloned().fold(f64::MIN, f64::max);
                    let z: f64 = sc.iter().map(|x| (x - m).exp()).sum();
                    for d in 0..hs {
                        let want: f64 = (lo..=t)
                            .zip(&sc)
                            .map(|(u, x)| (x - m).exp() / z * v[((b * g + kvh) * seq + u) * hs + d])
                            .sum();
                        let got = out[((b * h + hh) * seq + t) * hs + d];
                        assert!(
                            (want - got).abs() < 1e-12,
                            "b{b} h{hh} t{t} d{d}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn qkv_layout_roundtrip_and_grouping() {
        let s = AttnShape {
            batch: 2,
            seq: 3,
            n_head: 4,
            n_kv: 2,
            head_size: 2,
            window: None,
            scale: 1.0,
        };
        let n = 2 * 3 * 2 * 4 * 2;
        let qkv: Vec<f64> = (0..n).map(|i| i as f64).collect();
        let (mut q, mut k, mut v) = (
            vec![0.0; 2 * 4 * 3 * 2],
            vec![0.0; 2 * 2 * 3 * 2],
            vec![0.0; 2 * 2 * 3 * 2],
        );
        split_qkv(&mut q, &mut k, &mut v, &qkv, &s);
        // Token (b=1, t=2), group 1 starts at ((1*3+2)*2+1)*4*2 = 88: q heads 2,3 then k, v.
        assert_eq!(&q[((4 + 2) * 3 + 2) * 2..][..2], &[88.0, 89.0]);
        assert_eq!(&q[((4 + 3) * 3 + 2) * 2..][..2], &[90.0, 91.0]);
        assert_eq!(&k[((2 + 1) * 3 + 2) * 2..][..2], &[92.0, 93.0]);
        assert_eq!(&v[((2 + 1) * 3 + 2) * 2..][..2], &[94.0, 95.0]);
        let mut back = vec![0.0; n];
        merge_qkv(&mut back, &q, &k, &v, &s);
        assert_eq!(back, qkv);
        let mut hm = vec![0.0; 2 * 3 * 4 * 2];
        let x: Vec<f64> = (0..hm.len()).map(|i| i as f64).collect();
        tokens_to_heads(&mut hm, &x, 2, 3, 4, 2);
        let mut tok = vec![0.0; hm.len()];
        heads_to_tokens(&mut tok, &hm, 2, 3, 4, 2);
        assert_eq!(tok, x);
    }
}
