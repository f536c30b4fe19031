//! Rotary position embedding, GPT-NeoX "rotate-half", rotary dim = head size.
//!
//! As ArchScale: `θ_i = base^(−2i/hs)` and the cos/sin tables are computed in f32 and then
//! ROUNDED TO BF16 (`build_rope_cache(dtype=bfloat16)`); the rotation itself is done in `T`.

use crate::cpu::float::Real;
use half::bf16;
use rayon::prelude::*;

/// cos/sin of `t·θ_i` for positions `0..seq` and `i < head_size/2`, `[seq, head_size/2]`,
/// each value rounded to bf16 (stored as the f32 of that bf16).
#[derive(Clone, Debug, PartialEq)]
pub struct RopeTable {
    pub seq: usize,
    pub half: usize,
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
}

impl RopeTable {
    pub fn new(seq: usize, head_size: usize, base: f64) -> Self {
        assert!(head_size.is_multiple_of(2), "rope needs an even head size");
        let half = head_size / 2;
        let base = base as f32;
        let theta: Vec<f32> = (0..half)
            .map(|i| 1.0f32 / base.powf((2 * i) as f32 / head_size as f32))
            .collect();
        let (mut cos, mut sin) = (
            Vec::with_capacity(seq * half),
            Vec::with_capacity(seq * half),
        );
        for t in 0..seq {
            for &th in &theta {
                let angle = t as f32 * th;
                cos.push(bf16::from_f32(angle.cos()).to_f32());
                sin.push(bf16::from_f32(angle.sin()).to_f32());
            }
        }
        RopeTable {
            seq,
            half,
            cos,
            sin,
        }
    }
}

/// Rotates every head in place: `x` is `[rows, seq, head_size]` (head-major, `rows = B·heads`),
/// position = index along `seq`. For `i < hs/2`: `x'_i = x_i·cos − x_{i+hs/2}·sin`,
/// `x'_{i+hs/2} = x_{i+hs/2}·cos + x_i·sin`.
pub fn rope_forward<T: Real>(x: &mut [T], table: &RopeTable, seq: usize, head_size: usize) {
    rotate(x, table, seq, head_size, false);
}

/// Backward of [`rope_forward`], in place on the gradient: the same rotation with `−sin`.
/// (Here "accumulate" does not apply: the op maps `dx'` to `dx` in place.)
pub fn rope_backward<T: Real>(dx: &mut [T], table: &RopeTable, seq: usize, head_size: usize) {
    rotate(dx, table, seq, head_size, true);
}

fn rotate<T: Real>(x: &mut [T], table: &RopeTable, seq: usize, head_size: usize, inverse: bool) {
    let half = head_size / 2;
    assert_eq!(table.half, half);
    assert!(
        table.seq >= seq,
        "rope table for {} positions used for {seq}",
        table.seq
    );
    assert_eq!(x.len() % (seq * head_size), 0);
    x.par_chunks_mut(seq * head_size).for_each(|head| {
        for (t, v) in head.chunks_mut(head_size).enumerate() {
            let cos = &table.cos[t * half..(t + 1) * half];
            let sin = &table.sin[t * half..(t + 1) * half];
            let (lo, hi) = v.split_at_mut(half);
            for i in 0..half {
                let (c, mut s) = (T::from_f32(cos[i]), T::from_f32(sin[i]));
                if inverse {
                    s = -s;
                }
                let (a, b) = (lo[i], hi[i]);
                lo[i] = a * c - b * s;
                hi[i] = b * c + a * s;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::gradcheck::*;

    fn check(&(rows, seq, hs): &(usize, usize, usize)) -> f64 {
        let mut rng = rng(10);
        let table = RopeTable::new(seq + 3, hs, 10000.0);
        check_op(
            &mut rng.clone(),
            vec![("x", randn(&mut rng, rows * seq * hs, 1.0))],
            |p| {
                let mut y = p[0].clone();
                rope_forward(&mut y, &table, seq, hs);
                y
            },
            |_p, dy, g| {
                let mut d = dy.to_vec();
                rope_backward(&mut d, &table, seq, hs);
                for (a, b) in g[0].iter_mut().zip(&d) {
                    *a += b;
                }
            },
        )
    }
    gradcheck_shapes!(rope_grad, check, [(1, 1, 2), (3, 5, 4), (2, 9, 8)]);

    #[test]
    fn tables_are_bf16_rounded() {
        let t = RopeTable::new(64, 16, 10000.0);
        for &v in t.cos.iter().chain(&t.sin) {
            assert_eq!(bf16::from_f32(v).to_f32(), v);
        }
        // Position 1, i = 0: angle 1 rad.
        assert_eq!(t.cos[8], bf16::from_f32(1f32.cos()).to_f32());
        assert_eq!(
            t.sin[8 + 7],
            bf16::from_f32((10000f32.powf(-14.0 / 16.0)).sin()).to_f32()
        );
    }
}
