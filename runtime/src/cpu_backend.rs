//! The CPU reference backend: `CpuModel` (forward/backward in f32) plus the CPU optimizers,
//! with parameters, gradients and optimizer state held in plan order.

use crate::cpu::model::CpuModel;
use crate::optim::{adamw_step, muon_step, nadam_step, AdamWHyper, NAdamHyper};
use crate::{Backend, OptimizerState, Result, RuntimeError};
use archscale_compiler::{OptimizerKind, Plan};
use rayon::prelude::*;

/// Per-parameter optimizer state; which buffers exist depends on the group's optimizer.
#[derive(Clone, Debug)]
struct ParamState {
    exp_avg: Vec<f32>,
    exp_avg_sq: Vec<f32>,
    /// NAdam's running product of μ_t.
    mu_product: f64,
}

pub struct CpuBackend {
    plan: Plan,
    model: CpuModel,
    params: Vec<Vec<f32>>,
    grads: Vec<Vec<f32>>,
    state: Vec<ParamState>,
    step: u64,
}

impl CpuBackend {
    /// Builds the model and initialises parameters from the plan's init rules and seed.
    pub fn new(plan: &Plan) -> Result<Self> {
        let model = CpuModel::new(plan)?;
        let params = model.init_params();
        let grads = params.iter().map(|p| vec![0.0; p.len()]).collect();
        let state = plan
            .params
            .iter()
            .map(|p| {
                let n = p.numel();
                let kind = plan.optimizer.groups[p.group].optimizer;
                let second = if kind == OptimizerKind::Muon { 0 } else { n };
                ParamState {
                    exp_avg: vec![0.0; n],
                    exp_avg_sq: vec![0.0; second],
                    mu_product: 1.0,
                }
            })
            .collect();
        Ok(Self {
            plan: plan.clone(),
            model,
            params,
            grads,
            state,
            step: 0,
        })
    }
}

fn state_names(name: &str, kind: OptimizerKind) -> (String, Option<String>) {
    match kind {
        OptimizerKind::Muon => (format!("{name}.momentum_buffer"), None),
        _ => (
            format!("{name}.exp_avg"),
            Some(format!("{name}.exp_avg_sq")),
        ),
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> String {
        "cpu".into()
    }

    fn forward_backward(&mut self, rows: &[u32], micro: usize, grad_scale: f32) -> Result<f64> {
        self.model.forward_backward(
            &self.params,
            &mut self.grads,
            rows,
            micro,
            grad_scale,
            self.plan.training.label_smoothing,
        )
    }

    fn grad_norm(&mut self) -> Result<f64> {
        let sum: f64 = self
            .grads
            .par_iter()
            .map(|g| g.iter().map(|v| (*v as f64) * (*v as f64)).sum::<f64>())
            .sum();
        Ok(sum.sqrt())
    }

    fn optimizer_step(&mut self, group_lrs: &[f64], grad_mult: f64) -> Result<()> {
        let groups = &self.plan.optimizer.groups;
        if group_lrs.len() != groups.len() {
            return Err(RuntimeError::Message(format!(
                "{} learning rates for {} optimizer groups",
                group_lrs.len(),
                groups.len()
            )));
        }
        self.step += 1;
        let step = self.step;
        let specs = &self.plan.params;
        self.params
            .par_iter_mut()
            .zip(self.grads.par_iter_mut())
            .zip(self.state.par_iter_mut())
            .enumerate()
            .for_each(|(i, ((p, g), s))| {
                let spec = &specs[i];
                let group = &groups[spec.group];
                let lr = group_lrs[spec.group];
                match group.optimizer {
                    OptimizerKind::AdamW => {
                        let h = AdamWHyper {
                            lr,
                            beta1: group.beta1,
                            beta2: group.beta2,
                            eps: group.eps,
                            weight_decay: group.weight_decay,
                            step,
                        };
                        adamw_step(p, g, &mut s.exp_avg, &mut s.exp_avg_sq, h, grad_mult);
                    }
                    OptimizerKind::NAdam => {
                        let h = NAdamHyper {
                            lr,
                            beta1: group.beta1,
                            beta2: group.beta2,
                            eps: group.eps,
                            weight_decay: group.weight_decay,
                            step,
                        };
                        nadam_step(
                            p,
                            g,
                            &mut s.exp_avg,
                            &mut s.exp_avg_sq,
                            &mut s.mu_product,
                            h,
                            grad_mult,
                        );
                    }
                    OptimizerKind::Muon => {
                        let (rows, cols) = (spec.shape[0], spec.numel() / spec.shape[0].max(1));
                        let beta = group.muon_beta.unwrap_or(0.95);
                        muon_step(
                            p,
                            g,
                            &mut s.exp_avg,
                            rows,
                            cols,
                            lr,
                            beta,
                            group.weight_decay,
                            grad_mult,
                        );
                    }
                }
                g.iter_mut().for_each(|v| *v = 0.0);
            });
        Ok(())
    }

    fn eval_loss(
        &mut self,
        tokens: &[u32],
        rows: usize,
        row_len: usize,
        prefixes: &[usize],
    ) -> Result<Vec<f64>> {
        self.model
            .forward_loss(&self.params, tokens, rows, row_len, prefixes)
    }

    fn last_logits(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        self.model.last_logits(&self.params, tokens)
    }

    fn read_params(&mut self) -> Result<Vec<Vec<f32>>> {
        Ok(self.params.clone())
    }

    fn write_params(&mut self, params: &[Vec<f32>]) -> Result<()> {
        if params.len() != self.params.len()
            || params
                .iter()
                .zip(&self.params)
                .any(|(a, b)| a.len() != b.len())
        {
            return Err(RuntimeError::Message(
                "parameter tensors do not match the plan's shapes".into(),
            ));
        }
        self.params = params.to_vec();
        Ok(())
    }

    fn read_optimizer_state(&mut self) -> Result<OptimizerState> {
        let mut tensors = Vec::new();
        for (spec, s) in self.plan.params.iter().zip(&self.state) {
            let kind = self.plan.optimizer.groups[spec.group].optimizer;
            let (first, second) = state_names(&spec.name, kind);
            tensors.push((first, s.exp_avg.clone()));
            if let Some(second) = second {
                tensors.push((second, s.exp_avg_sq.clone()));
            }
        }
        Ok(OptimizerState {
            step: self.step,
            tensors,
        })
    }

    fn write_optimizer_state(&mut self, state: &OptimizerState) -> Result<()> {
        let find = |name: &str, len: usize| -> Result<Vec<f32>> {
            let t = state
                .tensors
                .iter()
                .find(|(n, _)| n == name)
                .ok_or_else(|| {
                    RuntimeError::Message(format!("optimizer state has no tensor `{name}`"))
                })?;
            if t.1.len() != len {
                return Err(RuntimeError::Message(format!(
                    "optimizer tensor `{name}` has {} values, expected {len}",
                    t.1.len()
                )));
            }
            Ok(t.1.clone())
        };
        for (spec, s) in self.plan.params.iter().zip(self.state.iter_mut()) {
            let kind = self.plan.optimizer.groups[spec.group].optimizer;
            let (first, second) = state_names(&spec.name, kind);
            s.exp_avg = find(&first, s.exp_avg.len())?;
            if let Some(second) = second {
                s.exp_avg_sq = find(&second, s.exp_avg_sq.len())?;
            }
            if kind == OptimizerKind::NAdam {
                // μ_t depends only on the step, so the running product is recomputed, not stored.
                let beta1 = self.plan.optimizer.groups[spec.group].beta1;
                s.mu_product = (1..=state.step)
                    .map(|t| beta1 * (1.0 - 0.5 * 0.96f64.powf(t as f64 * 4e-3)))
                    .product();
            }
        }
        self.step = state.step;
        Ok(())
    }
}
