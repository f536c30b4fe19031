//! The manifest of a sharded checkpoint, and re-sharding to another world size.
//!
//! A sharded state (one flat fp32 buffer: params, or one optimizer moment) is written as one
//! file per distinct chunk; replicas (hybrid shard's other nodes) write nothing. The
//! manifest names the files and, for every tensor, where each of its pieces lives, so a
//! reader needs neither the plan nor the old world size to rebuild the full tensors.

use super::shard::{ShardLayout, State};
use crate::{Result, RuntimeError};
use archscale_compiler::plan::Sharding;
use serde::{Deserialize, Serialize};

pub const FORMAT: &str = "archscale-sharded-v1";

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Manifest {
    pub format: String,
    pub world: usize,
    pub gpus_per_node: usize,
    pub layout: Sharding,
    /// Which state the files hold; it sets how many chunks the layout cuts it into.
    pub state: State,
    /// Length of each shard file's buffer, in elements.
    pub shard_len: usize,
    pub files: Vec<ShardFile>,
    pub tensors: Vec<TensorEntry>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ShardFile {
    /// Chunk index.
    pub shard: usize,
    /// The rank that writes it (the first that holds it).
    pub rank: usize,
    pub file: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct TensorEntry {
    pub name: String,
    pub shape: Vec<usize>,
    /// Start in the padded flat buffer.
    pub offset: usize,
    pub pieces: Vec<PieceEntry>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct PieceEntry {
    pub shard: usize,
    /// `[start, end)` of the tensor's elements (row-major).
    pub range: [usize; 2],
    /// Where they start in the shard's buffer.
    pub shard_offset: usize,
}

/// One tensor rebuilt from its pieces.
#[derive(Clone, Debug, PartialEq)]
pub struct FullTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// File name of chunk `shard` of `count`: `<prefix>.shard-00001-of-00004.bin`.
pub fn shard_file_name(prefix: &str, shard: usize, count: usize) -> String {
    format!("{prefix}.shard-{shard:05}-of-{count:05}.bin")
}

impl Manifest {
    /// The manifest of `state` laid out by `layout`, files named from `prefix`.
    pub fn new(layout: &ShardLayout, state: State, prefix: &str) -> Self {
        let count = layout.shard_count(state);
        let mut tensors: Vec<TensorEntry> = layout
            .tensors
            .iter()
            .map(|t| TensorEntry {
                name: t.name.clone(),
                shape: t.shape.clone(),
                offset: t.offset,
                pieces: vec![],
            })
            .collect();
        for shard in 0..count {
            for p in layout.pieces(layout.chunk(count, shard)) {
                tensors[p.tensor].pieces.push(PieceEntry {
                    shard,
                    range: [p.tensor_range.start, p.tensor_range.end],
                    shard_offset: p.local_offset,
                });
            }
        }
        Manifest {
            format: FORMAT.into(),
            world: layout.world,
            gpus_per_node: layout.gpus_per_node,
            layout: layout.sharding,
            state,
            shard_len: layout.padded_total / count,
            files: (0..count)
                .map(|shard| ShardFile {
                    shard,
                    rank: shard,
                    file: shard_file_name(prefix, shard, count),
                })
                .collect(),
            tensors,
        }
    }

    /// Checks the manifest describes every element of every tensor exactly once, inside
    /// its shard, and that `shards` match it.
    pub fn check(&self, shards: &[Vec<f32>]) -> Result<()> {
        let bad = |m: String| {
            Err(RuntimeError::Message(format!(
                "sharded checkpoint manifest: {m}"
            )))
        };
        if self.format != FORMAT {
            return bad(format!("format `{}`, expected `{FORMAT}`", self.format));
        }
        if shards.len() != self.files.len() {
            return bad(format!(
                "{} shard buffers for {} files",
                shards.len(),
                self.files.len()
            ));
        }
        if let Some((i, s)) = shards
            .iter()
            .enumerate()
            .find(|(_, s)| s.len() != self.shard_len)
        {
            return bad(format!(
                "shard {i} holds {} values, the manifest says {}",
                s.len(),
                self.shard_len
            ));
        }
        for t in &self.tensors {
            let numel: usize = t.shape.iter().product();
            let mut pieces: Vec<&PieceEntry> = t.pieces.iter().collect();
            pieces.sort_by_key(|p| p.range[0]);
            let mut next = 0;
            for p in pieces {
                let [start, end] = p.range;
                if start != next || end < start || end > numel {
                    return bad(format!(
                        "tensor {}: pieces do not tile 0..{numel} (at {start}..{end})",
                        t.name
                    ));
                }
                if p.shard >= shards.len() || p.shard_offset + (end - start) > self.shard_len {
                    return bad(format!(
                        "tensor {}: piece {start}..{end} lies outside shard {}",
                        t.name, p.shard
                    ));
                }
                next = end;
            }
            if next != numel {
                return bad(format!(
                    "tensor {}: pieces cover {next} of {numel} elements",
                    t.name
                ));
            }
        }
        Ok(())
    }

    /// The full tensors, in manifest order, rebuilt from `shards`.
    pub fn gather(&self, shards: &[Vec<f32>]) -> Result<Vec<FullTensor>> {
        self.check(shards)?;
        Ok(self
            .tensors
            .iter()
            .map(|t| {
                let mut data = vec![0.0f32; t.shape.iter().product()];
                for p in &t.pieces {
                    let [start, end] = p.range;
                    data[start..end].copy_from_slice(
                        &shards[p.shard][p.shard_offset..p.shard_offset + end - start],
                    );
                }
                FullTensor {
                    name: t.name.clone(),
                    shape: t.shape.clone(),
                    data,
                }
            })
            .collect())
    }
}

/// Re-shards a checkpoint state written at `manifest.world` to `new_world` ranks of the same
/// layout kind with `gpus_per_node` per node (it matters to hybrid shard only): returns the
/// new manifest (files named from `prefix`) and its shard buffers.
pub fn reshard(
    manifest: &Manifest,
    shards: &[Vec<f32>],
    new_world: usize,
    gpus_per_node: usize,
    prefix: &str,
) -> Result<(Manifest, Vec<Vec<f32>>)> {
    let tensors = manifest.gather(shards)?;
    let layout = ShardLayout::new(
        tensors.iter().map(|t| (t.name.clone(), t.shape.clone(), 8)),
        manifest.layout,
        new_world,
        gpus_per_node,
    )?;
    let full: Vec<f32> = tensors
        .iter()
        .flat_map(|t| t.data.iter().copied())
        .collect();
    let state = manifest.state;
    let new_manifest = Manifest::new(&layout, state, prefix);
    let new_shards = (0..layout.shard_count(state))
        .map(|shard| layout.scatter(&full, state, shard))
        .collect::<Result<Vec<_>>>()?;
    Ok((new_manifest, new_shards))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values with varied bit patterns (negative, tiny, large).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                f32::from_bits(((x >> 33) as u32 & 0x3fff_ffff) | ((x as u32 & 1) << 31)) * 1e-3
            })
            .collect()
    }

    fn tensors() -> Vec<(String, Vec<usize>, u64)> {
        [
            ("wte", vec![37, 6]),
            ("h.0.attn.weight", vec![18, 6]),
            ("h.0.norm", vec![6]),
            ("lm_head", vec![5, 7]),
        ]
        .into_iter()
        .map(|(n, s)| (n.to_string(), s, 8))
        .collect()
    }

    fn sharded(layout: &ShardLayout, state: State, full: &[f32]) -> Vec<Vec<f32>> {
        (0..layout.shard_count(state))
            .map(|s| layout.scatter(full, state, s).unwrap())
            .collect()
    }

    #[test]
    fn reshard_round_trip_4_1_3_4_is_bit_exact() {
        for sharding in [Sharding::Zero3, Sharding::Zero1, Sharding::HybridShard] {
            let layout = ShardLayout::new(tensors(), sharding, 4, 2).unwrap();
            let numel: usize = layout.tensors.iter().map(|t| t.numel).sum();
            let full = values(numel, 7);
            let state = if sharding == Sharding::Zero1 {
                State::Optimizer
            } else {
                State::Params
            };
            let m4 = Manifest::new(&layout, state, "step-10/params");
            let s4 = sharded(&layout, state, &full);
            // The manifest survives JSON.
            let m4: Manifest = serde_json::from_str(&serde_json::to_string(&m4).unwrap()).unwrap();
            let (m1, s1) = reshard(&m4, &s4, 1, 1, "w1").unwrap();
            assert_eq!(s1.len(), 1);
            let (m3, s3) = reshard(&m1, &s1, 3, 3, "w3").unwrap();
            assert_eq!(s3.len(), 3);
            let (m4b, s4b) = reshard(&m3, &s3, 4, 2, "step-10/params").unwrap();
            assert_eq!(m4b, m4, "{sharding:?}");
            let bits = |s: &[Vec<f32>]| s.iter().flatten().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&s4b), bits(&s4), "{sharding:?}");
            let gathered: Vec<f32> = m3
                .gather(&s3)
                .unwrap()
                .into_iter()
                .flat_map(|t| t.data)
                .collect();
            assert_eq!(
                gathered.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                full.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn manifest_names_one_file_per_chunk_and_pieces_across_ranks() {
        let layout = ShardLayout::new(tensors(), Sharding::HybridShard, 8, 4).unwrap();
        let m = Manifest::new(&layout, State::Params, "ckpt");
        assert_eq!(m.files.len(), 4);
        assert_eq!(m.files[3].file, "ckpt.shard-00003-of-00004.bin");
        // Padded to multiples of 8: 224 + 112 + 8 + 40 = 384, chunks of 96; wte (222
        // values) spans chunks 0, 1 and 2.
        assert_eq!(m.shard_len, 96);
        let wte = &m.tensors[0];
        assert_eq!(wte.pieces.len(), 3);
        assert_eq!((wte.pieces[1].shard, wte.pieces[1].range), (1, [96, 192]));
        assert_eq!(
            (
                wte.pieces[2].shard,
                wte.pieces[2].range,
                wte.pieces[2].shard_offset
            ),
            (2, [192, 222], 0)
        );
        assert_eq!(
            (
                m.tensors[1].pieces[0].shard,
                m.tensors[1].pieces[0].shard_offset
            ),
            (2, 32)
        );
    }

    #[test]
    fn zero1_params_stay_whole_and_optimizer_state_is_cut_per_rank() {
        let layout = ShardLayout::new(tensors(), Sharding::Zero1, 2, 2).unwrap();
        let numel: usize = layout.tensors.iter().map(|t| t.numel).sum();
        let full = values(numel, 3);
        for (state, files_at_3) in [(State::Params, 1), (State::Optimizer, 3)] {
            let m = Manifest::new(&layout, state, "s");
            let s = sharded(&layout, state, &full);
            let (m3, s3) = reshard(&m, &s, 3, 3, "s").unwrap();
            assert_eq!(
                (m3.state, m3.files.len(), s3.len()),
                (state, files_at_3, files_at_3)
            );
        }
    }

    #[test]
    fn check_rejects_wrong_shard_count_and_length() {
        let layout = ShardLayout::new(tensors(), Sharding::Zero3, 2, 2).unwrap();
        let numel: usize = layout.tensors.iter().map(|t| t.numel).sum();
        let m = Manifest::new(&layout, State::Params, "p");
        let mut s = sharded(&layout, State::Params, &values(numel, 1));
        assert!(m
            .check(&s[..1])
            .unwrap_err()
            .to_string()
            .contains("1 shard buffers for 2 files"));
        s[1].pop();
        assert!(m
            .check(&s)
            .unwrap_err()
            .to_string()
            .contains("shard 1 holds"));
    }
}
