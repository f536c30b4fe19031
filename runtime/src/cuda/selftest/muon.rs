//! Muon (`archscale_kernels::muon`) against the CPU `muon_step` / `newton_schulz`: one step
//! per shape (square, tall, wide, odd sizes), and the singular values of the Newton–Schulz
//! output, which the quintic iteration drives into a band around 1, not to 1.

use super::{push, rel_err, Check, Env, R};
use crate::optim::muon::{muon_step, newton_schulz};
use archscale_kernels::muon::{MuonOps, MuonScratch, MuonStep};

/// Band the singular values of the Newton–Schulz output must lie in (the quintic with
/// ArchScale's coefficients oscillates within about [0.7, 1.2] once converged).
const SIGMA_BAND: (f64, f64) = (0.5, 1.5);

fn pad8(x: usize) -> usize {
    x.div_ceil(8) * 8
}

/// Extreme eigenvalues of the symmetric PSD matrix `a` [m, m] by power iteration (on `a`,
/// then on `λmax·I − a`).
fn extreme_eigenvalues(a: &[f64], m: usize) -> (f64, f64) {
    let matvec = |shift: f64, sign: f64, v: &[f64]| -> Vec<f64> {
        (0..m)
            .map(|i| shift * v[i] + sign * (0..m).map(|j| a[i * m + j] * v[j]).sum::<f64>())
            .collect()
    };
    let power = |shift: f64, sign: f64| -> f64 {
        let mut v: Vec<f64> = (0..m).map(|i| 1.0 + (i % 7) as f64 * 0.1).collect();
        let mut lambda = 0.0;
        for _ in 0..2000 {
            let w = matvec(shift, sign, &v);
            let norm = w.iter().map(|x| x * x).sum::<f64>().sqrt();
            lambda = v.iter().zip(&w).map(|(a, b)| a * b).sum::<f64>()
                / v.iter().map(|x| x * x).sum::<f64>();
            if norm == 0.0 {
                break;
            }
            v = w.into_iter().map(|x| x / norm).collect();
        }
        lambda
    };
    let max = power(0.0, 1.0);
    let shift = 1.01 * max;
    let min = shift - power(shift, -1.0);
    (min, max)
}

/// Singular values (min, max) of the row-major `[rows, cols]` matrix `x`.
fn singular_range(x: &[f64], rows: usize, cols: usize) -> (f64, f64) {
    let (m, wide) = (rows.min(cols), rows <= cols);
    let at = |i: usize, k: usize| {
        if wide {
            x[i * cols + k]
        } else {
            x[k * cols + i]
        }
    };
    let k_len = rows.max(cols);
    let mut gram = vec![0.0f64; m * m];
    for i in 0..m {
        for j in 0..m {
            gram[i * m + j] = (0..k_len).map(|k| at(i, k) * at(j, k)).sum();
        }
    }
    let (lo, hi) = extreme_eigenvalues(&gram, m);
    (lo.max(0.0).sqrt(), hi.max(0.0).sqrt())
}

pub(super) fn muon_checks(env: &mut Env, out: &mut Vec<Check>) -> R<()> {
    let shapes = [
        (64usize, 64usize),
        (192, 64),
        (64, 192),
        (37, 77),
        (101, 35),
        (384, 1024),
    ];
    let muon = MuonOps::new(env.gpu.clone())?;
    let scratch = MuonScratch::new(&env.gpu, &shapes)?;
    for (case, &(rows, cols)) in shapes.iter().enumerate() {
        let n = rows * cols;
        let shape = format!("{rows}x{cols}");
        let st = MuonStep {
            rows,
            cols,
            lr: 0.02,
            beta: 0.95,
            weight_decay: 0.1,
            grad_mult: 0.7,
        };
        let p0 = env.randn(n, 0.02);
        let g0 = env.randn(n, 1e-2);
        let m0 = env.randn(n, 5e-3);
        let f32s = |v: &[f64]| -> Vec<f32> { v.iter().map(|&x| x as f32).collect() };
        let (mut p_ref, g_ref, mut m_ref) = (f32s(&p0), f32s(&g0), f32s(&m0));
        // the CPU's Newton–Schulz input, from the momentum before the step
        let (beta, gm) = (st.beta as f32, st.grad_mult as f32);
        let mixed: Vec<f32> = (0..n)
            .map(|i| {
                let g = g_ref[i] * gm;
                let m = beta * m_ref[i] + (1.0 - beta) * g;
                (1.0 - beta) * g + beta * m
            })
            .collect();
        let o_ref: Vec<f64> = newton_schulz(&mixed, rows, cols)
            .into_iter()
            .map(|x| x as f64)
            .collect();
        muon_step(
            &mut p_ref,
            &g_ref,
            &mut m_ref,
            rows,
            cols,
            st.lr,
            st.beta,
            st.weight_decay,
            st.grad_mult,
        );

        let (pp, gp, mp) = (env.f32_buf(&p0)?, env.f32_buf(&g0)?, env.f32_buf(&m0)?);
        let pb = env.poisoned(n * 2)?;
        muon.momentum_and_normalize(&scratch, gp, mp, &st)?;
        let o = muon.newton_schulz(&env.lt, &scratch, rows, cols)?;
        let cp = pad8(cols);
        let o_pad = env.read_bf16(o, pad8(rows) * cp)?;
        let o_gpu: Vec<f64> = (0..n).map(|k| o_pad[(k / cols) * cp + k % cols]).collect();
        muon.apply(pp, gp, pb, o, &st)?;

        let mw: Vec<f64> = m_ref.iter().map(|&x| x as f64).collect();
        push(
            out,
            "muon momentum",
            shape.clone(),
            rel_err(&env.read_f32(mp, n)?, &mw),
            1e-6,
        );
        push(
            out,
            "muon newton-schulz output",
            shape.clone(),
            rel_err(&o_gpu, &o_ref),
            5e-2,
        );
        // the step itself: p − p0, against the CPU's
        let p_gpu = env.read_f32(pp, n)?;
        let d_gpu: Vec<f64> = p_gpu.iter().zip(&p0).map(|(a, b)| a - b).collect();
        let d_ref: Vec<f64> = p_ref.iter().zip(&p0).map(|(&a, b)| a as f64 - b).collect();
        push(
            out,
            "muon update p−p0",
            shape.clone(),
            rel_err(&d_gpu, &d_ref),
            5e-2,
        );
        push(
            out,
            "muon bf16 shadow",
            shape.clone(),
            rel_err(&env.read_bf16(pb, n)?, &p_gpu),
            super::TOL_BF16,
        );
        push(
            out,
            "muon zeroes grads",
            shape.clone(),
            env.read_f32(gp, n)?.iter().map(|x| x.abs()).sum::<f64>(),
            0.0,
        );
        // The ZeRO form (backend/muon.rs) from the same inputs: three ranks' parts, cut at odd
        // places; momentum and mix per part, mix gathered (here: one buffer), Newton–Schulz
        // on the whole, update per part. Even cases write the mix over the gradient (ZeRO-1),
        // odd ones into a separate buffer (ZeRO-3's gradient slot). Must equal the step above.
        let (pz, gz, mz) = (env.f32_buf(&p0)?, env.f32_buf(&g0)?, env.f32_buf(&m0)?);
        let over_grads = case % 2 == 0;
        let mix = if over_grads { gz } else { env.poisoned(n * 4)? };
        let cuts = [0, n / 3 + 1, (2 * n) / 3 - 5, n];
        let at = |base: u64, k: usize| base + (k * 4) as u64;
        for w in cuts.windows(2) {
            muon.momentum_part(at(gz, w[0]), at(mz, w[0]), at(mix, w[0]), w[1] - w[0], &st)?;
        }
        muon.pack_and_normalize(&scratch, mix, &st)?;
        let oz = muon.newton_schulz(&env.lt, &scratch, rows, cols)?;
        for w in cuts.windows(2) {
            muon.apply_part(at(pz, w[0]), at(gz, w[0]), 0, oz, w[0], w[1] - w[0], &st)?;
        }
        let form = if case % 2 == 0 {
            "mix over grads"
        } else {
            "mix apart"
        };
        push(
            out,
            "muon ZeRO parts vs whole: momentum",
            format!("{shape} {form}"),
            rel_err(&env.read_f32(mz, n)?, &env.read_f32(mp, n)?),
            0.0,
        );
        push(
            out,
            "muon ZeRO parts vs whole: params",
            format!("{shape} {form}"),
            rel_err(&env.read_f32(pz, n)?, &p_gpu),
            1e-6,
        );
        push(
            out,
            "muon ZeRO parts zero grads",
            format!("{shape} {form}"),
            env.read_f32(gz, n)?.iter().map(|x| x.abs()).sum::<f64>(),
            0.0,
        );
        // Orthogonality where the reference is well conditioned (aspect ratio ≥ 2.5, so
        // a Gaussian input's smallest singular value is not near 0).
        let aspect = rows.max(cols) as f64 / rows.min(cols) as f64;
        if aspect >= 2.5 && rows.min(cols) <= 128 {
            let (lo, hi) = singular_range(&o_gpu, rows, cols);
            let outside = (SIGMA_BAND.0 - lo).max(hi - SIGMA_BAND.1).max(0.0);
            push(
                out,
                "muon NS singular values outside [0.5, 1.5]",
                format!("{shape} σ∈[{lo:.3}, {hi:.3}]"),
                outside,
                0.0,
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn singular_range_of_a_scaled_orthogonal_matrix() {
        // rows of a 2x4 matrix with singular values 2 and 0.5
        let x = [2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5, 0.0];
        let (lo, hi) = singular_range(&x, 2, 4);
        assert!(
            (lo - 0.5).abs() < 1e-6 && (hi - 2.0).abs() < 1e-6,
            "{lo} {hi}"
        );
        // the same transposed (tall)
        let t = [2.0, 0.0, 0.0, 0.0, 0.0, 0.5, 0.0, 0.0];
        let (lo, hi) = singular_range(&t, 4, 2);
        assert!(
            (lo - 0.5).abs() < 1e-6 && (hi - 2.0).abs() < 1e-6,
            "{lo} {hi}"
        );
    }

    #[test]
    fn cpu_newton_schulz_lands_in_the_band_the_gpu_check_uses() {
        let (rows, cols) = (24, 72);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let g: Vec<f32> = (0..rows * cols).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let o: Vec<f64> = newton_schulz(&g, rows, cols)
            .into_iter()
            .map(|x| x as f64)
            .collect();
        let (lo, hi) = singular_range(&o, rows, cols);
        assert!(lo > SIGMA_BAND.0 && hi < SIGMA_BAND.1, "σ in [{lo}, {hi}]");
    }
}
