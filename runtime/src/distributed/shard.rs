//! Which contiguous slice of the flat parameter buffer each rank owns.
//!
//! The flat buffer holds the plan's params in plan order, each padded with zeros to a
//! multiple of the world size, so the padded total divides evenly. A state sharded over
//! `k` ranks is cut into `k` equal contiguous chunks (llm.c's ZeRO-1 scheme; FSDP's flat
//! parameter for ZeRO-3); chunk `i` belongs to shard index `i`. Per layout:
//! - data parallel: nothing sharded;
//! - ZeRO-1: optimizer state over the world, params and grads replicated;
//! - ZeRO-3: params, grads and optimizer state over the world;
//! - hybrid shard: all three over the GPUs of a node, replicated across nodes
//!   (rank `r` holds chunk `r % gpus_per_node`).

use crate::{Result, RuntimeError};
use archscale_compiler::plan::{OptimizerKind, Plan, Sharding};
use std::ops::Range;

/// A state that may be sharded.
#[derive(serde::Serialize, serde::Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Params,
    Grads,
    Optimizer,
}

/// One tensor's place in the padded flat buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSlot {
    pub name: String,
    pub shape: Vec<usize>,
    pub numel: usize,
    /// Start in the padded flat buffer.
    pub offset: usize,
    /// `numel` rounded up to a multiple of the world size.
    pub padded: usize,
    /// Optimizer state bytes per element (AdamW/NAdam: m and v, 8; Muon: momentum, 4).
    pub optimizer_bytes: u64,
}

/// The part of one tensor that falls in a shard's chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Piece {
    pub tensor: usize,
    /// Elements of the tensor (padding excluded).
    pub tensor_range: Range<usize>,
    /// Where they sit in the shard's local buffer.
    pub local_offset: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ShardLayout {
    pub sharding: Sharding,
    pub world: usize,
    pub gpus_per_node: usize,
    pub tensors: Vec<TensorSlot>,
    /// Length of the padded flat buffer (a multiple of `world`).
    pub padded_total: usize,
}

impl ShardLayout {
    /// The layout of `plan`'s params under its own sharding and world.
    pub fn from_plan(plan: &Plan) -> Result<Self> {
        let tensors = plan.params.iter().map(|p| {
            let bytes = match plan.optimizer.groups.get(p.group).map(|g| g.optimizer) {
                Some(OptimizerKind::Muon) => 4,
                _ => 8,
            };
            (p.name.clone(), p.shape.clone(), bytes)
        });
        Self::new(
            tensors,
            plan.layout.sharding,
            plan.layout.world,
            plan.layout.gpus_per_node,
        )
    }

    /// The layout of `tensors` (name, shape, optimizer bytes per element), in this order.
    pub fn new(
        tensors: impl IntoIterator<Item = (String, Vec<usize>, u64)>,
        sharding: Sharding,
        world: usize,
        gpus_per_node: usize,
    ) -> Result<Self> {
        if world == 0 || gpus_per_node == 0 || !world.is_multiple_of(gpus_per_node) {
            return Err(RuntimeError::Message(format!(
                "sharding: world {world} must be a positive multiple of gpus_per_node {gpus_per_node}"
            )));
        }
        let mut offset = 0;
        let tensors = tensors
            .into_iter()
            .map(|(name, shape, optimizer_bytes)| {
                let numel: usize = shape.iter().product();
                let padded = numel.div_ceil(world) * world;
                let slot = TensorSlot {
                    name,
                    shape,
                    numel,
                    offset,
                    padded,
                    optimizer_bytes,
                };
                offset += padded;
                slot
            })
            .collect();
        Ok(ShardLayout {
            sharding,
            world,
            gpus_per_node,
            tensors,
            padded_total: offset,
        })
    }

    /// Number of distinct chunks `state` is cut into.
    pub fn shard_count(&self, state: State) -> usize {
        match (self.sharding, state) {
            (Sharding::DataParallel, _) => 1,
            (Sharding::Zero1, State::Optimizer) => self.world,
            (Sharding::Zero1, _) => 1,
            (Sharding::Zero3, _) => self.world,
            (Sharding::HybridShard, _) => self.gpus_per_node,
        }
    }

    /// The chunk of `state` that `rank` holds.
    pub fn shard_index(&self, state: State, rank: usize) -> usize {
        rank % self.shard_count(state)
    }

    /// Elements of the padded flat buffer in chunk `shard` of a state cut into `count`.
    pub fn chunk(&self, count: usize, shard: usize) -> Range<usize> {
        let len = self.padded_total / count;
        shard * len..(shard + 1) * len
    }

    /// Elements of the padded flat buffer that `rank` holds of `state`.
    pub fn owned_range(&self, state: State, rank: usize) -> Range<usize> {
        self.chunk(self.shard_count(state), self.shard_index(state, rank))
    }

    /// The tensors' elements inside `range` of the padded flat buffer, padding skipped.
    pub fn pieces(&self, range: Range<usize>) -> Vec<Piece> {
        let mut out = Vec::new();
        // Tensors are in offset order; find the first one that ends after the range starts.
        let first = self
            .tensors
            .partition_point(|t| t.offset + t.padded <= range.start);
        for (i, t) in self.tensors.iter().enumerate().skip(first) {
            if t.offset >= range.end {
                break;
            }
            let start = range.start.max(t.offset);
            let end = range.end.min(t.offset + t.numel);
            if start < end {
                out.push(Piece {
                    tensor: i,
                    tensor_range: start - t.offset..end - t.offset,
                    local_offset: start - range.start,
                });
            }
        }
        out
    }

    /// Bytes `rank` allocates for `state` (fp32 params and grads; padding included).
    pub fn rank_bytes(&self, state: State, rank: usize) -> u64 {
        let range = self.owned_range(state, rank);
        match state {
            State::Params | State::Grads => 4 * range.len() as u64,
            State::Optimizer => {
                let first = self
                    .tensors
                    .partition_point(|t| t.offset + t.padded <= range.start);
                self.tensors[first..]
                    .iter()
                    .take_while(|t| t.offset < range.end)
                    .map(|t| {
                        let overlap =
                            range.end.min(t.offset + t.padded) - range.start.max(t.offset);
                        overlap as u64 * t.optimizer_bytes
                    })
                    .sum()
            }
        }
    }

    /// The most bytes any rank allocates for `state`.
    pub fn max_rank_bytes(&self, state: State) -> u64 {
        (0..self.shard_count(state))
            .map(|r| self.rank_bytes(state, r))
            .max()
            .unwrap_or(0)
    }

    /// Copies `rank`'s chunk of `state` out of a full unpadded flat buffer (plan order).
    pub fn scatter(&self, full: &[f32], state: State, rank: usize) -> Result<Vec<f32>> {
        let numel: usize = self.tensors.iter().map(|t| t.numel).sum();
        if full.len() != numel {
            return Err(RuntimeError::Message(format!(
                "sharding: the full buffer holds {} values, the layout {numel}",
                full.len()
            )));
        }
        let range = self.owned_range(state, rank);
        let mut local = vec![0.0f32; range.len()];
        let starts = self.unpadded_starts();
        for p in self.pieces(range) {
            let src = starts[p.tensor] + p.tensor_range.start;
            let n = p.tensor_range.len();
            local[p.local_offset..p.local_offset + n].copy_from_slice(&full[src..src + n]);
        }
        Ok(local)
    }

    /// Each tensor's start in the unpadded flat buffer.
    pub fn unpadded_starts(&self) -> Vec<usize> {
        let mut at = 0;
        self.tensors
            .iter()
            .map(|t| {
                let s = at;
                at += t.numel;
                s
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(shapes: &[&[usize]], sharding: Sharding, world: usize, gpn: usize) -> ShardLayout {
        let t = shapes
            .iter()
            .enumerate()
            .map(|(i, s)| (format!("t{i}"), s.to_vec(), 8));
        ShardLayout::new(t, sharding, world, gpn).unwrap()
    }

    #[test]
    fn tensors_padded_to_world_and_chunks_tile_the_buffer() {
        let l = layout(&[&[3, 5], &[7], &[4, 4]], Sharding::Zero3, 4, 4);
        let padded: Vec<usize> = l.tensors.iter().map(|t| t.padded).collect();
        assert_eq!(padded, vec![16, 8, 16]);
        assert_eq!(l.padded_total, 40);
        let ranges: Vec<_> = (0..4).map(|r| l.owned_range(State::Params, r)).collect();
        assert_eq!(ranges, vec![0..10, 10..20, 20..30, 30..40]);
        // Rank 1 holds t0[10..15] then t1[0..4]; t0's padding (15, 16) is skipped.
        let p = l.pieces(10..20);
        assert_eq!(p.len(), 2);
        assert_eq!(
            (p[0].tensor, p[0].tensor_range.clone(), p[0].local_offset),
            (0, 10..15, 0)
        );
        assert_eq!(
            (p[1].tensor, p[1].tensor_range.clone(), p[1].local_offset),
            (1, 0..4, 6)
        );
    }

    #[test]
    fn shard_counts_per_layout() {
        let shapes: &[&[usize]] = &[&[10, 10]];
        let dp = layout(shapes, Sharding::DataParallel, 8, 4);
        let z1 = layout(shapes, Sharding::Zero1, 8, 4);
        let z3 = layout(shapes, Sharding::Zero3, 8, 4);
        let hy = layout(shapes, Sharding::HybridShard, 8, 4);
        for s in [State::Params, State::Grads, State::Optimizer] {
            assert_eq!(dp.shard_count(s), 1);
            assert_eq!(z3.shard_count(s), 8);
            assert_eq!(hy.shard_count(s), 4);
        }
        assert_eq!(z1.shard_count(State::Params), 1);
        assert_eq!(z1.shard_count(State::Optimizer), 8);
        // Hybrid: rank 5 is GPU 1 of node 1 and holds the same chunk as rank 1.
        assert_eq!(
            hy.owned_range(State::Params, 5),
            hy.owned_range(State::Params, 1)
        );
        assert_ne!(
            z3.owned_range(State::Params, 5),
            z3.owned_range(State::Params, 1)
        );
    }

    #[test]
    fn scatter_recovers_every_value_once() {
        let l = layout(&[&[3, 5], &[7], &[4, 4]], Sharding::Zero3, 3, 3);
        let full: Vec<f32> = (0..38).map(|i| i as f32).collect();
        let mut seen = vec![];
        for r in 0..3 {
            let local = l.scatter(&full, State::Params, r).unwrap();
            for p in l.pieces(l.owned_range(State::Params, r)) {
                seen.extend_from_slice(
                    &local[p.local_offset..p.local_offset + p.tensor_range.len()],
                );
            }
        }
        assert_eq!(seen, full);
    }

    #[test]
    fn world_must_be_a_multiple_of_gpus_per_node() {
        let err = ShardLayout::new([("w".to_string(), vec![2], 8)], Sharding::HybridShard, 6, 4)
            .unwrap_err();
        assert!(
            err.to_string().contains("multiple of gpus_per_node 4"),
            "{err}"
        );
    }
}
