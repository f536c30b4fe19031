//! Parameter initialisation from the Plan's [`InitRule`]s.
//!
//! Tensor `i` of `plan.params` draws from its own ChaCha20 stream: key from the run seed,
//! stream number `i`. The result depends on neither the order of initialisation nor the
//! thread count. (ArchScale draws from torch's generator; the distributions match, the
//! individual numbers cannot.)

use super::float::Real;
use archscale_compiler::{InitRule, ParamSpec};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use rand_distr::{Distribution, StandardNormal};
use rayon::prelude::*;

/// Initialises every tensor of `specs` per its rule.
pub fn init_params<T: Real>(specs: &[ParamSpec], seed: u64) -> Vec<Vec<T>> {
    specs
        .par_iter()
        .enumerate()
        .map(|(i, spec)| init_tensor(spec, seed, i as u64))
        .collect()
}

/// One tensor, drawn from stream `index` of the run seed.
pub fn init_tensor<T: Real>(spec: &ParamSpec, seed: u64, index: u64) -> Vec<T> {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    rng.set_stream(index);
    let n = spec.numel();
    let values: Vec<f64> = match spec.init {
        InitRule::Normal { std } => (0..n)
            .map(|_| std * Distribution::<f64>::sample(&StandardNormal, &mut rng))
            .collect(),
        InitRule::Uniform { bound } => (0..n)
            .map(|_| bound * (2.0 * rng.gen::<f64>() - 1.0))
            .collect(),
        InitRule::Zeros => vec![0.0; n],
        InitRule::Ones => vec![1.0; n],
        InitRule::MambaALog => {
            // [d_inner, d_state]: A_log[c, k] = ln(k + 1).
            let d_state = spec.shape.last().copied().unwrap_or(1).max(1);
            (0..n).map(|i| ((i % d_state) as f64 + 1.0).ln()).collect()
        }
        InitRule::MambaDtBias {
            dt_min,
            dt_max,
            dt_floor,
        } => (0..n)
            .map(|_| {
                let u: f64 = rng.gen();
                let dt = (u * (dt_max.ln() - dt_min.ln()) + dt_min.ln())
                    .exp()
                    .max(dt_floor);
                // softplus⁻¹(dt) = dt + ln(−expm1(−dt)).
                dt + (-(-dt).exp_m1()).ln()
            })
            .collect(),
        InitRule::LogUniform { low, high } => (0..n)
            .map(|_| {
                // U(low, high] so that low = 0 never gives ln 0.
                let u: f64 = rng.gen();
                (low + (high - low) * (1.0 - u)).ln()
            })
            .collect(),
    };
    values.into_iter().map(T::from_f64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(shape: Vec<usize>, init: InitRule) -> ParamSpec {
        ParamSpec {
            name: "p".into(),
            aliases: vec![],
            shape,
            init,
            group: 0,
            layer: None,
        }
    }

    #[test]
    fn rules_have_their_distribution() {
        let normal: Vec<f64> = init_tensor(
            &spec(vec![200, 100], InitRule::Normal { std: 0.02 }),
            3407,
            0,
        );
        let mean = normal.iter().sum::<f64>() / 2e4;
        let std = (normal.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 2e4).sqrt();
        assert!(
            mean.abs() < 1e-3 && (std - 0.02).abs() < 5e-4,
            "mean {mean} std {std}"
        );
        let uni: Vec<f64> = init_tensor(
            &spec(vec![10000], InitRule::Uniform { bound: 0.5 }),
            3407,
            1,
        );
        assert!(uni.iter().all(|v| v.abs() <= 0.5));
        assert!(uni.iter().cloned().fold(0.0, f64::max) > 0.49);
        let a: Vec<f64> = init_tensor(&spec(vec![3, 4], InitRule::MambaALog), 1, 2);
        assert_eq!(a[4..8], [1f64.ln(), 2f64.ln(), 3f64.ln(), 4f64.ln()]);
        let dt: Vec<f64> = init_tensor(
            &spec(
                vec![1000],
                InitRule::MambaDtBias {
                    dt_min: 1e-3,
                    dt_max: 0.1,
                    dt_floor: 1e-4,
                },
            ),
            1,
            3,
        );
        for b in dt {
            let sp = b.exp().ln_1p();
            assert!(
                (1e-3 - 1e-12..=0.1 + 1e-12).contains(&sp),
                "softplus(bias) = {sp}"
            );
        }
    }

    #[test]
    fn streams_are_independent_of_order_and_seeded() {
        let specs = vec![
            spec(vec![5], InitRule::Normal { std: 1.0 }),
            spec(vec![5], InitRule::Normal { std: 1.0 }),
        ];
        let all: Vec<Vec<f32>> = init_params(&specs, 7);
        assert_eq!(all[1], init_tensor::<f32>(&specs[1], 7, 1));
        assert_ne!(all[0], all[1]);
        assert_ne!(all[0], init_params::<f32>(&specs, 8)[0]);
    }
}
