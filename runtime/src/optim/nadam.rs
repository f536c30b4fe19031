//! NAdam as torch's `NAdam(decoupled_weight_decay=True, momentum_decay=4e-3)`, used for the
//! weight matrices of ArchScale's `hadam` runs.

/// Hyperparameters of one update; `lr` already includes the schedule and `lr_mult`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NAdamHyper {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// 1-based step count after this update.
    pub step: u64,
}

const MOMENTUM_DECAY: f64 = 4e-3;

/// μ_t of NAdam's momentum schedule.
fn mu(beta1: f64, t: u64) -> f64 {
    beta1 * (1.0 - 0.5 * 0.96f64.powf(t as f64 * MOMENTUM_DECAY))
}

/// One NAdam update in place. `mu_product` is the running product of μ_t (starts at 1.0),
/// shared by every tensor stepped together; the caller keeps it per parameter.
pub fn nadam_step(
    param: &mut [f32],
    grad: &[f32],
    exp_avg: &mut [f32],
    exp_avg_sq: &mut [f32],
    mu_product: &mut f64,
    h: NAdamHyper,
    grad_mult: f64,
) {
    let mu_t = mu(h.beta1, h.step);
    let mu_next = mu(h.beta1, h.step + 1);
    *mu_product *= mu_t;
    let bias2 = 1.0 - h.beta2.powi(h.step as i32);
    let c_grad = (h.lr * (1.0 - mu_t) / (1.0 - *mu_product)) as f32;
    let c_avg = (h.lr * mu_next / (1.0 - *mu_product * mu_next)) as f32;
    let decay = (1.0 - h.lr * h.weight_decay) as f32;
    let (b1, b2, eps, gm, bias2) = (
        h.beta1 as f32,
        h.beta2 as f32,
        h.eps as f32,
        grad_mult as f32,
        bias2 as f32,
    );
    for i in 0..param.len() {
        let g = grad[i] * gm;
        let m = b1 * exp_avg[i] + (1.0 - b1) * g;
        let v = b2 * exp_avg_sq[i] + (1.0 - b2) * g * g;
        exp_avg[i] = m;
        exp_avg_sq[i] = v;
        let denom = (v / bias2).sqrt() + eps;
        param[i] = param[i] * decay - c_grad * g / denom - c_avg * m / denom;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_step_matches_the_closed_form() {
        // One step from zero state: m = (1-b1) g, v = (1-b2) g², v/bias2 = g².
        let h = NAdamHyper {
            lr: 0.01,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-10,
            weight_decay: 0.1,
            step: 1,
        };
        let (mut p, mut m, mut v, mut mp) = (vec![2.0f32], vec![0.0f32], vec![0.0f32], 1.0f64);
        nadam_step(&mut p, &[0.5], &mut m, &mut v, &mut mp, h, 1.0);
        let (mu1, mu2) = (mu(0.9, 1), mu(0.9, 2));
        let denom = 0.5 + 1e-10;
        let want = 2.0 * (1.0 - 0.001)
            - 0.01 * (1.0 - mu1) / (1.0 - mu1) * 0.5 / denom
            - 0.01 * mu2 / (1.0 - mu1 * mu2) * (0.1 * 0.5) / denom;
        assert!((p[0] as f64 - want).abs() < 1e-6, "{} vs {want}", p[0]);
        assert!((mp - mu1).abs() < 1e-15);
    }
}
