//! Causal depthwise 1-D convolution (Mamba's `conv1d`, `causal_conv1d_fn` without the
//! activation): `y[b,t,c] = bias[c] + Σ_{j<K} w[c,j]·x[b, t−K+1+j, c]`, taps before the
//! row start (or, in varlen, before the document start) read zero.

use crate::cpu::float::Real;
use rayon::prelude::*;

/// Channels per parallel block in the weight-gradient pass.
const CHANNEL_BLOCK: usize = 32;

/// `x`, `y`: `[batch, seq, channels]`; `weight`: `[channels, k]` (PyTorch `[C, 1, K]`), tap
/// `K−1` is the current token; `bias`: `[channels]`. `seg_start`: optional `[batch, seq]`
/// document starts ([`super::mask::segment_starts`]).
#[allow(clippy::too_many_arguments)]
pub fn causal_conv1d_forward<T: Real>(
    y: &mut [T],
    x: &[T],
    weight: &[T],
    bias: &[T],
    seq: usize,
    channels: usize,
    k: usize,
    seg_start: Option<&[u32]>,
) {
    assert_eq!(x.len(), y.len());
    assert_eq!(weight.len(), channels * k);
    y.par_chunks_mut(seq * channels)
        .zip(x.par_chunks(seq * channels))
        .enumerate()
        .for_each(|(b, (yb, xb))| {
            for t in 0..seq {
                let lo = first_tap(seg_start, b, seq, t, k);
                let out = &mut yb[t * channels..(t + 1) * channels];
                out.copy_from_slice(bias);
                for j in lo..k {
                    let src = &xb[(t + j + 1 - k) * channels..(t + j + 2 - k) * channels];
                    for c in 0..channels {
                        out[c] += weight[c * k + j] * src[c];
                    }
                }
            }
        });
}

/// Accumulates `dx`, `dweight` and `dbias` for [`causal_conv1d_forward`].
#[allow(clippy::too_many_arguments)]
pub fn causal_conv1d_backward<T: Real>(
    dx: &mut [T],
    dweight: &mut [T],
    dbias: &mut [T],
    dy: &[T],
    x: &[T],
    weight: &[T],
    seq: usize,
    channels: usize,
    k: usize,
    seg_start: Option<&[u32]>,
) {
    assert_eq!(dx.len(), x.len());
    assert_eq!(dy.len(), x.len());
    let batch = x.len() / (seq * channels).max(1);
    dx.par_chunks_mut(seq * channels)
        .zip(dy.par_chunks(seq * channels))
        .enumerate()
        .for_each(|(b, (dxb, dyb))| {
            for t in 0..seq {
                let lo = first_tap(seg_start, b, seq, t, k);
                let g = &dyb[t * channels..(t + 1) * channels];
                for j in lo..k {
                    let dst = &mut dxb[(t + j + 1 - k) * channels..(t + j + 2 - k) * channels];
                    for c in 0..channels {
                        dst[c] += weight[c * k + j] * g[c];
                    }
                }
            }
        });
    dweight
        .par_chunks_mut(CHANNEL_BLOCK * k)
        .zip(dbias.par_chunks_mut(CHANNEL_BLOCK))
        .enumerate()
        .for_each(|(blk, (dw, db))| {
            let c0 = blk * CHANNEL_BLOCK;
            let nc = db.len();
            for b in 0..batch {
                let (xb, dyb) = (&x[b * seq * channels..], &dy[b * seq * channels..]);
                for t in 0..seq {
                    let lo = first_tap(seg_start, b, seq, t, k);
                    let g = &dyb[t * channels + c0..t * channels + c0 + nc];
                    for (d, &gv) in db.iter_mut().zip(g) {
                        *d += gv;
                    }
                    for j in lo..k {
                        let src = &xb[(t + j + 1 - k) * channels + c0..];
                        for c in 0..nc {
                            dw[c * k + j] += g[c] * src[c];
                        }
                    }
                }
            }
        });
}

/// First tap `j` whose source position `t−K+1+j` is inside the row and the document.
#[inline]
fn first_tap(seg_start: Option<&[u32]>, b: usize, seq: usize, t: usize, k: usize) -> usize {
    let start = seg_start.map_or(0, |s| s[b * seq + t] as usize);
    // Source position t+1+j-k >= start  <=>  j >= start + k - 1 - t.
    (start + k).saturating_sub(t + 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::gradcheck::*;
    use crate::cpu::ops::mask::segment_starts;

    fn check(&(batch, seq, ch, k, varlen): &(usize, usize, usize, usize, bool)) -> f64 {
        let mut rng = rng(11);
        let tokens: Vec<u32> = (0..batch * seq)
            .map(|i| if i % 5 == 2 { 2 } else { 7 })
            .collect();
        let mut seg = vec![0u32; batch * seq];
        segment_starts(&tokens, seq, 2, &mut seg);
        let seg = varlen.then_some(seg);
        let inputs = vec![
            ("x", randn(&mut rng, batch * seq * ch, 1.0)),
            ("w", randn(&mut rng, ch * k, 1.0)),
            ("b", randn(&mut rng, ch, 1.0)),
        ];
        check_op(
            &mut rng,
            inputs,
            |p| {
                let mut y = vec![0.0; batch * seq * ch];
                causal_conv1d_forward(&mut y, &p[0], &p[1], &p[2], seq, ch, k, seg.as_deref());
                y
            },
            |p, dy, g| {
                let [dx, dw, db] = g else { unreachable!() };
                causal_conv1d_backward(dx, dw, db, dy, &p[0], &p[1], seq, ch, k, seg.as_deref());
            },
        )
    }
    gradcheck_shapes!(
        conv1d_grad,
        check,
        [
            (1, 1, 1, 4, false),
            (2, 7, 3, 4, false),
            (2, 9, 5, 4, true),
            (1, 3, 40, 4, false),
            (3, 6, 2, 2, true)
        ]
    );

    #[test]
    fn varlen_taps_stop_at_document_start() {
        // One channel, weight [1,1,1,1]: y = sum of visible inputs.
        let x = [1.0f64, 2.0, 3.0, 4.0, 5.0];
        let mut seg = [0u32; 5];
        segment_starts(&[9, 2, 9, 9, 9], 5, 2, &mut seg);
        let mut y = [0.0; 5];
        causal_conv1d_forward(&mut y, &x, &[1.0; 4], &[0.0], 5, 1, 4, Some(&seg));
        assert_eq!(y, [1.0, 3.0, 3.0, 7.0, 12.0]);
    }
}
