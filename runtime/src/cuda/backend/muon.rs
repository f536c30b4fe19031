//! Muon groups on the CUDA backend (arch-spec §6.3): every weight matrix of a Muon group
//! gets its own step (`archscale_kernels::muon`) after the fused AdamW launch, which skips
//! them. The momentum lives in the `exp_avg` buffer where AdamW would keep the matrix's first
//! moment (the compact `exp_avg_sq` has no slot for it), and is saved as
//! `<name>.momentum_buffer`, as the CPU backend names it.
//!
//! Under ZeRO-1 / ZeRO-3 / hybrid shard a rank holds the reduced gradient and the momentum of
//! its chunk of each unit only, and a chunk boundary may cut a matrix, while Newton–Schulz
//! needs the whole matrix. So, per unit: every rank updates the momentum of its elements and
//! writes their Nesterov mix (fp32) into a unit-sized buffer (ZeRO-1: the gradient buffer
//! itself; ZeRO-3: the unit's gradient slot), the ranks all-gather it, and each rank runs
//! Newton–Schulz on the matrices it owns elements of and updates those elements only. The
//! values are the replicated step's: the mix is gathered exactly and cast to bf16 after.

use super::*;
use archscale_kernels::muon::{MuonOps, MuonScratch, MuonStep};
use std::ops::Range;

/// One matrix a Muon group updates.
pub(super) struct MuonParam {
    /// Flat offset of the parameter (and of its momentum in `exp_avg`).
    pub(super) offset: usize,
    pub(super) rows: usize,
    pub(super) cols: usize,
    pub(super) group: usize,
    /// Unit of the flat layout holding it.
    pub(super) unit: usize,
    /// Flat range of its elements in this rank's chunk (all of it when nothing is sharded;
    /// may be empty).
    pub(super) own: Range<usize>,
}

pub(super) struct MuonState {
    ops: MuonOps,
    scratch: MuonScratch,
    params: Vec<MuonParam>,
    /// Units holding Muon matrices, each with the indices of its matrices in `params`.
    units: Vec<(usize, Vec<usize>)>,
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

/// The Muon matrices of `plan` where `layout` puts them, with the part its rank owns.
pub(super) fn muon_params(plan: &Plan, layout: &FlatLayout) -> Vec<MuonParam> {
    (0..plan.params.len())
        .filter(|&i| is_muon(plan, i))
        .map(|i| {
            let (rows, cols) = matrix_shape(&plan.params[i].shape);
            let offset = layout.offsets[i];
            let unit = layout.unit_of_param[i];
            let chunk = layout.chunk(unit, layout.rank);
            let start = offset.max(chunk.start);
            let end = (offset + rows * cols).min(chunk.end).max(start);
            MuonParam {
                offset,
                rows,
                cols,
                group: plan.params[i].group,
                unit,
                own: start..end,
            }
        })
        .collect()
}

/// The units holding Muon matrices, in layout order, each with its matrices' indices.
fn units_of(params: &[MuonParam]) -> Vec<(usize, Vec<usize>)> {
    let mut out: Vec<(usize, Vec<usize>)> = Vec::new();
    for (k, p) in params.iter().enumerate() {
        match out.iter_mut().find(|(u, _)| *u == p.unit) {
            Some((_, v)) => v.push(k),
            None => out.push((p.unit, vec![k])),
        }
    }
    out.sort_by_key(|(u, _)| *u);
    out
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
        layout: &FlatLayout,
    ) -> Result<Option<MuonState>> {
        let params = muon_params(plan, layout);
        if params.is_empty() {
            return Ok(None);
        }
        let shapes: Vec<(usize, usize)> = params.iter().map(|p| (p.rows, p.cols)).collect();
        Ok(Some(MuonState {
            ops: MuonOps::new(gpu.clone())?,
            scratch: MuonScratch::new(gpu, &shapes)?,
            units: units_of(&params),
            params,
        }))
    }

    /// Device bytes of the scratch.
    pub(super) fn bytes(&self) -> usize {
        self.scratch.bytes()
    }
}

impl CudaBackend {
    /// One Muon step of every Muon matrix, after AdamW ran on the rest: updates params
    /// (this rank's elements under ZeRO), their bf16 copy where one is kept, and momentum,
    /// and zeroes their gradients.
    pub(super) fn muon_step(&self, group_lrs: &[f64], grad_mult: f64) -> Result<()> {
        let Some(muon) = &self.muon else {
            return Ok(());
        };
        self.mark("muon")?;
        let groups = &self.plan.optimizer.groups;
        let step_of = |mp: &MuonParam| {
            let g = &groups[mp.group];
            MuonStep {
                rows: mp.rows,
                cols: mp.cols,
                lr: group_lrs[mp.group],
                beta: g.muon_beta.unwrap_or(0.95),
                weight_decay: g.weight_decay,
                grad_mult,
            }
        };
        if self.mode != ShardMode::Replicated {
            return self.muon_step_sharded(muon, &step_of);
        }
        for mp in &muon.params {
            let step = step_of(mp);
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

    /// The ZeRO form of [`Self::muon_step`] (module comment): per unit, momentum and mix on
    /// this rank's elements, all-gather of the mix, Newton–Schulz on the matrices this rank
    /// owns elements of, update of those elements.
    fn muon_step_sharded(
        &self,
        muon: &MuonState,
        step_of: &dyn Fn(&MuonParam) -> MuonStep,
    ) -> Result<()> {
        let comm = self
            .shard_comm
            .as_ref()
            .ok_or_else(|| err("CUDA backend: sharded Muon without NCCL"))?;
        let stream = self.gpu.raw_stream() as u64;
        let f32_at = |base: u64, i: usize| base + (i * F32) as u64;
        for (u, members) in &muon.units {
            let unit = &self.layout.units[*u];
            let chunk = self.layout.chunk(*u, self.layout.rank);
            // the rank's local buffers (optimizer state; ZeRO-3 params and grads) hold its
            // chunk of unit `u` from `local_start`
            let local = |f: usize| unit.local_start + (f - chunk.start);
            // flat-indexed fp32 buffer the unit's mix is gathered into
            let gather = match self.mode {
                ShardMode::Zero3 => self.slot(*u).2,
                _ => self.grads.ptr,
            };
            // where this rank's params and grads of flat element `f` (in its chunk) live
            let at = |f: usize| -> (u64, u64) {
                match self.mode {
                    ShardMode::Zero3 => (
                        f32_at(self.params.ptr, local(f)),
                        f32_at(self.grads.ptr, local(f)),
                    ),
                    _ => (f32_at(self.params.ptr, f), f32_at(self.grads.ptr, f)),
                }
            };
            for &k in members {
                let mp = &muon.params[k];
                if mp.own.is_empty() {
                    continue;
                }
                let (_, g) = at(mp.own.start);
                muon.ops.momentum_part(
                    g,
                    f32_at(self.exp_avg.ptr, local(mp.own.start)),
                    f32_at(gather, mp.own.start),
                    mp.own.len(),
                    &step_of(mp),
                )?;
            }
            self.mark("muon all-gather")?;
            comm.all_gather_f32(
                f32_at(gather, unit.start),
                self.layout.chunk_len(*u),
                stream,
            )?;
            self.mark("muon")?;
            for &k in members {
                let mp = &muon.params[k];
                if mp.own.is_empty() {
                    continue;
                }
                let st = step_of(mp);
                muon.ops
                    .pack_and_normalize(&muon.scratch, f32_at(gather, mp.offset), &st)?;
                let o = muon
                    .ops
                    .newton_schulz(&self.lt, &muon.scratch, mp.rows, mp.cols)?;
                let (p, g) = at(mp.own.start);
                // ZeRO-1 refreshes the bf16 copy after gathering the params; ZeRO-3 has none
                muon.ops
                    .apply_part(p, g, 0, o, mp.own.start - mp.offset, mp.own.len(), &st)?;
            }
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
        let mats = muon_params(&plan, &layout);
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
    fn under_zero_the_ranks_own_parts_that_tile_every_muon_matrix() {
        let plan = plan_with("muon");
        for shards in [1, 2, 3, 4, 8] {
            let per_rank: Vec<Vec<MuonParam>> = (0..shards)
                .map(|r| muon_params(&plan, &FlatLayout::new(&plan, shards, r).unwrap()))
                .collect();
            for (k, p) in per_rank[0].iter().enumerate() {
                let mut parts: Vec<Range<usize>> = per_rank
                    .iter()
                    .map(|ps| ps[k].own.clone())
                    .filter(|r| !r.is_empty())
                    .collect();
                parts.sort_by_key(|r| r.start);
                // consecutive, non-overlapping, covering exactly the matrix
                assert_eq!(parts[0].start, p.offset, "{shards} shards, matrix {k}");
                for w in parts.windows(2) {
                    assert_eq!(w[0].end, w[1].start, "{shards} shards, matrix {k}");
                }
                let end = parts.last().map(|r| r.end);
                assert_eq!(end, Some(p.offset + p.rows * p.cols));
                for ps in &per_rank {
                    assert_eq!(ps[k].unit, p.unit);
                }
            }
            // with more than one shard some matrix is cut by a chunk boundary
            if shards > 1 {
                let cut = (0..per_rank[0].len())
                    .any(|k| per_rank.iter().filter(|ps| !ps[k].own.is_empty()).count() > 1);
                assert!(cut, "{shards} shards");
            }
        }
        let one = muon_params(&plan, &FlatLayout::new(&plan, 1, 0).unwrap());
        let units = units_of(&one);
        assert_eq!(units.len(), plan.model.n_layer);
        assert_eq!(units.iter().map(|(_, m)| m.len()).sum::<usize>(), one.len());
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
