//! Finite-difference gradient checks in f64 (tests only).
//!
//! An op is checked through the scalar `L = Σ out ⊙ R` for a fixed random `R`: its backward
//! (given `dout = R`) must match central differences of `L` with respect to every input
//! element. The error of one tensor is `max |analytic − numeric| / max |numeric|`.

use rand::{Rng as _, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Largest accepted error (relative to the tensor's largest gradient).
pub const TOL: f64 = 1e-6;
/// Central-difference step.
pub const STEP: f64 = 1e-5;

pub type TestRng = ChaCha8Rng;

pub fn rng(seed: u64) -> TestRng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// `n` samples of `U(-scale, scale)·√3` (unit variance for scale 1).
pub fn randn(rng: &mut TestRng, n: usize, scale: f64) -> Vec<f64> {
    (0..n)
        .map(|_| (rng.gen::<f64>() * 2.0 - 1.0) * scale * 3f64.sqrt())
        .collect()
}

/// Error of analytic against numeric gradients of one tensor.
pub fn tensor_error(analytic: &[f64], numeric: &[f64]) -> f64 {
    let scale = numeric
        .iter()
        .fold(0.0f64, |m, v| m.max(v.abs()))
        .max(1e-12);
    analytic
        .iter()
        .zip(numeric)
        .fold(0.0f64, |m, (a, n)| m.max((a - n).abs()))
        / scale
}

/// Checks `backward` against central differences of `Σ forward(inputs) ⊙ R` for every
/// element of every input. `backward(inputs, dout, grads)` must ACCUMULATE into `grads`
/// (they start at a non-zero constant, which is subtracted afterwards). Returns the largest
/// tensor error and panics above [`TOL`].
pub fn check_op(
    rng: &mut TestRng,
    inputs: Vec<(&str, Vec<f64>)>,
    forward: impl Fn(&[Vec<f64>]) -> Vec<f64>,
    backward: impl Fn(&[Vec<f64>], &[f64], &mut [Vec<f64>]),
) -> f64 {
    let names: Vec<&str> = inputs.iter().map(|(n, _)| *n).collect();
    let mut params: Vec<Vec<f64>> = inputs.into_iter().map(|(_, v)| v).collect();
    let out = forward(&params);
    let r = randn(rng, out.len(), 1.0);
    const PREFILL: f64 = 0.25;
    let mut grads: Vec<Vec<f64>> = params.iter().map(|p| vec![PREFILL; p.len()]).collect();
    backward(&params, &r, &mut grads);
    let loss = |p: &[Vec<f64>]| forward(p).iter().zip(&r).map(|(a, b)| a * b).sum::<f64>();
    let mut worst = 0.0f64;
    for t in 0..params.len() {
        let mut numeric = vec![0.0; params[t].len()];
        for i in 0..params[t].len() {
            let orig = params[t][i];
            params[t][i] = orig + STEP;
            let lp = loss(&params);
            params[t][i] = orig - STEP;
            let lm = loss(&params);
            params[t][i] = orig;
            numeric[i] = (lp - lm) / (2.0 * STEP);
        }
        let analytic: Vec<f64> = grads[t].iter().map(|g| g - PREFILL).collect();
        let err = tensor_error(&analytic, &numeric);
        assert!(
            err < TOL,
            "gradient of `{}` off by {err:.3e}\nanalytic {analytic:?}\nnumeric  {numeric:?}",
            names[t]
        );
        worst = worst.max(err);
    }
    worst
}

/// `gradcheck_shapes!(test_name, check_fn, [shape, ...])`: one test running `check_fn(&shape)`
/// (which asserts and returns its worst error) over every shape, printing the errors.
macro_rules! gradcheck_shapes {
    ($name:ident, $check:ident, [$($shape:expr),+ $(,)?]) => {
        #[test]
        fn $name() {
            let mut worst = 0.0f64;
            for shape in [$($shape),+].iter() {
                let err = $check(shape);
                eprintln!("{} {:?}: max rel err {:.2e}", stringify!($name), shape, err);
                worst = worst.max(err);
            }
            eprintln!("GRADCHECK {} worst {:.3e}", stringify!($name), worst);
        }
    };
}
pub(crate) use gradcheck_shapes;
