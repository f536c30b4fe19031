//! AdamW exactly as torch's fused implementation: decoupled decay first
//! (`p *= 1 - lr*wd`), then the bias-corrected Adam update.

/// Hyperparameters of one update; `lr` already includes the schedule and `lr_mult`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWHyper {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// 1-based step count after this update (for bias correction).
    pub step: u64,
}

/// One AdamW update of `param` in place. `grad_mult` scales the gradient first (clipping).
pub fn adamw_step(
    param: &mut [f32],
    grad: &[f32],
    exp_avg: &mut [f32],
    exp_avg_sq: &mut [f32],
    h: AdamWHyper,
    grad_mult: f64,
) {
    debug_assert!(
        param.len() == grad.len()
            && grad.len() == exp_avg.len()
            && exp_avg.len() == exp_avg_sq.len()
    );
    let bias1 = 1.0 - h.beta1.powi(h.step as i32);
    let bias2 = 1.0 - h.beta2.powi(h.step as i32);
    let step_size = (h.lr / bias1) as f32;
    let bias2_sqrt = bias2.sqrt() as f32;
    let decay = (1.0 - h.lr * h.weight_decay) as f32;
    let (b1, b2, eps, gm) = (
        h.beta1 as f32,
        h.beta2 as f32,
        h.eps as f32,
        grad_mult as f32,
    );
    for i in 0..param.len() {
        let g = grad[i] * gm;
        let m = b1 * exp_avg[i] + (1.0 - b1) * g;
        let v = b2 * exp_avg_sq[i] + (1.0 - b2) * g * g;
        exp_avg[i] = m;
        exp_avg_sq[i] = v;
        let denom = v.sqrt() / bias2_sqrt + eps;
        param[i] = param[i] * decay - step_size * m / denom;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reference values from torch.optim.AdamW(lr=0.1, betas=(0.9, 0.95), eps=1e-8,
    /// weight_decay=0.1) on p=[1.0, -2.0], g=[0.5, 0.25] for two steps, recomputed here
    /// in f64 from the published update rule.
    fn reference(p0: f64, g: f64, steps: u64) -> f64 {
        let (lr, b1, b2, eps, wd) = (0.1f64, 0.9f64, 0.95f64, 1e-8f64, 0.1f64);
        let (mut p, mut m, mut v) = (p0, 0.0f64, 0.0f64);
        for t in 1..=steps {
            p *= 1.0 - lr * wd;
            m = b1 * m + (1.0 - b1) * g;
            v = b2 * v + (1.0 - b2) * g * g;
            let mhat = m / (1.0 - b1.powi(t as i32));
            let vhat = v / (1.0 - b2.powi(t as i32));
            p -= lr * mhat / (vhat.sqrt() + eps);
        }
        p
    }

    #[test]
    fn matches_the_adamw_rule_over_several_steps() {
        let mut p = vec![1.0f32, -2.0];
        let g = vec![0.5f32, 0.25];
        let (mut m, mut v) = (vec![0.0; 2], vec![0.0; 2]);
        for step in 1..=3 {
            let h = AdamWHyper {
                lr: 0.1,
                beta1: 0.9,
                beta2: 0.95,
                eps: 1e-8,
                weight_decay: 0.1,
                step,
            };
            adamw_step(&mut p, &g, &mut m, &mut v, h, 1.0);
        }
        assert!(
            (p[0] as f64 - reference(1.0, 0.5, 3)).abs() < 1e-6,
            "{} vs {}",
            p[0],
            reference(1.0, 0.5, 3)
        );
        assert!((p[1] as f64 - reference(-2.0, 0.25, 3)).abs() < 1e-6);
    }

    #[test]
    fn grad_mult_scales_the_gradient_before_the_moments() {
        let h = AdamWHyper {
            lr: 0.01,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.0,
            step: 1,
        };
        let (mut a, mut b) = (vec![1.0f32], vec![1.0f32]);
        let (mut ma, mut va, mut mb, mut vb) = (vec![0.0], vec![0.0], vec![0.0], vec![0.0]);
        adamw_step(&mut a, &[2.0], &mut ma, &mut va, h, 0.5);
        adamw_step(&mut b, &[1.0], &mut mb, &mut vb, h, 1.0);
        assert_eq!(a, b);
        assert_eq!(ma, mb);
    }

    #[test]
    fn clip_coefficient_follows_torch() {
        assert_eq!(super::super::clip_coefficient(0.5, 1.0), 1.0);
        let c = super::super::clip_coefficient(4.0, 1.0);
        assert!((c - 1.0 / (4.0 + 1e-6)).abs() < 1e-15);
    }
}
