//! Linear layer `y = x Wᵀ + b` with W stored `[out, in]` as PyTorch.

use crate::cpu::float::{gemm, Layout, Real};
use rayon::prelude::*;

/// `y[rows, d_out] = x[rows, d_in] · wᵀ + b`, `w` is `[d_out, d_in]`, `b` is `[d_out]`.
pub fn linear_forward<T: Real>(
    y: &mut [T],
    x: &[T],
    w: &[T],
    b: Option<&[T]>,
    rows: usize,
    d_in: usize,
    d_out: usize,
) {
    assert_eq!(y.len(), rows * d_out);
    assert_eq!(x.len(), rows * d_in);
    assert_eq!(w.len(), d_out * d_in);
    let beta = match b {
        Some(b) => {
            assert_eq!(b.len(), d_out);
            y.par_chunks_mut(d_out.max(1))
                .for_each(|row| row.copy_from_slice(b));
            T::ONE
        }
        None => T::ZERO,
    };
    gemm(
        rows,
        d_in,
        d_out,
        T::ONE,
        x,
        Layout::row_major(d_in),
        w,
        Layout::row_major(d_in).t(),
        beta,
        y,
        Layout::row_major(d_out),
    );
}

/// Accumulates `dx += dy · w`, `dw += dyᵀ · x`, `db += Σ_rows dy`.
#[allow(clippy::too_many_arguments)]
pub fn linear_backward<T: Real>(
    dx: Option<&mut [T]>,
    dw: &mut [T],
    db: Option<&mut [T]>,
    dy: &[T],
    x: &[T],
    w: &[T],
    rows: usize,
    d_in: usize,
    d_out: usize,
) {
    assert_eq!(dy.len(), rows * d_out);
    if let Some(dx) = dx {
        gemm(
            rows,
            d_out,
            d_in,
            T::ONE,
            dy,
            Layout::row_major(d_out),
            w,
            Layout::row_major(d_in),
            T::ONE,
            dx,
            Layout::row_major(d_in),
        );
    }
    gemm(
        d_out,
        rows,
        d_in,
        T::ONE,
        dy,
        Layout::row_major(d_out).t(),
        x,
        Layout::row_major(d_in),
        T::ONE,
        dw,
        Layout::row_major(d_in),
    );
    if let Some(db) = db {
        super::reduce_row_blocks(rows, d_out, db, |range, part| {
            for r in range {
                for (p, g) in part.iter_mut().zip(&dy[r * d_out..(r + 1) * d_out]) {
                    *p += *g;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::gradcheck::*;

    fn check(&(rows, d_in, d_out, bias): &(usize, usize, usize, bool)) -> f64 {
        let mut rng = rng(2);
        let mut inputs = vec![
            ("x", randn(&mut rng, rows * d_in, 1.0)),
            ("w", randn(&mut rng, d_out * d_in, 1.0)),
        ];
        if bias {
            inputs.push(("b", randn(&mut rng, d_out, 1.0)));
        }
        check_op(
            &mut rng,
            inputs,
            |p| {
                let mut y = vec![0.0; rows * d_out];
                linear_forward(
                    &mut y,
                    &p[0],
                    &p[1],
                    p.get(2).map(|b| b.as_slice()),
                    rows,
                    d_in,
                    d_out,
                );
                y
            },
            |p, dy, g| {
                let (gx, rest) = g.split_at_mut(1);
                let (gw, gb) = rest.split_at_mut(1);
                linear_backward(
                    Some(&mut gx[0]),
                    &mut gw[0],
                    gb.first_mut().map(|b| b.as_mut_slice()),
                    dy,
                    &p[0],
                    &p[1],
                    rows,
                    d_in,
                    d_out,
                );
            },
        )
    }
    gradcheck_shapes!(
        linear_grad,
        check,
        [
            (1, 1, 1, true),
            (5, 3, 7, true),
            (9, 8, 2, false),
            (33, 5, 6, true)
        ]
    );
}
