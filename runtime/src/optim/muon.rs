//! Muon for weight matrices (arch-spec §6.3, ArchScale mode `old_large`): EMA momentum, a
//! Nesterov-style mix, 5 Newton–Schulz steps in bf16, decoupled decay, update scaled by
//! 0.4·√max(rows, cols).

use crate::cpu::float::{gemm, Layout};
use half::bf16;

/// Quintic Newton–Schulz coefficients of ArchScale's `zeropower_via_newtonschulz5`.
const NS_COEFFS: (f32, f32, f32) = (3.4445, -4.7750, 2.0315);
pub const NS_STEPS: usize = 5;

fn round_bf16(x: &mut [f32]) {
    for v in x {
        *v = bf16::from_f32(*v).to_f32();
    }
}

/// `c = a · bᵀ` for row-major a [m, k], b [n, k] (f32 accumulate).
fn matmul_abt(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    let mut c = vec![0.0f32; m * n];
    gemm(
        m,
        k,
        n,
        1.0,
        a,
        Layout::row_major(k),
        b,
        Layout::row_major(k).t(),
        0.0,
        &mut c,
        Layout::row_major(n),
    );
    c
}

/// `c = a · b` for row-major a [m, k], b [k, n].
fn matmul_ab(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    let mut c = vec![0.0f32; m * n];
    gemm(
        m,
        k,
        n,
        1.0,
        a,
        Layout::row_major(k),
        b,
        Layout::row_major(n),
        0.0,
        &mut c,
        Layout::row_major(n),
    );
    c
}

fn transpose(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0.0f32; x.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = x[r * cols + c];
        }
    }
    t
}

/// Approximately orthogonalises `g` ([rows, cols], row-major): the result's singular values
/// lie near 1. Operands are rounded to bf16 at every step, as the bf16 reference computes.
pub fn newton_schulz(g: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let tall = rows > cols;
    let (m, n) = if tall { (cols, rows) } else { (rows, cols) };
    let mut x = if tall {
        transpose(g, rows, cols)
    } else {
        g.to_vec()
    };
    round_bf16(&mut x);
    let norm = x
        .iter()
        .map(|v| (*v as f64) * (*v as f64))
        .sum::<f64>()
        .sqrt() as f32;
    for v in x.iter_mut() {
        *v /= norm + 1e-7;
    }
    round_bf16(&mut x);
    let (a, b, c) = NS_COEFFS;
    for _ in 0..NS_STEPS {
        let mut gram = matmul_abt(&x, &x, m, n, m); // A = X Xᵀ  [m, m]
        round_bf16(&mut gram);
        let mut gram2 = matmul_ab(&gram, &gram, m, m, m); // A²
        round_bf16(&mut gram2);
        let poly: Vec<f32> = gram
            .iter()
            .zip(&gram2)
            .map(|(p, q)| b * p + c * q)
            .collect(); // B = bA + cA²
        let mut poly = poly;
        round_bf16(&mut poly);
        let bx = matmul_ab(&poly, &x, m, m, n); // B X
        for (xi, bxi) in x.iter_mut().zip(&bx) {
            *xi = a * *xi + bxi;
        }
        round_bf16(&mut x);
    }
    if tall {
        transpose(&x, m, n)
    } else {
        x
    }
}

/// One Muon update of a [rows, cols] matrix in place. `lr` includes schedule and `lr_mult`.
#[allow(clippy::too_many_arguments)]
pub fn muon_step(
    param: &mut [f32],
    grad: &[f32],
    momentum: &mut [f32],
    rows: usize,
    cols: usize,
    lr: f64,
    beta: f64,
    weight_decay: f64,
    grad_mult: f64,
) {
    let (beta, gm) = (beta as f32, grad_mult as f32);
    let mut mixed = vec![0.0f32; grad.len()];
    for i in 0..grad.len() {
        let g = grad[i] * gm;
        momentum[i] = beta * momentum[i] + (1.0 - beta) * g;
        mixed[i] = (1.0 - beta) * g + beta * momentum[i];
    }
    let ortho = newton_schulz(&mixed, rows, cols);
    let decay = (1.0 - lr * weight_decay) as f32;
    let scale = (lr * 0.4 * (rows.max(cols) as f64).sqrt()) as f32;
    for (p, o) in param.iter_mut().zip(&ortho) {
        *p = *p * decay - scale * o;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn gram_stats(rows: usize, cols: usize) -> (f32, f32, f32) {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let g: Vec<f32> = (0..rows * cols).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let x = newton_schulz(&g, rows, cols);
        let (m, n) = (rows.min(cols), rows.max(cols));
        let xs = if rows > cols {
            transpose(&x, rows, cols)
        } else {
            x
        };
        let gram = matmul_abt(&xs, &xs, m, n, m);
        let diag: Vec<f32> = (0..m).map(|i| gram[i * m + i]).collect();
        let off = (0..m)
            .flat_map(|i| (0..m).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| gram[i * m + j].abs())
            .fold(0.0f32, f32::max);
        (
            diag.iter().cloned().fold(f32::MAX, f32::min),
            diag.iter().cloned().fold(0.0, f32::max),
            off,
        )
    }

    #[test]
    fn newton_schulz_output_is_nearly_orthogonal() {
        // The quintic iteration maps singular values into roughly [0.7, 1.2] (not exactly 1):
        // rows of X are near-unit and near-orthogonal, for wide and tall inputs alike.
        for (r, c) in [(32, 96), (96, 32), (48, 48)] {
            let (dmin, dmax, off) = gram_stats(r, c);
            assert!(
                dmin > 0.4 && dmax < 1.5,
                "{r}x{c}: diag in [{dmin}, {dmax}]"
            );
            assert!(off < 0.35, "{r}x{c}: off-diagonal {off}");
        }
    }

    #[test]
    fn muon_step_applies_decay_and_scaled_update() {
        let (rows, cols) = (4, 8);
        let mut p = vec![1.0f32; rows * cols];
        let g: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7 % 5) as f32) - 2.0)
            .collect();
        let mut mom = vec![0.0f32; rows * cols];
        muon_step(&mut p, &g, &mut mom, rows, cols, 0.0, 0.95, 0.1, 1.0);
        assert!(
            p.iter().all(|v| *v == 1.0),
            "lr 0 leaves the weights unchanged"
        );
        assert!(mom.iter().zip(&g).all(|(m, g)| (m - 0.05 * g).abs() < 1e-6));
    }
}
