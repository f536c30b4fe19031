//! The built-in synthetic corpus: deterministic, no downloads, structured so a small model's
//! loss visibly falls.
//!
//! Vocabulary of 512 ids: 1 = BOS (the shard separator), 2 = EOS (ends every document),
//! 3..=7 punctuation and markers, 8..=63 keys, 64..=511 word pieces. The language is fixed
//! (built from a constant seed); the corpus seed only picks the samples:
//!
//! * prose: sentences of 3..=10 words from 12 word classes x 32 words (a first-order Markov
//!   chain over classes, Zipf-distributed words within a class); a word is 1..=3 pieces, so
//!   later pieces are predictable from the first;
//! * recall (40% of documents): `<kv> k1 = v1 , ... ? kj = vj , ... .` — a key-value list
//!   then queries whose answers must be copied from earlier in the context (attention).
//!
//! The generator adds up `-ln p` of every random choice it makes: the entropy of the
//! process per token, an upper bound on the best achievable loss: about 1.9 nats/token,
//! against 5.3 for the unigram distribution, 2.4 for bigrams and ln 512 = 6.24 for a
//! uniform guess. It is written to `synthetic.json`. Generation runs at about 30M
//! tokens/s on one core.
//!
//! Layout on disk: `train_*.bin` (about `tokens` tokens, at least 8 files once `tokens`
//! exceeds 8 x 65568) and 8 `validation_*.bin` files (about 1/8 as many tokens, at least
//! 8 x 65568), u16 LITPKDS, drawn from two independent streams of the same seed.

use super::packed::{Dtype, FinalChunk, PackedWriter};
use crate::{Result, RuntimeError};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const VOCAB_SIZE: usize = 512;
pub const BOS: u32 = 1;
pub const EOS: u32 = 2;
pub const TRAIN_PREFIX: &str = "train";
pub const VALIDATION_PREFIX: &str = "validation";
/// Written last into a complete corpus directory.
pub const MANIFEST: &str = "synthetic.json";
/// Changes whenever the generated tokens would change.
pub const GENERATOR: &str = "archscale-synthetic-v1";

const PERIOD: u32 = 3;
const COMMA: u32 = 4;
const KV: u32 = 5;
const EQUALS: u32 = 6;
const QUERY: u32 = 7;
const KEY_BASE: u32 = 8;
const N_KEYS: u32 = 56;
const PIECE_BASE: u32 = 64;
const N_PIECES: u32 = 448;
const N_CLASSES: usize = 12;
const WORDS_PER_CLASS: usize = 32;
const N_WORDS: usize = N_CLASSES * WORDS_PER_CLASS;
const LANGUAGE_SEED: u64 = 0x5eed_1a46;
const RECALL_PROBABILITY: f64 = 0.4;
const VALIDATION_FILES: usize = 8;
/// Chunk sizes are multiples of 2049 tokens, like ArchScale's 2049 * 1024.
const CHUNK_GRAIN: u64 = 2049;

/// Categorical distribution sampled from one 32-bit draw.
pub(crate) struct Categorical {
    /// Cumulative probabilities scaled to 2^32; the last is 2^32.
    thresholds: Vec<u64>,
    neg_ln_p: Vec<f64>,
}

impl Categorical {
    pub(crate) fn new(weights: &[f64]) -> Categorical {
        let total: f64 = weights.iter().sum();
        let mut cum = 0.0;
        let mut thresholds: Vec<u64> = weights
            .iter()
            .map(|w| {
                cum += w / total;
                (cum * 4_294_967_296.0).round() as u64
            })
            .collect();
        if let Some(last) = thresholds.last_mut() {
            *last = 1 << 32;
        }
        Categorical {
            thresholds,
            neg_ln_p: weights.iter().map(|w| -(w / total).ln()).collect(),
        }
    }

    pub(crate) fn sample(&self, source: &mut Source) -> usize {
        let x = source.rng.next_u32() as u64;
        let i = self.thresholds.partition_point(|&t| t <= x);
        source.neg_log_prob += self.neg_ln_p[i];
        i
    }
}

/// Random draws plus the running `-ln p` of every choice.
pub(crate) struct Source {
    rng: ChaCha8Rng,
    pub(crate) neg_log_prob: f64,
}

impl Source {
    /// Stream `stream` of `seed`.
    pub(crate) fn new(seed: u64, stream: u64) -> Source {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(stream);
        Source {
            rng,
            neg_log_prob: 0.0,
        }
    }

    /// Uniform in [0, n) (multiply-shift; the bias is below 2^-20 for n < 4096).
    pub(crate) fn uniform(&mut self, n: u32) -> u32 {
        self.neg_log_prob += (n as f64).ln();
        ((self.rng.next_u32() as u64 * n as u64) >> 32) as u32
    }

    pub(crate) fn bernoulli(&mut self, p: f64) -> bool {
        let hit = (self.rng.next_u32() as f64) < p * 4_294_967_296.0;
        self.neg_log_prob -= if hit { p.ln() } else { (1.0 - p).ln() };
        hit
    }
}

/// The fixed language: lexicon, class chain and word frequencies.
struct Language {
    /// Pieces of each word; word `class * WORDS_PER_CLASS + rank`.
    words: Vec<Vec<u32>>,
    start_class: Categorical,
    next_class: Vec<Categorical>,
    /// Zipf(1) over a class's words, by rank.
    word_rank: Categorical,
}

impl Language {
    fn new() -> Language {
        let mut rng = ChaCha8Rng::seed_from_u64(LANGUAGE_SEED);
        let mut below = |n: u32| ((rng.next_u32() as u64 * n as u64) >> 32) as u32;
        let words = (0..N_WORDS)
            .map(|_| {
                let len = match below(20) {
                    0..=5 => 1,
                    6..=14 => 2,
                    _ => 3,
                };
                (0..len).map(|_| PIECE_BASE + below(N_PIECES)).collect()
            })
            .collect();
        let next_class = (0..N_CLASSES)
            .map(|_| {
                let mut weights = vec![0.0; N_CLASSES];
                for (k, w) in [0.6, 0.3, 0.1].into_iter().enumerate() {
                    // Three distinct successors.
                    let mut c = below(N_CLASSES as u32) as usize;
                    while weights[c] > 0.0 {
                        c = (c + 1 + k) % N_CLASSES;
                    }
                    weights[c] = w;
                }
                Categorical::new(&weights)
            })
            .collect();
        let start: Vec<f64> = (0..N_CLASSES)
            .map(|c| if c < 3 { 1.0 } else { 0.0 })
            .collect();
        let zipf: Vec<f64> = (1..=WORDS_PER_CLASS).map(|r| 1.0 / r as f64).collect();
        Language {
            words,
            start_class: Categorical::new(&start),
            next_class,
            word_rank: Categorical::new(&zipf),
        }
    }
}

/// Deterministic stream of synthetic documents.
pub struct Generator {
    language: Language,
    source: Source,
    tokens: u64,
}

impl Generator {
    /// Stream `stream` (0 train, 1 validation) of corpus `seed`.
    pub fn new(seed: u64, stream: u64) -> Generator {
        Generator {
            language: Language::new(),
            source: Source::new(seed, stream),
            tokens: 0,
        }
    }

    /// Appends one document, ending with EOS.
    pub fn document(&mut self, out: &mut Vec<u32>) {
        let start = out.len();
        let sentences = 1 + self.source.uniform(6);
        let recall_at = if self.source.bernoulli(RECALL_PROBABILITY) {
            Some(self.source.uniform(sentences + 1))
        } else {
            None
        };
        for s in 0..sentences {
            if recall_at == Some(s) {
                self.recall(out);
            }
            self.sentence(out);
        }
        if recall_at == Some(sentences) {
            self.recall(out);
        }
        out.push(EOS);
        self.tokens += (out.len() - start) as u64;
    }

    fn sentence(&mut self, out: &mut Vec<u32>) {
        let lang = &self.language;
        let mut class = lang.start_class.sample(&mut self.source);
        let n_words = 3 + self.source.uniform(8);
        for _ in 0..n_words {
            let rank = lang.word_rank.sample(&mut self.source);
            out.extend_from_slice(&lang.words[class * WORDS_PER_CLASS + rank]);
            class = lang.next_class[class].sample(&mut self.source);
        }
        out.push(PERIOD);
    }

    fn recall(&mut self, out: &mut Vec<u32>) {
        out.push(KV);
        let pairs = 2 + self.source.uniform(5) as usize;
        let mut keys = [0u32; 6];
        let mut values = [0usize; 6];
        for i in 0..pairs {
            // Distinct keys: the j-th is uniform over the keys not yet used.
            let mut pick = self.source.uniform(N_KEYS - i as u32);
            let mut key = 0;
            loop {
                if !keys[..i].contains(&key) {
                    if pick == 0 {
                        break;
                    }
                    pick -= 1;
                }
                key += 1;
            }
            keys[i] = key;
            values[i] = self.source.uniform(N_WORDS as u32) as usize;
            out.extend_from_slice(&[KEY_BASE + key, EQUALS]);
            out.extend_from_slice(&self.language.words[values[i]]);
            out.push(COMMA);
        }
        let queries = 1 + self.source.uniform(3);
        for _ in 0..queries {
            let j = self.source.uniform(pairs as u32) as usize;
            out.extend_from_slice(&[QUERY, KEY_BASE + keys[j], EQUALS]);
            out.extend_from_slice(&self.language.words[values[j]]);
            out.push(COMMA);
        }
        out.push(PERIOD);
    }

    /// Entropy of the generating process so far, nats per token.
    pub fn entropy_per_token(&self) -> f64 {
        if self.tokens == 0 {
            0.0
        } else {
            self.source.neg_log_prob / self.tokens as f64
        }
    }
}

/// A deterministic stream of documents (token ids, each ending with EOS).
pub trait Documents {
    fn document(&mut self, out: &mut Vec<u32>);
    /// Entropy of the generating process so far, nats per token.
    fn entropy_per_token(&self) -> f64;
}

impl Documents for Generator {
    fn document(&mut self, out: &mut Vec<u32>) {
        Generator::document(self, out)
    }
    fn entropy_per_token(&self) -> f64 {
        Generator::entropy_per_token(self)
    }
}

/// The built-in corpora.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CorpusKind {
    /// Token ids from a fixed artificial language (this module).
    Ids,
    /// English-like text in byte tokens ([`super::synthetic_text`]).
    Text,
}

impl CorpusKind {
    pub fn generator_name(self) -> &'static str {
        match self {
            CorpusKind::Ids => GENERATOR,
            CorpusKind::Text => super::synthetic_text::GENERATOR,
        }
    }

    pub fn vocab_size(self) -> usize {
        match self {
            CorpusKind::Ids => VOCAB_SIZE,
            CorpusKind::Text => super::synthetic_text::VOCAB_SIZE,
        }
    }

    /// Stream `stream` (0 train, 1 validation) of corpus `seed`.
    pub fn documents(self, seed: u64, stream: u64) -> Box<dyn Documents> {
        match self {
            CorpusKind::Ids => Box::new(Generator::new(seed, stream)),
            CorpusKind::Text => Box::new(super::synthetic_text::TextGenerator::new(seed, stream)),
        }
    }

    /// Name of the cached directory of corpus `(seed, tokens)`.
    pub fn dir_name(self, seed: u64, tokens: u64) -> String {
        match self {
            CorpusKind::Ids => format!("synthetic-{seed}-{tokens}"),
            CorpusKind::Text => format!("synthetic-text-{seed}-{tokens}"),
        }
    }
}

/// What a corpus directory holds (`synthetic.json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub generator: String,
    pub seed: u64,
    pub tokens: u64,
    pub vocab_size: usize,
    pub bos: u32,
    pub eos: u32,
    pub chunk_size: usize,
    pub train_files: usize,
    /// Validation shards hold `validation_chunk_size` tokens each.
    #[serde(default)]
    pub validation_chunk_size: usize,
    pub validation_files: usize,
    /// Entropy of the generating process on the train split (an upper bound on the best loss).
    pub entropy_nats_per_token: f64,
}

/// Chunk size and file counts for a corpus of about `tokens` training tokens: at least 8
/// training files once the corpus is large enough, chunks of 32..1024 x 2049 tokens.
fn layout(tokens: u64) -> (usize, usize) {
    let grains = tokens.div_ceil(8).div_ceil(CHUNK_GRAIN).clamp(32, 1024);
    let chunk = grains * CHUNK_GRAIN;
    (chunk as usize, tokens.div_ceil(chunk).max(1) as usize)
}

/// Validation shards: 8 of them (one per rank up to 8 ranks) of an eighth of a training
/// shard, at least 32 x 2049 tokens: about 1/8 of the training tokens for large corpora.
fn validation_chunk(train_chunk: usize) -> usize {
    let grains = (train_chunk as u64 / 8).div_ceil(CHUNK_GRAIN).max(32);
    ((grains * CHUNK_GRAIN) as usize).min(train_chunk)
}

fn write_split(
    dir: &Path,
    prefix: &str,
    mut generator: Box<dyn Documents>,
    chunk: usize,
    files: usize,
) -> Result<Box<dyn Documents>> {
    let mut writer = PackedWriter::new(dir, prefix, chunk, Dtype::U16, BOS)?;
    let mut doc = Vec::with_capacity(512);
    while writer.files_written() < files {
        doc.clear();
        generator.document(&mut doc);
        writer.add_document(&doc)?;
    }
    // The spill of the last document past the final file is generated data, not input.
    writer.finish(FinalChunk::Drop)?;
    Ok(generator)
}

/// Writes the id corpus `(seed, tokens)` into `dir` (created if needed) and returns its manifest.
pub fn write_corpus(dir: &Path, seed: u64, tokens: u64) -> Result<Manifest> {
    write_corpus_of(CorpusKind::Ids, dir, seed, tokens)
}

/// Writes corpus `kind` `(seed, tokens)` into `dir` (created if needed).
pub fn write_corpus_of(kind: CorpusKind, dir: &Path, seed: u64, tokens: u64) -> Result<Manifest> {
    if tokens == 0 {
        return Err(RuntimeError::Message(
            "synthetic corpus: tokens must be positive".into(),
        ));
    }
    let (chunk, train_files) = layout(tokens);
    let train = write_split(
        dir,
        TRAIN_PREFIX,
        kind.documents(seed, 0),
        chunk,
        train_files,
    )?;
    let val_chunk = validation_chunk(chunk);
    write_split(
        dir,
        VALIDATION_PREFIX,
        kind.documents(seed, 1),
        val_chunk,
        VALIDATION_FILES,
    )?;
    let manifest = Manifest {
        generator: kind.generator_name().into(),
        seed,
        tokens,
        vocab_size: kind.vocab_size(),
        bos: BOS,
        eos: EOS,
        chunk_size: chunk,
        train_files,
        validation_chunk_size: val_chunk,
        validation_files: VALIDATION_FILES,
        entropy_nats_per_token: train.entropy_per_token(),
    };
    let path = dir.join(MANIFEST);
    let json = serde_json::to_string_pretty(&manifest)
        .map_err(|e| RuntimeError::Message(e.to_string()))?;
    std::fs::write(&path, json + "\n").map_err(|e| RuntimeError::Io {
        context: format!("writing {}", path.display()),
        source: e,
    })?;
    Ok(manifest)
}

fn read_manifest(dir: &Path) -> Result<Manifest> {
    let path = dir.join(MANIFEST);
    let text = std::fs::read_to_string(&path).map_err(|e| RuntimeError::Io {
        context: format!("reading {}", path.display()),
        source: e,
    })?;
    serde_json::from_str(&text).map_err(|e| RuntimeError::BadInput {
        path: path.clone(),
        line: Some(e.line()),
        reason: format!("not a synthetic corpus manifest: {e}"),
    })
}

/// `<data_root>/synthetic-<seed>-<tokens>/`, generated on first use (into a temporary
/// directory renamed into place, so concurrent ranks and interrupted runs are safe).
pub fn ensure_corpus(data_root: &Path, seed: u64, tokens: u64) -> Result<PathBuf> {
    ensure_corpus_of(CorpusKind::Ids, data_root, seed, tokens)
}

/// As [`ensure_corpus`] for corpus `kind` (`synthetic-text-<seed>-<tokens>/` for text).
pub fn ensure_corpus_of(
    kind: CorpusKind,
    data_root: &Path,
    seed: u64,
    tokens: u64,
) -> Result<PathBuf> {
    let name = kind.dir_name(seed, tokens);
    let generator = kind.generator_name();
    let dir = data_root.join(&name);
    let check = |dir: &Path| -> Result<PathBuf> {
        let manifest = read_manifest(dir)?;
        if manifest.generator != generator || manifest.seed != seed || manifest.tokens != tokens {
            return Err(RuntimeError::BadInput {
                path: dir.join(MANIFEST),
                line: None,
                reason: format!(
                    "holds {} (seed {}, {} tokens), expected {generator} (seed {seed}, {tokens} tokens); delete the directory to regenerate it",
                    manifest.generator, manifest.seed, manifest.tokens
                ),
            });
        }
        Ok(dir.to_path_buf())
    };
    if dir.exists() {
        return check(&dir);
    }
    let io = |context: String| move |e| RuntimeError::Io { context, source: e };
    std::fs::create_dir_all(data_root).map_err(io(format!("creating {}", data_root.display())))?;
    let tmp = data_root.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(format!("removing {}", tmp.display())))?;
    }
    if let Err(e) = write_corpus_of(kind, &tmp, seed, tokens) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if let Err(e) = std::fs::rename(&tmp, &dir) {
        let _ = std::fs::remove_dir_all(&tmp);
        if dir.exists() {
            // Another process finished first.
            return check(&dir);
        }
        return Err(RuntimeError::Io {
            context: format!("renaming into {}", dir.display()),
            source: e,
        });
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::packed::{list_shards, PackedFile};

    fn stream(seed: u64, stream_id: u64, n: usize) -> (Vec<u32>, f64) {
        let mut g = Generator::new(seed, stream_id);
        let mut out = Vec::new();
        while out.len() < n {
            g.document(&mut out);
        }
        (out, g.entropy_per_token())
    }

    fn fnv1a(tokens: &[u32]) -> u64 {
        tokens
            .iter()
            .flat_map(|t| t.to_le_bytes())
            .fold(0xcbf2_9ce4_8422_2325, |h, b| {
                (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
            })
    }

    #[test]
    fn ids_are_in_range_and_documents_end_with_eos() {
        let (tokens, _) = stream(1, 0, 50_000);
        assert!(tokens.iter().all(|&t| (2..VOCAB_SIZE as u32).contains(&t)));
        assert_eq!(tokens.last(), Some(&EOS));
        assert!(!tokens.contains(&BOS));
    }

    #[test]
    fn streams_are_reproducible_and_distinct() {
        let (a, ea) = stream(7, 0, 20_000);
        let (b, eb) = stream(7, 0, 20_000);
        assert_eq!(a, b);
        assert_eq!(ea, eb);
        let (c, _) = stream(7, 1, 20_000);
        let (d, _) = stream(8, 0, 20_000);
        assert_ne!(a[..1000], c[..1000]);
        assert_ne!(a[..1000], d[..1000]);
        // Pinned so a change to the generator is noticed (bump GENERATOR when it changes).
        assert_eq!(
            fnv1a(&a[..20_000]),
            PINNED_SEED7_HASH,
            "generator output changed"
        );
    }

    /// The corpus has learnable structure: the process entropy is far below both the
    /// uniform guess and the unigram entropy a model reaches without context.
    #[test]
    fn entropy_floor_is_well_below_unigram() {
        let (tokens, floor) = stream(3, 0, 300_000);
        let mut counts = vec![0f64; VOCAB_SIZE];
        tokens.iter().for_each(|&t| counts[t as usize] += 1.0);
        let n = tokens.len() as f64;
        let unigram: f64 = counts
            .iter()
            .filter(|&&c| c > 0.0)
            .map(|&c| -(c / n) * (c / n).ln())
            .sum();
        assert!(floor < 3.0, "process entropy {floor}");
        assert!(
            floor < unigram - 1.5,
            "process entropy {floor} vs unigram {unigram}"
        );
        assert!(unigram < (VOCAB_SIZE as f64).ln());
    }

    #[test]
    fn corpus_files_are_bit_for_bit_reproducible() {
        let a = tempfile::tempdir().expect("tempdir");
        let b = tempfile::tempdir().expect("tempdir");
        let ma = write_corpus(a.path(), 5, 300_000).expect("write");
        let mb = write_corpus(b.path(), 5, 300_000).expect("write");
        assert_eq!(ma, mb);
        let names = |d: &Path| -> Vec<String> {
            let mut v: Vec<String> = std::fs::read_dir(d)
                .expect("dir")
                .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        assert_eq!(names(a.path()), names(b.path()));
        for name in names(a.path()) {
            let fa = std::fs::read(a.path().join(&name)).expect("read");
            let fb = std::fs::read(b.path().join(&name)).expect("read");
            assert!(fa == fb, "{name} differs");
        }
        let train = list_shards(a.path(), TRAIN_PREFIX).expect("list");
        assert_eq!(train.len(), ma.train_files);
        assert!(ma.train_files * ma.chunk_size >= 300_000);
        let file = PackedFile::open(&train[0]).expect("open");
        assert_eq!(file.dtype(), Dtype::U16);
        assert_eq!(
            list_shards(a.path(), VALIDATION_PREFIX)
                .expect("list")
                .len(),
            VALIDATION_FILES
        );
    }

    #[test]
    fn ensure_generates_once_and_checks_the_manifest() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = ensure_corpus(root.path(), 9, 100_000).expect("generate");
        assert_eq!(dir, root.path().join("synthetic-9-100000"));
        let modified = std::fs::metadata(dir.join(MANIFEST))
            .and_then(|m| m.modified())
            .expect("mtime");
        assert_eq!(ensure_corpus(root.path(), 9, 100_000).expect("reuse"), dir);
        let again = std::fs::metadata(dir.join(MANIFEST))
            .and_then(|m| m.modified())
            .expect("mtime");
        assert_eq!(modified, again);
        // A directory of the same name that is not this corpus is an error, not overwritten.
        std::fs::write(dir.join(MANIFEST), "{\"generator\": \"other\"}").expect("write");
        assert!(ensure_corpus(root.path(), 9, 100_000).is_err());
    }

    #[test]
    fn layout_scales_with_tokens() {
        assert_eq!(layout(1), (32 * 2049, 1));
        let (chunk, files) = layout(2_000_000);
        assert_eq!(chunk % 2049, 0);
        assert_eq!(files, 8);
        assert_eq!(layout(10_000_000_000).0, 2049 * 1024);
        assert_eq!(validation_chunk(2049 * 1024), 2049 * 128);
        assert_eq!(validation_chunk(32 * 2049), 32 * 2049);
    }

    const PINNED_SEED7_HASH: u64 = 2370179420429429826;
}
