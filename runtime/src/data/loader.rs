//! Training and validation loaders in ArchScale's order (arch-spec §4.2).
//!
//! * Files: sorted `{dir}/{prefix}*.bin`, then `random.seed(seed); random.shuffle(files)`
//!   (CPython's MT19937, reproduced exactly); rank r of W takes `files[r : (n//W)*W : W]`.
//! * Each file holds `chunk_size // block_size` non-overlapping blocks (tail unused). The
//!   iterator loads `n_chunks` files at a time and walks a permutation of all their blocks
//!   drawn by `np.random.default_rng(seed + rank)` (NumPy's PCG64, reproduced exactly);
//!   the same generator continues across refills. When fewer than `n_chunks` files remain
//!   it wraps to file 0 (drop_last: the tail files are skipped that pass).
//! * Several sources: per row, `random.Random(seed).choices(sources, weights)` picks one.
//!
//! Deliberate differences, none of which changes the order of a valid ArchScale setup:
//! a rank with fewer files than `n_chunks` loads all of them at once (ArchScale raises
//! IndexError); blocks per file are counted per file (ArchScale assumes every file has the
//! first file's size); token ids are checked against the vocabulary.

use super::packed::{list_shards, PackedFile};
use super::rng::{NumpyPcg64, Pcg64State, PyRandom, PyRandomState};
use super::synthetic;
use crate::{Result, RuntimeError};
use archscale_compiler::{DataPlan, DataSource, Plan};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// ArchScale's validation iterator loads `ceil(8 / nodes)` files at a time.
const VAL_CHUNKS_PER_NODE_GROUP: usize = 8;

/// Which split a source is read for (the synthetic corpus holds both).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Train,
    Validation,
}

/// Where built-in synthetic corpora are generated (once) under the data root: a cache,
/// kept out of the way of the user's own files.
pub const SYNTHETIC_CACHE_DIR: &str = ".archscale/synthetic";

/// Where a [`DataSource`] lives on disk for a split. Relative packed directories resolve
/// against `data_root` (the working directory of `archscale run`, as ArchScale's paths do).
pub fn resolve_source(
    source: &DataSource,
    split: Split,
    data_root: &Path,
) -> Result<(PathBuf, String)> {
    match source {
        DataSource::Packed { dir, prefix, .. } => {
            let dir = Path::new(dir);
            let dir = if dir.is_absolute() {
                dir.to_path_buf()
            } else {
                data_root.join(dir)
            };
            Ok((dir, prefix.clone()))
        }
        DataSource::Synthetic { seed, tokens, .. }
        | DataSource::SyntheticText { seed, tokens, .. } => {
            let kind = match source {
                DataSource::SyntheticText { .. } => synthetic::CorpusKind::Text,
                _ => synthetic::CorpusKind::Ids,
            };
            let cache = data_root.join(SYNTHETIC_CACHE_DIR);
            let dir = synthetic::ensure_corpus_of(kind, &cache, *seed, *tokens)?;
            let prefix = match split {
                Split::Train => synthetic::TRAIN_PREFIX,
                Split::Validation => synthetic::VALIDATION_PREFIX,
            };
            Ok((dir, prefix.to_string()))
        }
    }
}

fn source_weight(source: &DataSource) -> f64 {
    match source {
        DataSource::Packed { weight, .. }
        | DataSource::Synthetic { weight, .. }
        | DataSource::SyntheticText { weight, .. } => *weight,
    }
}

/// Files of one source for one rank, in ArchScale's order.
pub fn rank_files(
    dir: &Path,
    prefix: &str,
    seed: u64,
    rank: usize,
    world: usize,
) -> Result<Vec<PathBuf>> {
    if world == 0 || rank >= world {
        return Err(RuntimeError::Message(format!(
            "rank {rank} is outside a world of {world}"
        )));
    }
    let mut files = list_shards(dir, prefix)?;
    if files.is_empty() {
        return Err(RuntimeError::BadInput {
            path: dir.join(format!("{prefix}*.bin")),
            line: None,
            reason: "no packed shards match".into(),
        });
    }
    PyRandom::new(seed).shuffle(&mut files);
    let usable = files.len() / world * world;
    let mine: Vec<PathBuf> = files[..usable]
        .iter()
        .skip(rank)
        .step_by(world)
        .cloned()
        .collect();
    if mine.is_empty() {
        return Err(RuntimeError::BadInput {
            path: dir.join(format!("{prefix}*.bin")),
            line: None,
            reason: format!(
                "{} shard(s) for a world of {world}: rank {rank} gets none (each rank takes files[r : (n//W)*W : W]); \
                 write at least {world} shards (smaller --chunk-size) or use fewer ranks",
                files.len()
            ),
        });
    }
    Ok(mine)
}

/// One source as one rank iterates it (litgpt `PackedDatasetIterator`).
struct SourceIter {
    label: String,
    files: Vec<PathBuf>,
    /// Blocks in each of `files`.
    blocks_per_file: Vec<usize>,
    block_size: usize,
    n_chunks: usize,
    shuffle: bool,
    wrap: bool,
    vocab_limit: Option<u32>,
    rng: NumpyPcg64,
    /// Index of the next file to load.
    file_idx: usize,
    /// First file of the loaded group.
    group_start: usize,
    loaded: Vec<PackedFile>,
    /// Cumulative block counts of the loaded files (starts with 0).
    group_offsets: Vec<usize>,
    /// The generator before `order` was drawn (what a checkpoint stores).
    rng_before: Pcg64State,
    order: Vec<u32>,
    cursor: usize,
}

/// Resumable position of one source.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceState {
    pub label: String,
    pub n_files: usize,
    pub group_start: usize,
    pub rng_before: Pcg64State,
    pub cursor: usize,
}

struct SourceConfig {
    block_size: usize,
    n_chunks: usize,
    shuffle: bool,
    wrap: bool,
    vocab_limit: Option<u32>,
    block_seed: u64,
}

impl SourceIter {
    fn new(label: String, files: Vec<PathBuf>, config: &SourceConfig) -> Result<SourceIter> {
        let mut blocks_per_file = Vec::with_capacity(files.len());
        for path in &files {
            let header = PackedFile::read_header(path)?;
            let blocks = header.chunk_size / config.block_size;
            if blocks == 0 {
                return Err(RuntimeError::BadInput {
                    path: path.clone(),
                    line: None,
                    reason: format!(
                        "holds {} tokens, fewer than one block of {} (sequence length + 1)",
                        header.chunk_size, config.block_size
                    ),
                });
            }
            blocks_per_file.push(blocks);
        }
        let rng = NumpyPcg64::new(config.block_seed);
        let mut iter = SourceIter {
            label,
            n_chunks: config.n_chunks.clamp(1, files.len()),
            files,
            blocks_per_file,
            block_size: config.block_size,
            shuffle: config.shuffle,
            wrap: config.wrap,
            vocab_limit: config.vocab_limit,
            rng_before: rng.state(),
            rng,
            file_idx: 0,
            group_start: 0,
            loaded: Vec::new(),
            group_offsets: vec![0],
            order: Vec::new(),
            cursor: 0,
        };
        iter.load_group()?;
        Ok(iter)
    }

    /// Loads the next `n_chunks` files; false when exhausted and not wrapping.
    fn load_group(&mut self) -> Result<bool> {
        if self.n_chunks > self.files.len() - self.file_idx {
            if !self.wrap {
                return Ok(false);
            }
            self.file_idx = 0;
        }
        self.group_start = self.file_idx;
        let range = self.file_idx..self.file_idx + self.n_chunks;
        self.loaded = self.files[range.clone()]
            .iter()
            .map(|p| PackedFile::open(p))
            .collect::<Result<_>>()?;
        self.group_offsets = std::iter::once(0)
            .chain(self.blocks_per_file[range].iter().scan(0, |sum, &b| {
                *sum += b;
                Some(*sum)
            }))
            .collect();
        self.file_idx += self.n_chunks;
        let n_blocks = self.group_offsets[self.n_chunks];
        self.rng_before = self.rng.state();
        self.order = if self.shuffle {
            self.rng.permutation(n_blocks)
        } else {
            (0..n_blocks as u32).collect()
        };
        self.cursor = 0;
        Ok(true)
    }

    /// Appends the next block to `out`; false when exhausted (validation only).
    fn next_block(&mut self, out: &mut Vec<u32>) -> Result<bool> {
        if self.cursor >= self.order.len() && !self.load_group()? {
            return Ok(false);
        }
        let block = self.order[self.cursor] as usize;
        let file = self.group_offsets.partition_point(|&o| o <= block) - 1;
        let start = (block - self.group_offsets[file]) * self.block_size;
        let packed = &self.loaded[file];
        let before = out.len();
        packed.read_tokens(start, self.block_size, out)?;
        if let Some(limit) = self.vocab_limit {
            if let Some(i) = out[before..].iter().position(|&t| t >= limit) {
                let offset = super::packed::HEADER_SIZE + (start + i) * packed.dtype().itemsize();
                return Err(RuntimeError::CorruptShard {
                    path: packed.path().to_path_buf(),
                    offset: offset as u64,
                    reason: format!(
                        "token id {} is outside the model's vocabulary of {limit}",
                        out[before + i]
                    ),
                });
            }
        }
        self.cursor += 1;
        Ok(true)
    }

    /// Moves past the next block without reading it (what [`Self::next_block`] would
    /// consume); false when exhausted.
    fn skip_block(&mut self) -> Result<bool> {
        if self.cursor >= self.order.len() && !self.load_group()? {
            return Ok(false);
        }
        self.cursor += 1;
        Ok(true)
    }

    fn state(&self) -> SourceState {
        SourceState {
            label: self.label.clone(),
            n_files: self.files.len(),
            group_start: self.group_start,
            rng_before: self.rng_before.clone(),
            cursor: self.cursor,
        }
    }

    fn restore(&mut self, state: &SourceState) -> Result<()> {
        let label = self.label.clone();
        let mismatch = |what: String| {
            RuntimeError::Message(format!(
                "data loader state does not fit source {label}: {what}"
            ))
        };
        if state.label != self.label || state.n_files != self.files.len() {
            return Err(mismatch(format!(
                "saved for {} with {} files, this rank has {} files",
                state.label,
                state.n_files,
                self.files.len()
            )));
        }
        if state.group_start + self.n_chunks > self.files.len() {
            return Err(mismatch(format!(
                "group start {} out of range",
                state.group_start
            )));
        }
        self.rng = NumpyPcg64::from_state(&state.rng_before)
            .ok_or_else(|| mismatch("unreadable generator state".into()))?;
        self.file_idx = state.group_start;
        self.load_group()?;
        if state.cursor > self.order.len() {
            return Err(mismatch(format!(
                "cursor {} beyond {} blocks",
                state.cursor,
                self.order.len()
            )));
        }
        self.cursor = state.cursor;
        Ok(())
    }
}

/// Mixture of sources: per row, a seeded weighted choice (ArchScale `CombinedDataset`).
struct Mixture {
    sources: Vec<SourceIter>,
    cum_weights: Vec<f64>,
    rng: PyRandom,
}

impl Mixture {
    fn new(
        sources: &[DataSource],
        split: Split,
        data_root: &Path,
        seed: u64,
        rank: usize,
        world: usize,
        config: &SourceConfig,
    ) -> Result<Mixture> {
        let weights: Vec<f64> = sources.iter().map(source_weight).collect();
        if weights.iter().any(|w| !w.is_finite() || *w < 0.0) || weights.iter().sum::<f64>() <= 0.0
        {
            return Err(RuntimeError::Message(format!(
                "data source weights must be finite, non-negative and not all zero, got {weights:?}"
            )));
        }
        // pretrain.py normalises, then `choices` accumulates.
        let total: f64 = weights.iter().sum();
        let cum_weights = weights
            .iter()
            .scan(0.0, |acc, w| {
                *acc += w / total;
                Some(*acc)
            })
            .collect();
        let mut iters = Vec::with_capacity(sources.len());
        for source in sources {
            let (dir, prefix) = resolve_source(source, split, data_root)?;
            let files = rank_files(&dir, &prefix, seed, rank, world)?;
            let label = format!("{}/{prefix}*.bin", dir.display());
            iters.push(SourceIter::new(label, files, config)?);
        }
        Ok(Mixture {
            sources: iters,
            cum_weights,
            rng: PyRandom::new(seed),
        })
    }

    fn next_block(&mut self, out: &mut Vec<u32>) -> Result<bool> {
        let pick = self.rng.choice_weighted(&self.cum_weights);
        self.sources[pick].next_block(out)
    }

    /// As [`Self::next_block`], without reading the block: the same draws, no data.
    fn skip_block(&mut self) -> Result<bool> {
        let pick = self.rng.choice_weighted(&self.cum_weights);
        self.sources[pick].skip_block()
    }
}

/// Resumable position of a [`TrainLoader`]; stored beside a checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoaderState {
    pub rank: usize,
    pub world: usize,
    pub block_size: usize,
    pub rows_served: u64,
    pub mixture_rng: PyRandomState,
    pub sources: Vec<SourceState>,
}

/// Endless training rows of `block_size = T + 1` tokens in ArchScale's order.
pub struct TrainLoader {
    mixture: Mixture,
    rank: usize,
    world: usize,
    block_size: usize,
    rows_served: u64,
}

impl TrainLoader {
    /// The loader for `rank` of `world`; relative source dirs and synthetic corpora resolve
    /// under `data_root`. Token ids are checked against the model's vocabulary.
    pub fn new(plan: &Plan, rank: usize, world: usize, data_root: &Path) -> Result<TrainLoader> {
        Self::from_data_plan(
            &plan.data,
            Some(plan.model.vocab_size),
            rank,
            world,
            data_root,
        )
    }

    /// As [`TrainLoader::new`] from the data section alone (`vocab_limit`: reject ids >= it).
    pub fn from_data_plan(
        data: &DataPlan,
        vocab_limit: Option<usize>,
        rank: usize,
        world: usize,
        data_root: &Path,
    ) -> Result<TrainLoader> {
        if data.train.is_empty() {
            return Err(RuntimeError::Message(
                "the plan has no training data sources".into(),
            ));
        }
        if data.block_size < 2 {
            return Err(RuntimeError::Message(format!(
                "block size {} is below 2",
                data.block_size
            )));
        }
        let config = SourceConfig {
            block_size: data.block_size,
            n_chunks: data.n_chunks,
            shuffle: true,
            wrap: true,
            vocab_limit: vocab_limit.map(|v| v.min(u32::MAX as usize) as u32),
            block_seed: data.seed + rank as u64,
        };
        let mixture = Mixture::new(
            &data.train,
            Split::Train,
            data_root,
            data.seed,
            rank,
            world,
            &config,
        )?;
        Ok(TrainLoader {
            mixture,
            rank,
            world,
            block_size: data.block_size,
            rows_served: 0,
        })
    }

    /// Tokens per row (T + 1).
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Rows handed out since the start of training.
    pub fn rows_served(&self) -> u64 {
        self.rows_served
    }

    /// The next `rows` rows, concatenated: `rows * (T + 1)` tokens.
    pub fn next_batch(&mut self, rows: usize) -> Result<Vec<u32>> {
        let mut out = Vec::with_capacity(rows * self.block_size);
        for _ in 0..rows {
            if !self.mixture.next_block(&mut out)? {
                return Err(RuntimeError::Message(
                    "training data ended; the training loader wraps".into(),
                ));
            }
            self.rows_served += 1;
        }
        Ok(out)
    }

    /// Moves past the next `rows` rows without reading their tokens: where `rows` calls of
    /// `next_batch(1)` would leave the loader (a resume on another world size replays the
    /// consumed micro-batches this way).
    pub fn skip_rows(&mut self, rows: u64) -> Result<()> {
        for _ in 0..rows {
            if !self.mixture.skip_block()? {
                return Err(RuntimeError::Message(
                    "training data ended; the training loader wraps".into(),
                ));
            }
            self.rows_served += 1;
        }
        Ok(())
    }

    pub fn state(&self) -> LoaderState {
        LoaderState {
            rank: self.rank,
            world: self.world,
            block_size: self.block_size,
            rows_served: self.rows_served,
            mixture_rng: self.mixture.rng.state(),
            sources: self.mixture.sources.iter().map(SourceIter::state).collect(),
        }
    }

    /// Continues exactly where `state` was taken.
    pub fn restore(&mut self, state: &LoaderState) -> Result<()> {
        if (state.rank, state.world, state.block_size) != (self.rank, self.world, self.block_size) {
            return Err(RuntimeError::Message(format!(
                "data loader state is for rank {} of {} with block {}, this loader is rank {} of {} with block {}",
                state.rank, state.world, state.block_size, self.rank, self.world, self.block_size
            )));
        }
        if state.sources.len() != self.mixture.sources.len() {
            return Err(RuntimeError::Message(format!(
                "data loader state has {} sources, the plan has {}",
                state.sources.len(),
                self.mixture.sources.len()
            )));
        }
        let rng = PyRandom::from_state(&state.mixture_rng).ok_or_else(|| {
            RuntimeError::Message("data loader state: unreadable mixture generator".into())
        })?;
        for (source, saved) in self.mixture.sources.iter_mut().zip(&state.sources) {
            source.restore(saved)?;
        }
        self.mixture.rng = rng;
        self.rows_served = state.rows_served;
        Ok(())
    }
}

/// Validation rows of `val_block_size` tokens, read sequentially (no shuffle, no wrap):
/// every loader built from the same plan yields the same rows.
pub struct ValLoader {
    sources: Vec<DataSource>,
    data_root: PathBuf,
    seed: u64,
    rank: usize,
    world: usize,
    config_block_size: usize,
    n_chunks: usize,
    vocab_limit: Option<u32>,
}

impl ValLoader {
    pub fn new(plan: &Plan, rank: usize, world: usize, data_root: &Path) -> Result<ValLoader> {
        let n_chunks = VAL_CHUNKS_PER_NODE_GROUP.div_ceil(plan.layout.nodes.max(1));
        Self::from_data_plan(
            &plan.data,
            Some(plan.model.vocab_size),
            n_chunks,
            rank,
            world,
            data_root,
        )
    }

    pub fn from_data_plan(
        data: &DataPlan,
        vocab_limit: Option<usize>,
        n_chunks: usize,
        rank: usize,
        world: usize,
        data_root: &Path,
    ) -> Result<ValLoader> {
        let loader = ValLoader {
            sources: data.val.clone(),
            data_root: data_root.to_path_buf(),
            seed: data.seed,
            rank,
            world,
            config_block_size: data.val_block_size,
            n_chunks,
            vocab_limit: vocab_limit.map(|v| v.min(u32::MAX as usize) as u32),
        };
        // Open (and for synthetic sources, generate) now so errors surface before training.
        if !loader.is_empty() {
            loader.mixture()?;
        }
        Ok(loader)
    }

    /// No validation sources in the plan.
    pub fn is_empty(&self) -> bool {
        self.sources.is_empty()
    }

    /// Tokens per row (`num_extrapol * T + 1`).
    pub fn block_size(&self) -> usize {
        self.config_block_size
    }

    fn mixture(&self) -> Result<Mixture> {
        let config = SourceConfig {
            block_size: self.config_block_size,
            n_chunks: self.n_chunks,
            shuffle: false,
            wrap: false,
            vocab_limit: self.vocab_limit,
            block_seed: self.seed + self.rank as u64,
        };
        Mixture::new(
            &self.sources,
            Split::Validation,
            &self.data_root,
            self.seed,
            self.rank,
            self.world,
            &config,
        )
    }

    /// Up to `n_batches` batches of `rows` rows (each `rows * block_size` tokens), always
    /// the same ones. Fewer when the validation data runs out (an error if not even one
    /// batch fits); empty without sources.
    pub fn batches(&self, n_batches: usize, rows: usize) -> Result<Vec<Vec<u32>>> {
        if self.is_empty() || rows == 0 {
            return Ok(Vec::new());
        }
        let mut mixture = self.mixture()?;
        let mut batches = Vec::with_capacity(n_batches);
        'outer: for _ in 0..n_batches {
            let mut batch = Vec::with_capacity(rows * self.config_block_size);
            for _ in 0..rows {
                if !mixture.next_block(&mut batch)? {
                    break 'outer;
                }
            }
            batches.push(batch);
        }
        if batches.is_empty() && n_batches > 0 {
            return Err(RuntimeError::Message(format!(
                "validation data of rank {} holds fewer than {rows} rows of {} tokens",
                self.rank, self.config_block_size
            )));
        }
        Ok(batches)
    }
}
