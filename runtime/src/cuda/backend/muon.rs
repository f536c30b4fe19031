//! Muon groups on the CUDA backend (arch-spec §6.3): every weight matrix of a Muon group
//! gets its own step (`archscale_kernels::muon`) after the fused AdamW launch, which skips
//! them. The momentum lives in the `exp_avg` flat buffer at the parameter's offset (its
//! `exp_avg_sq` slot is unused), and is saved as `<name>.momentum_buffer`, as the CPU
//! backend names it. Replicated parameters only (one GPU or data parallel).

use super::*;
use archscale_kernels::muon::{MuonOps, MuonScratch, MuonStep};

/// One matrix a Muon group updates.
pub(super) struct MuonParam {
    /// Flat offset of the parameter (and of its momentum in `exp_avg`).
    pub(super) offset: usize,
    pub(super) rows: usize,
    pub(super) cols: usize,
    pub(super) group: usize,
}

pub(super) struct MuonState {
    ops: MuonOps,
    scratch: MuonScratch,
    params: Vec<MuonParam>,
}

/// Whether plan parameter `i` belongs to a Muon group.
pub(super) fn is_muon(plan: &Plan, i: usize) -> bool {
    plan.optimizer.groups[plan.params[i].group].optimizer == OptimizerKind::Muon
}

/// `[rows, cols]` as the CPU `muon_step` views a parameter: first dimension × the rest.
fn matrix_shape(shape: &[usize]) -> (usize, usize) {
    let rows = shape.first().copied().unwrap_or(1).max(1);
    let numel: usize = shape.iter().product();
    (rows, numel / rows)
}

/// The Muon matrices of `plan` at their flat `offsets`.
pub(super) fn muon_params(plan: &Plan, offsets: &[usize]) -> Vec<MuonParam> {
    (0..plan.params.len())
        .filter(|&i| is_muon(plan, i))
        .map(|i| {
            let (rows, cols) = matrix_shape(&plan.params[i].shape);
            MuonParam {
                offset: offsets[i],
                rows,
                cols,
                group: plan.params[i].group,
            }
        })
        .collect()
}

/// Device bytes of the Muon scratch for `plan` (0 without Muon groups).
pub(super) fn planned_scratch_bytes(plan: &Plan) -> usize {
    let shapes: Vec<(usize, usize)> = (0..plan.params.len())
        .filter(|&i| is_muon(plan, i))
        .map(|i| matrix_shape(&plan.params[i].shape))
        .collect();
    if shapes.is_empty() {
        0
    } else {
        MuonScratch::planned_bytes(&shapes)
    }
}

impl MuonState {
    /// Kernels and scratch for `plan`'s Muon matrices; `None` when it has none.
    pub(super) fn new(
        plan: &Plan,
        gpu: &Arc<Gpu>,
        offsets: &[usize],
        mode: ShardMode,
    ) -> Result<Option<MuonState>> {
        let params = muon_params(plan, offsets);
        if params.is_empty() {
            return Ok(None);
        }
        if mode != ShardMode::Replicated {
            return Err(err(
                "CUDA backend: Muon under ZeRO-1 / ZeRO-3 / hybrid shard is not built yet \
                 (its momentum would be sharded but Newton–Schulz needs whole matrices); \
                 run it data parallel (`--set cluster.sharding=data_parallel`) or with AdamW",
            ));
        }
        let shapes: Vec<(usize, usize)> = params.iter().map(|p| (p.rows, p.cols)).collect();
        Ok(Some(MuonState {
            ops: MuonOps::new(gpu.clone())?,
            scratch: MuonScratch::new(gpu, &shapes)?,
            params,
        }))
    }

    /// Device bytes of the scratch.
    pub(super) fn bytes(&self) -> usize {
        self.scratch.bytes()
    }
}

impl CudaBackend {
    /// One Muon step of every Muon matrix (replicated parameters), after AdamW ran on the
    /// rest: updates params, their bf16 copy and momentum, and zeroes their gradients.
    pub(super) fn muon_step(&self, group_lrs: &[f64], grad_mult: f64) -> Result<()> {
        let Some(muon) = &self.muon else {
            return Ok(());
        };
        self.mark("muon")?;
        let groups = &self.plan.optimizer.groups;
        for mp in &muon.params {
            let g = &groups[mp.group];
            let step = MuonStep {
                rows: mp.rows,
                cols: mp.cols,
                lr: group_lrs[mp.group],
                beta: g.muon_beta.unwrap_or(0.95),
                weight_decay: g.weight_decay,
                grad_mult,
            };
            let off = mp.offset;
            muon.ops.step(
                &self.lt,
                &muon.scratch,
                self.params.ptr + (off * F32) as u64,
                self.grads.ptr + (off * F32) as u64,
                self.exp_avg.ptr + (off * F32) as u64,
                self.params_bf.ptr + (off * BF) as u64,
                &step,
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan_with(optimizer: &str) -> Plan {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            r#"arch = "transformer"
depth = 4
parametrization = "mup++"

[base]
depth = 4
lr = 1e-3
batch_tokens = 512

[train]
tokens = 51_200
seq_len = 256
micro_batch = 2
optimizer = "{optimizer}"

[data]
train = [{{ synthetic = {{ seed = 1, tokens = 100_000 }} }}]
"#
        );
        let exp = archscale_spec::parse_experiment("exp.toml", &text, dir.path(), &[])
            .unwrap_or_else(|e| panic!("{}", e.render()));
        archscale_compiler::plan_experiment(&exp)
            .unwrap_or_else(|e| panic!("{}", e.render()))
            .swap_remove(0)
    }

    #[test]
    fn muon_plans_are_accepted_and_every_weight_matrix_is_stepped_by_muon() {
        let plan = plan_with("muon");
        dims_of(&plan).unwrap();
        let layout = FlatLayout::new(&plan, 1, 0).unwrap();
        let mats = muon_params(&plan, &layout.offsets);
        // per block: qkv, proj, w1, w3; embedding and head stay with AdamW
        assert_eq!(mats.len(), 4 * plan.model.n_layer);
        for (i, p) in plan.params.iter().enumerate() {
            let weight = p.name.ends_with(".weight") && p.shape.len() == 2;
            let embed = p.name.contains("wte") || p.name.contains("lm_head");
            let norm = p.name.contains("norm");
            assert_eq!(is_muon(&plan, i), weight && !embed && !norm, "{}", p.name);
        }
        let biggest = mats.iter().map(|m| m.rows * m.cols).max().unwrap();
        assert!(planned_scratch_bytes(&plan) >= 4 * biggest);
        assert_eq!(planned_scratch_bytes(&plan_with("adamw")), 0);
    }

    #[test]
    fn nadam_is_refused_by_name() {
        let e = dims_of(&plan_with("nadam")).err().unwrap().to_string();
        assert!(e.contains("NAdam") && e.contains("not built yet"), "{e}");
    }

    #[test]
    fn matrices_are_first_dimension_by_the_rest() {
        assert_eq!(matrix_shape(&[6, 4]), (6, 4));
        assert_eq!(matrix_shape(&[6, 1, 4]), (6, 4));
        assert_eq!(matrix_shape(&[5]), (5, 1));
    }
}
