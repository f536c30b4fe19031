//! Where every parameter lives in the CUDA backend's flat buffers, and which part of each
//! buffer a rank owns under ZeRO.
//!
//! Parameters are grouped into *units* — the embedding, each block `transformer.h.{i}`, and
//! the head (final norm + `lm_head`) — the granularity at which gradients are reduced during
//! the backward pass and, under ZeRO-3, parameters are gathered (FSDP's flat parameters).
//! Every tensor starts 64-element aligned (cuBLASLt and vector loads), and every unit is
//! padded to a multiple of `64 · shards`, so each unit splits into `shards` equal aligned
//! chunks: chunk `r` of every unit belongs to rank `r`. A rank's *local* buffer (its
//! optimizer state, and under ZeRO-3 its parameters and gradients) is the concatenation of
//! its chunks, unit after unit.

use super::manifest::{
    shard_file_name, Manifest, PieceEntry, ShardFile, State, TensorEntry, FORMAT,
};
use crate::{Result, RuntimeError};
use archscale_compiler::plan::{Plan, Sharding};
use std::ops::Range;

const ALIGN: usize = 64;

/// Largest AdamW work item: one CUDA block each, so a unit's launch has enough blocks to fill
/// the GPU even at small widths.
pub const OPT_CHUNK: usize = 1 << 13;

/// One unit: a contiguous range of the flat buffer.
#[derive(Clone, Debug, PartialEq)]
pub struct Unit {
    pub name: String,
    /// Start in the flat buffer.
    pub start: usize,
    /// Padded length (a multiple of `64 · shards`).
    pub len: usize,
    /// Plan indices of its tensors, in buffer order.
    pub params: Vec<usize>,
    /// Start of this unit's chunk in a rank's local buffer.
    pub local_start: usize,
}

/// One AdamW work item: `len` elements at `offset` (relative to the start of the rank's
/// chunk of the unit), all of optimizer group `group`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OptChunk {
    pub offset: usize,
    pub len: usize,
    pub group: usize,
}

/// A rank's state kept only for some tensors ([`FlatLayout::compact_state`]): each kept piece
/// of the local buffer and where it starts in the compact buffer.
#[derive(Clone, Debug, PartialEq)]
pub struct CompactState {
    /// (range of the local buffer, start in the compact buffer), in local order.
    pieces: Vec<(Range<usize>, usize)>,
    /// Compact elements this rank uses (each piece padded to 64).
    pub len: usize,
    local_len: usize,
}

impl CompactState {
    /// Compact index of local element `local`, if its tensor keeps the state.
    pub fn index(&self, local: usize) -> Option<usize> {
        let k = self.pieces.partition_point(|(r, _)| r.end <= local);
        let (r, start) = self.pieces.get(k)?;
        r.contains(&local).then(|| start + (local - r.start))
    }

    /// The local buffer of `compact` (zeros where no tensor keeps the state).
    pub fn to_local(&self, compact: &[f32]) -> Result<Vec<f32>> {
        if compact.len() < self.len {
            return Err(RuntimeError::Message(format!(
                "compact state of {} values, expected at least {}",
                compact.len(),
                self.len
            )));
        }
        let mut out = vec![0.0f32; self.local_len];
        for (r, start) in &self.pieces {
            out[r.clone()].copy_from_slice(&compact[*start..*start + r.len()]);
        }
        Ok(out)
    }

    /// `local` (a rank's local buffer) packed into a compact buffer of `alloc` values.
    pub fn from_local(&self, local: &[f32], alloc: usize) -> Result<Vec<f32>> {
        if local.len() != self.local_len || alloc < self.len {
            return Err(RuntimeError::Message(format!(
                "compact state: {} local values into {alloc}, expected {} into at least {}",
                local.len(),
                self.local_len,
                self.len
            )));
        }
        let mut out = vec![0.0f32; alloc];
        for (r, start) in &self.pieces {
            out[*start..*start + r.len()].copy_from_slice(&local[r.clone()]);
        }
        Ok(out)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct FlatLayout {
    /// Number of chunks every unit is cut into (1 when nothing is sharded).
    pub shards: usize,
    pub rank: usize,
    /// Flat offset of each plan parameter (tied tensors have one entry in the plan).
    pub offsets: Vec<usize>,
    pub numels: Vec<usize>,
    pub groups: Vec<usize>,
    pub names: Vec<String>,
    pub shapes: Vec<Vec<usize>>,
    pub units: Vec<Unit>,
    /// Plan index -> unit index.
    pub unit_of_param: Vec<usize>,
    /// Length of the flat buffer.
    pub numel: usize,
    /// Length of a rank's local buffer (sum of its chunks).
    pub local_len: usize,
}

fn unit_key(name: &str) -> String {
    if let Some(rest) = name.strip_prefix("transformer.h.") {
        if let Some(i) = rest.split('.').next() {
            return format!("transformer.h.{i}");
        }
    }
    if name.starts_with("transformer.wte") {
        "embedding".into()
    } else {
        "head".into()
    }
}

impl FlatLayout {
    /// The layout of `plan`'s parameters cut into `shards` chunks per unit, seen by `rank`.
    pub fn new(plan: &Plan, shards: usize, rank: usize) -> Result<FlatLayout> {
        let items = plan
            .params
            .iter()
            .map(|p| (p.name.clone(), p.shape.clone(), p.group));
        Self::from_tensors(items, shards, rank)
    }

    /// The layout of `tensors` (name, shape, optimizer group) in plan order.
    pub fn from_tensors(
        tensors: impl IntoIterator<Item = (String, Vec<usize>, usize)>,
        shards: usize,
        rank: usize,
    ) -> Result<FlatLayout> {
        if shards == 0 || rank >= shards {
            return Err(RuntimeError::Message(format!(
                "flat layout: rank {rank} of {shards} shards"
            )));
        }
        let (mut names, mut shapes, mut groups) = (Vec::new(), Vec::new(), Vec::new());
        for (n, s, g) in tensors {
            names.push(n);
            shapes.push(s);
            groups.push(g);
        }
        let numels: Vec<usize> = shapes.iter().map(|s| s.iter().product()).collect();
        // Units in order: embedding, blocks in plan order, head.
        let mut keys: Vec<String> = Vec::new();
        let mut members: Vec<Vec<usize>> = Vec::new();
        let key_of: Vec<String> = names.iter().map(|n| unit_key(n)).collect();
        let mut order: Vec<String> = Vec::new();
        if key_of.iter().any(|k| k == "embedding") {
            order.push("embedding".into());
        }
        for k in &key_of {
            if k != "embedding" && k != "head" && !order.contains(k) {
                order.push(k.clone());
            }
        }
        if key_of.iter().any(|k| k == "head") {
            order.push("head".into());
        }
        for k in order {
            let idx: Vec<usize> = (0..names.len()).filter(|&i| key_of[i] == k).collect();
            keys.push(k);
            members.push(idx);
        }
        let mut offsets = vec![0usize; names.len()];
        let mut unit_of_param = vec![0usize; names.len()];
        let mut units = Vec::new();
        let (mut pos, mut local) = (0usize, 0usize);
        for (u, (name, params)) in keys.into_iter().zip(members).enumerate() {
            let start = pos;
            for &i in &params {
                offsets[i] = pos;
                unit_of_param[i] = u;
                pos += numels[i].div_ceil(ALIGN) * ALIGN;
            }
            let len = (pos - start).div_ceil(ALIGN * shards) * ALIGN * shards;
            pos = start + len;
            units.push(Unit {
                name,
                start,
                len,
                params,
                local_start: local,
            });
            local += len / shards;
        }
        Ok(FlatLayout {
            shards,
            rank,
            offsets,
            numels,
            groups,
            names,
            shapes,
            units,
            unit_of_param,
            numel: pos,
            local_len: local,
        })
    }

    /// Length of every rank's chunk of unit `u`.
    pub fn chunk_len(&self, u: usize) -> usize {
        self.units[u].len / self.shards
    }

    /// Flat range of rank `rank`'s chunk of unit `u`.
    pub fn chunk(&self, u: usize, rank: usize) -> Range<usize> {
        let c = self.chunk_len(u);
        let s = self.units[u].start + rank * c;
        s..s + c
    }

    /// The unit holding flat offset `off`.
    pub fn unit_of_offset(&self, off: usize) -> usize {
        self.units
            .partition_point(|u| u.start + u.len <= off)
            .min(self.units.len() - 1)
    }

    /// AdamW work items of this rank's chunk of unit `u` (padding excluded), each at most
    /// [`OPT_CHUNK`] elements and of one optimizer group.
    pub fn opt_chunks(&self, u: usize) -> Vec<OptChunk> {
        let own = self.chunk(u, self.rank);
        let mut out = Vec::new();
        for &i in &self.units[u].params {
            let t = self.offsets[i]..self.offsets[i] + self.numels[i];
            let (s, e) = (t.start.max(own.start), t.end.min(own.end));
            let mut o = s;
            while o < e {
                let len = (e - o).min(OPT_CHUNK);
                out.push(OptChunk {
                    offset: o - own.start,
                    len,
                    group: self.groups[i],
                });
                o += len;
            }
        }
        out
    }

    /// For every tensor, the pieces of it in rank `rank`'s local buffer:
    /// (plan index, element range of the tensor, offset in the local buffer).
    pub fn local_pieces(&self, rank: usize) -> Vec<(usize, Range<usize>, usize)> {
        let mut out = Vec::new();
        for (u, unit) in self.units.iter().enumerate() {
            let own = self.chunk(u, rank);
            for &i in &unit.params {
                let t = self.offsets[i]..self.offsets[i] + self.numels[i];
                let (s, e) = (t.start.max(own.start), t.end.min(own.end));
                if s < e {
                    out.push((
                        i,
                        s - t.start..e - t.start,
                        unit.local_start + (s - own.start),
                    ));
                }
            }
        }
        out
    }

    /// This rank's local buffer cut from full tensors in plan order (padding zero).
    pub fn local_from_full(&self, full: &[&[f32]]) -> Result<Vec<f32>> {
        let mut out = vec![0.0f32; self.local_len];
        for (i, range, at) in self.local_pieces(self.rank) {
            let t = full.get(i).ok_or_else(|| {
                RuntimeError::Message(format!("flat layout: tensor {} missing", self.names[i]))
            })?;
            if t.len() != self.numels[i] {
                return Err(RuntimeError::Message(format!(
                    "`{}` has {} values, expected {}",
                    self.names[i],
                    t.len(),
                    self.numels[i]
                )));
            }
            out[at..at + range.len()].copy_from_slice(&t[range]);
        }
        Ok(out)
    }

    /// Where rank `rank` keeps a state that only the tensors `has(plan index)` carry (AdamW's
    /// `exp_avg_sq`, which Muon matrices lack): their pieces of the local buffer, in local
    /// order, each at a 64-aligned start of a compact buffer.
    pub fn compact_state(&self, rank: usize, has: &dyn Fn(usize) -> bool) -> CompactState {
        let mut pieces = Vec::new();
        let mut len = 0;
        for (i, range, at) in self.local_pieces(rank) {
            if has(i) {
                pieces.push((at..at + range.len(), len));
                len += range.len().div_ceil(ALIGN) * ALIGN;
            }
        }
        CompactState {
            pieces,
            len,
            local_len: self.local_len,
        }
    }

    /// Length every rank allocates for [`Self::compact_state`]: the longest rank's (at least
    /// one aligned block), so the buffers are alike on every rank.
    pub fn compact_state_len(&self, has: &dyn Fn(usize) -> bool) -> usize {
        (0..self.shards)
            .map(|r| self.compact_state(r, has).len)
            .max()
            .unwrap_or(0)
            .max(ALIGN)
    }

    /// The manifest of a state stored as one local buffer per rank (files `<prefix>.shard-…`).
    pub fn manifest(&self, sharding: Sharding, gpus_per_node: usize, prefix: &str) -> Manifest {
        let mut tensors: Vec<TensorEntry> = self
            .names
            .iter()
            .enumerate()
            .map(|(i, n)| TensorEntry {
                name: n.clone(),
                shape: self.shapes[i].clone(),
                offset: self.offsets[i],
                pieces: vec![],
            })
            .collect();
        for shard in 0..self.shards {
            for (i, range, at) in self.local_pieces(shard) {
                tensors[i].pieces.push(PieceEntry {
                    shard,
                    range: [range.start, range.end],
                    shard_offset: at,
                });
            }
        }
        Manifest {
            format: FORMAT.into(),
            world: self.shards,
            gpus_per_node,
            layout: sharding,
            state: State::Optimizer,
            shard_len: self.local_len,
            files: (0..self.shards)
                .map(|shard| ShardFile {
                    shard,
                    rank: shard,
                    file: shard_file_name(prefix, shard, self.shards),
                })
                .collect(),
            tensors,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensors() -> Vec<(String, Vec<usize>, usize)> {
        let mut v = vec![("transformer.wte.weight".to_string(), vec![50, 7], 1)];
        for l in 0..3 {
            v.push((format!("transformer.h.{l}.norm_1.weight"), vec![7], 1));
            v.push((
                format!("transformer.h.{l}.attn.attn.weight"),
                vec![21, 7],
                0,
            ));
            v.push((format!("transformer.h.{l}.mlp.w1.weight"), vec![300, 7], 0));
        }
        v.push(("transformer.ln_f.weight".to_string(), vec![7], 1));
        v.push(("lm_head.weight".to_string(), vec![50, 7], 0));
        v
    }

    #[test]
    fn compact_state_keeps_only_the_chosen_tensors_and_round_trips() {
        // group 0 tensors (attention and MLP matrices, lm_head) have no second moment
        let has = |l: &FlatLayout| {
            let groups = l.groups.clone();
            move |i: usize| groups[i] == 1
        };
        for shards in [1, 2, 3, 4, 8] {
            let mut longest = 0;
            for rank in 0..shards {
                let l = FlatLayout::from_tensors(tensors(), shards, rank).unwrap();
                let c = l.compact_state(rank, &has(&l));
                longest = longest.max(c.len);
                let kept: usize = l
                    .local_pieces(rank)
                    .iter()
                    .filter(|(i, _, _)| l.groups[*i] == 1)
                    .map(|(_, r, _)| r.len())
                    .sum();
                assert!(c.len >= kept && c.len < kept + 64 * l.names.len());
                // every kept local element has its own compact slot; the others none
                let local: Vec<f32> = (0..l.local_len).map(|k| k as f32 + 1.0).collect();
                let mut seen = vec![false; c.len];
                for (i, r, at) in l.local_pieces(rank) {
                    for k in at..at + r.len() {
                        match c.index(k) {
                            Some(j) => {
                                assert_eq!(l.groups[i], 1);
                                assert!(!seen[j]);
                                seen[j] = true;
                                assert_eq!(j % 64, (k - at) % 64, "aligned pieces");
                            }
                            None => assert_eq!(l.groups[i], 0),
                        }
                    }
                }
                let packed = c.from_local(&local, c.len + 64).unwrap();
                let back = c.to_local(&packed).unwrap();
                for k in 0..l.local_len {
                    let want = if c.index(k).is_some() { local[k] } else { 0.0 };
                    assert_eq!(back[k], want);
                }
                assert!(c.from_local(&local, c.len.saturating_sub(1)).is_err() || c.len == 0);
                assert!(c.to_local(&packed[..c.len.saturating_sub(1)]).is_err() || c.len == 0);
            }
            let l = FlatLayout::from_tensors(tensors(), shards, 0).unwrap();
            assert_eq!(l.compact_state_len(&has(&l)), longest.max(64));
        }
    }

    #[test]
    fn units_are_aligned_and_cut_into_equal_chunks() {
        for shards in [1, 2, 3, 4, 8] {
            let l = FlatLayout::from_tensors(tensors(), shards, 0).unwrap();
            let names: Vec<&str> = l.units.iter().map(|u| u.name.as_str()).collect();
            assert_eq!(
                names,
                [
                    "embedding",
                    "transformer.h.0",
                    "transformer.h.1",
                    "transformer.h.2",
                    "head"
                ]
            );
            let mut pos = 0;
            for (u, unit) in l.units.iter().enumerate() {
                assert_eq!(unit.start, pos);
                assert_eq!(unit.len % (64 * shards), 0);
                assert_eq!(l.chunk_len(u) % 64, 0);
                pos += unit.len;
            }
            assert_eq!(pos, l.numel);
            assert_eq!(l.local_len * shards, l.numel);
            for (i, &o) in l.offsets.iter().enumerate() {
                assert_eq!(o % 64, 0);
                let u = l.unit_of_param[i];
                assert_eq!(l.unit_of_offset(o), u);
                assert!(o + l.numels[i] <= l.units[u].start + l.units[u].len);
            }
        }
    }

    #[test]
    fn every_element_is_owned_once_and_opt_chunks_cover_the_owned_part() {
        for shards in [1, 2, 4] {
            let mut seen: Vec<Vec<u32>> = tensors()
                .iter()
                .map(|(_, s, _)| vec![0; s.iter().product()])
                .collect();
            for rank in 0..shards {
                let l = FlatLayout::from_tensors(tensors(), shards, rank).unwrap();
                let pieces = l.local_pieces(rank);
                let mut covered = 0;
                for (i, r, at) in &pieces {
                    assert!(at + r.len() <= l.local_len);
                    for e in r.clone() {
                        seen[*i][e] += 1;
                    }
                    covered += r.len();
                }
                let opt: usize = (0..l.units.len())
                    .flat_map(|u| l.opt_chunks(u))
                    .map(|c| c.len)
                    .sum();
                assert_eq!(opt, covered);
                for u in 0..l.units.len() {
                    for c in l.opt_chunks(u) {
                        assert!(c.offset + c.len <= l.chunk_len(u));
                        assert!(c.len <= OPT_CHUNK);
                    }
                }
            }
            assert!(seen.iter().flatten().all(|&c| c == 1));
        }
    }

    #[test]
    fn manifest_of_local_buffers_gathers_the_full_tensors() {
        let shards = 4;
        let full: Vec<Vec<f32>> = tensors()
            .iter()
            .enumerate()
            .map(|(i, (_, s, _))| {
                (0..s.iter().product::<usize>())
                    .map(|e| (i * 1000 + e) as f32)
                    .collect()
            })
            .collect();
        let refs: Vec<&[f32]> = full.iter().map(|v| v.as_slice()).collect();
        let locals: Vec<Vec<f32>> = (0..shards)
            .map(|r| {
                FlatLayout::from_tensors(tensors(), shards, r)
                    .unwrap()
                    .local_from_full(&refs)
                    .unwrap()
            })
            .collect();
        let l = FlatLayout::from_tensors(tensors(), shards, 0).unwrap();
        let m = l.manifest(Sharding::Zero1, 4, "optimizer.exp_avg");
        let back = m.gather(&locals).unwrap();
        for (t, f) in back.iter().zip(&full) {
            assert_eq!(&t.data, f, "{}", t.name);
        }
        // and re-cut for another world from the gathered tensors
        let refs2: Vec<&[f32]> = back.iter().map(|t| t.data.as_slice()).collect();
        let l3 = FlatLayout::from_tensors(tensors(), 3, 2).unwrap();
        let local3 = l3.local_from_full(&refs2).unwrap();
        assert_eq!(local3.len(), l3.local_len);
    }
}
