//! The manifest of a sharded checkpoint, and re-sharding to another world size.
//!
//! A sharded state (one flat fp32 buffer: params, or one optimizer moment) is written as one
//! file per distinct chunk; replicas (hybrid shard's other nodes) write nothing. The
//! manifest names the files and, for every tensor, where each of its pieces lives, so a
//! reader needs neither the plan nor the old world size to rebuild the full tensors.

use crate::{Result, RuntimeError};
use archscale_compiler::plan::Sharding;
use serde::{Deserialize, Serialize};

pub const FORMAT: &str = "archscale-sharded-v1";

/// Which state a set of shard files holds.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Params,
    Grads,
    Optimizer,
}

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

#[cfg(test)]
mod tests {
    use super::super::flat_layout::FlatLayout;
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

    fn tensors() -> Vec<(String, Vec<usize>, usize)> {
        [
            ("transformer.wte.weight", vec![37, 6]),
            ("transformer.h.0.attn.attn.weight", vec![18, 6]),
            ("transformer.h.0.norm_1.weight", vec![6]),
            ("lm_head.weight", vec![5, 7]),
        ]
        .into_iter()
        .map(|(n, s)| (n.to_string(), s, 0))
        .collect()
    }

    fn full() -> Vec<Vec<f32>> {
        tensors()
            .iter()
            .enumerate()
            .map(|(i, (_, s, _))| values(s.iter().product(), i as u64 + 7))
            .collect()
    }

    /// Every rank's local buffer of `full` cut into `shards`, and the manifest.
    fn cut(full: &[Vec<f32>], shards: usize) -> (Manifest, Vec<Vec<f32>>) {
        let refs: Vec<&[f32]> = full.iter().map(|v| v.as_slice()).collect();
        let locals = (0..shards)
            .map(|r| {
                FlatLayout::from_tensors(tensors(), shards, r)
                    .unwrap()
                    .local_from_full(&refs)
                    .unwrap()
            })
            .collect();
        let m = FlatLayout::from_tensors(tensors(), shards, 0)
            .unwrap()
            .manifest(Sharding::Zero3, shards, "optimizer.exp_avg");
        (m, locals)
    }

    fn bits(v: &[Vec<f32>]) -> Vec<u32> {
        v.iter().flatten().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn resharding_4_1_3_4_through_manifests_is_bit_exact() {
        let original = full();
        let (m4, s4) = cut(&original, 4);
        // The manifest survives JSON.
        let m4: Manifest = serde_json::from_str(&serde_json::to_string(&m4).unwrap()).unwrap();
        let mut tensors_now: Vec<Vec<f32>> = m4
            .gather(&s4)
            .unwrap()
            .into_iter()
            .map(|t| t.data)
            .collect();
        assert_eq!(bits(&tensors_now), bits(&original));
        for shards in [1, 3, 4] {
            let (m, s) = cut(&tensors_now, shards);
            assert_eq!(m.files.len(), shards);
            tensors_now = m.gather(&s).unwrap().into_iter().map(|t| t.data).collect();
            assert_eq!(bits(&tensors_now), bits(&original), "{shards} shards");
        }
        let (m4b, s4b) = cut(&tensors_now, 4);
        assert_eq!(m4b, m4);
        assert_eq!(bits(&s4b), bits(&s4));
    }

    #[test]
    fn manifest_names_one_file_per_rank_and_pieces_in_local_buffers() {
        let (m, s) = cut(&full(), 4);
        assert_eq!(m.files.len(), 4);
        assert_eq!(
            m.files[3].file,
            "optimizer.exp_avg.shard-00003-of-00004.bin"
        );
        assert!(s.iter().all(|b| b.len() == m.shard_len));
        // wte (222 values) is its own unit of 256 padded elements: 64 per rank, so its
        // pieces are 64, 64, 64 and 30 values at the start of each rank's buffer.
        let wte = &m.tensors[0];
        let lens: Vec<usize> = wte.pieces.iter().map(|p| p.range[1] - p.range[0]).collect();
        assert_eq!(lens, [64, 64, 64, 30]);
        assert!(wte.pieces.iter().all(|p| p.shard_offset == 0));
    }

    #[test]
    fn check_rejects_wrong_shard_count_and_length() {
        let (m, mut s) = cut(&full(), 2);
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
