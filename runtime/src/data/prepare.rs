//! `archscale prepare`: text or JSONL -> tokenized documents -> packed LITPKDS shards.
//!
//! Documents are read in input order, tokenized in parallel (rayon) in batches, then
//! written in order, so the shards do not depend on the number of threads. Each document
//! gets EOS appended (ArchScale: `tokens + [EOS]`, no BOS). A document goes to validation
//! when a hash of (seed, document index) falls below the validation fraction.
//! Everything is written into a hidden staging directory inside the output directory and
//! moved into place only when all input was read: bad input leaves no shard behind.

use super::packed::{
    list_shards, Dtype, FinalChunk, PackedWriter, WriteSummary, ARCHSCALE_CHUNK_SIZE,
};
use super::synthetic;
use crate::{Result, RuntimeError};
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// GPT-2's `<|endoftext|>`.
pub const GPT2_EOS: u32 = 50256;
/// Text handed to the tokenizers per parallel batch.
const BATCH_BYTES: usize = 8 << 20;
const BATCH_DOCS: usize = 8192;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenizerChoice {
    /// Built-in GPT-2 BPE (tiktoken `r50k_base`, ranks embedded in the binary).
    Gpt2,
    /// A Hugging Face `tokenizer.json`.
    HuggingFace(PathBuf),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputFormat {
    /// `.jsonl`, `.ndjson` and `.json` are JSONL, anything else plain text.
    Auto,
    Text,
    Jsonl,
}

/// How plain text is cut into documents (JSONL: one document per line, always).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DocSplit {
    /// Each file is one document.
    File,
    /// Paragraphs separated by one or more blank lines.
    BlankLine,
    /// Each non-empty line.
    Line,
}

#[derive(Clone, Debug)]
pub struct PrepareOptions {
    pub inputs: Vec<PathBuf>,
    pub out_dir: PathBuf,
    pub tokenizer: TokenizerChoice,
    /// Appended to every document; default: the tokenizer's end-of-text token.
    pub eos_id: Option<u32>,
    /// Fills the unused tail of the last shard; default: BOS if the tokenizer has one, else EOS.
    pub sep_id: Option<u32>,
    pub format: InputFormat,
    pub doc_split: DocSplit,
    /// JSONL field holding the text.
    pub text_field: String,
    /// Fraction of documents sent to validation (0 = none).
    pub val_fraction: f64,
    pub seed: u64,
    pub chunk_size: usize,
    pub final_chunk: FinalChunk,
    pub train_prefix: String,
    pub val_prefix: String,
    /// Replace shards with the same prefixes already in the output directory.
    pub overwrite: bool,
    pub progress: bool,
}

impl PrepareOptions {
    pub fn new(inputs: Vec<PathBuf>, out_dir: PathBuf) -> PrepareOptions {
        PrepareOptions {
            inputs,
            out_dir,
            tokenizer: TokenizerChoice::Gpt2,
            eos_id: None,
            sep_id: None,
            format: InputFormat::Auto,
            doc_split: DocSplit::BlankLine,
            text_field: "text".into(),
            val_fraction: 0.01,
            seed: 3407,
            chunk_size: ARCHSCALE_CHUNK_SIZE,
            final_chunk: FinalChunk::Pad,
            train_prefix: "train".into(),
            val_prefix: "validation".into(),
            overwrite: false,
            progress: false,
        }
    }
}

/// Counts for one split.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct SplitSummary {
    pub documents: u64,
    pub tokens: u64,
    pub shards: Vec<PathBuf>,
    pub padding_tokens: u64,
    pub dropped_tokens: u64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct PrepareSummary {
    pub tokenizer: String,
    pub vocab_size: usize,
    pub eos_id: u32,
    pub sep_id: u32,
    pub dtype: Dtype,
    pub chunk_size: usize,
    pub files_read: usize,
    pub bytes_read: u64,
    pub empty_documents_skipped: u64,
    pub train: SplitSummary,
    pub validation: SplitSummary,
    pub seconds: f64,
}

impl PrepareSummary {
    pub fn tokens_per_second(&self) -> f64 {
        (self.train.tokens + self.validation.tokens) as f64 / self.seconds.max(1e-9)
    }
}

fn bad_input(path: &Path, line: Option<usize>, reason: impl Into<String>) -> RuntimeError {
    RuntimeError::BadInput {
        path: path.to_path_buf(),
        line,
        reason: reason.into(),
    }
}

fn io_err(context: String) -> impl FnOnce(std::io::Error) -> RuntimeError {
    move |source| RuntimeError::Io { context, source }
}

enum Tokenizer {
    Gpt2(tiktoken_rs::CoreBPE),
    Hf(Box<tokenizers::Tokenizer>),
}

impl Tokenizer {
    fn load(choice: &TokenizerChoice) -> Result<Tokenizer> {
        match choice {
            TokenizerChoice::Gpt2 => tiktoken_rs::r50k_base().map(Tokenizer::Gpt2).map_err(|e| {
                RuntimeError::Message(format!("loading the built-in GPT-2 tokenizer: {e}"))
            }),
            TokenizerChoice::HuggingFace(path) => {
                if !path.is_file() {
                    return Err(bad_input(path, None, "tokenizer file not found"));
                }
                tokenizers::Tokenizer::from_file(path)
                    .map(|t| Tokenizer::Hf(Box::new(t)))
                    .map_err(|e| bad_input(path, None, format!("not a usable tokenizer.json: {e}")))
            }
        }
    }

    fn name(&self, choice: &TokenizerChoice) -> String {
        match choice {
            TokenizerChoice::Gpt2 => "gpt2 (r50k_base)".into(),
            TokenizerChoice::HuggingFace(path) => path.display().to_string(),
        }
    }

    fn vocab_size(&self) -> usize {
        match self {
            Tokenizer::Gpt2(_) => 50257,
            Tokenizer::Hf(t) => t.get_vocab_size(true),
        }
    }

    fn find_token(&self, candidates: &[&str]) -> Option<u32> {
        match self {
            Tokenizer::Gpt2(_) => None,
            Tokenizer::Hf(t) => candidates.iter().find_map(|c| t.token_to_id(c)),
        }
    }

    fn default_eos(&self) -> Option<u32> {
        match self {
            Tokenizer::Gpt2(_) => Some(GPT2_EOS),
            Tokenizer::Hf(_) => self.find_token(&[
                "</s>",
                "<|endoftext|>",
                "<|end_of_text|>",
                "<eos>",
                "<|eos|>",
                "<|im_end|>",
            ]),
        }
    }

    fn default_bos(&self) -> Option<u32> {
        self.find_token(&["<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>"])
    }

    fn encode(&self, text: &str) -> std::result::Result<Vec<u32>, String> {
        match self {
            // Special-token text inside documents is encoded as plain text.
            Tokenizer::Gpt2(bpe) => Ok(bpe.encode_ordinary(text)),
            Tokenizer::Hf(t) => t
                .encode_fast(text, false)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| e.to_string()),
        }
    }
}

/// Input files in order: files as given, directories walked recursively in name order
/// (hidden entries skipped).
fn expand_inputs(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(io_err(format!("listing {}", dir.display())))?
            .filter_map(|e| e.ok())
            .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
            .map(|e| e.path())
            .collect();
        entries.sort();
        for path in entries {
            if path.is_dir() {
                walk(&path, out)?;
            } else if path.is_file() {
                out.push(path);
            }
        }
        Ok(())
    }
    if inputs.is_empty() {
        return Err(RuntimeError::Message("no input files given".into()));
    }
    let mut files = Vec::new();
    for input in inputs {
        if input.is_dir() {
            walk(input, &mut files)?;
        } else if input.is_file() {
            files.push(input.clone());
        } else {
            return Err(bad_input(input, None, "no such file or directory"));
        }
    }
    if files.is_empty() {
        return Err(bad_input(&inputs[0], None, "no input files found"));
    }
    Ok(files)
}

fn is_jsonl(path: &Path, format: InputFormat) -> bool {
    match format {
        InputFormat::Jsonl => true,
        InputFormat::Text => false,
        InputFormat::Auto => {
            matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("jsonl" | "ndjson" | "json")
            )
        }
    }
}

/// Reads documents from the inputs in order and hands them over in batches.
struct DocumentReader<'a> {
    opts: &'a PrepareOptions,
    files: &'a [PathBuf],
    file_idx: usize,
    current: Option<(BufReader<std::fs::File>, usize)>,
    bytes_read: u64,
    empty_skipped: u64,
    line_buf: Vec<u8>,
}

impl<'a> DocumentReader<'a> {
    fn new(opts: &'a PrepareOptions, files: &'a [PathBuf]) -> DocumentReader<'a> {
        DocumentReader {
            opts,
            files,
            file_idx: 0,
            current: None,
            bytes_read: 0,
            empty_skipped: 0,
            line_buf: Vec::new(),
        }
    }

    /// Next line of the current file without its newline; None at end of file.
    fn read_line(&mut self) -> Result<Option<String>> {
        let path = &self.files[self.file_idx];
        let Some((reader, line_no)) = self.current.as_mut() else {
            return Ok(None);
        };
        self.line_buf.clear();
        let n = reader
            .read_until(b'\n', &mut self.line_buf)
            .map_err(io_err(format!("reading {}", path.display())))?;
        if n == 0 {
            return Ok(None);
        }
        *line_no += 1;
        self.bytes_read += n as u64;
        while matches!(self.line_buf.last(), Some(b'\n' | b'\r')) {
            self.line_buf.pop();
        }
        String::from_utf8(std::mem::take(&mut self.line_buf))
            .map(Some)
            .map_err(|e| {
                bad_input(
                    path,
                    Some(*line_no),
                    format!(
                        "not valid UTF-8 (byte {} of the line)",
                        e.utf8_error().valid_up_to()
                    ),
                )
            })
    }

    fn line_no(&self) -> usize {
        self.current.as_ref().map(|(_, l)| *l).unwrap_or(0)
    }

    /// The next document, or None when every file is read.
    fn next_document(&mut self) -> Result<Option<String>> {
        loop {
            if self.file_idx >= self.files.len() {
                return Ok(None);
            }
            let path = self.files[self.file_idx].clone();
            if self.current.is_none() {
                let file = std::fs::File::open(&path)
                    .map_err(|e| bad_input(&path, None, format!("cannot open: {e}")))?;
                self.current = Some((BufReader::with_capacity(1 << 20, file), 0));
            }
            let doc = if is_jsonl(&path, self.opts.format) {
                self.next_jsonl(&path)?
            } else {
                match self.opts.doc_split {
                    DocSplit::File => self.next_whole_file()?,
                    DocSplit::Line => self.next_nonblank_line()?,
                    DocSplit::BlankLine => self.next_paragraph()?,
                }
            };
            match doc {
                Some(text) if text.trim().is_empty() => self.empty_skipped += 1,
                Some(text) => return Ok(Some(text)),
                None => {
                    self.current = None;
                    self.file_idx += 1;
                }
            }
        }
    }

    fn next_jsonl(&mut self, path: &Path) -> Result<Option<String>> {
        loop {
            let Some(line) = self.read_line()? else {
                return Ok(None);
            };
            if line.trim().is_empty() {
                continue;
            }
            let line_no = self.line_no();
            let value: serde_json::Value = serde_json::from_str(&line)
                .map_err(|e| bad_input(path, Some(line_no), format!("invalid JSON: {e}")))?;
            let field = &self.opts.text_field;
            return match value.get(field) {
                Some(serde_json::Value::String(text)) => Ok(Some(text.clone())),
                Some(other) => Err(bad_input(
                    path,
                    Some(line_no),
                    format!(
                        "field \"{field}\" is {}, expected a string",
                        json_kind(other)
                    ),
                )),
                None => Err(bad_input(
                    path,
                    Some(line_no),
                    format!("no \"{field}\" field"),
                )),
            };
        }
    }

    /// The rest of the current file (all of it on the first call, None after).
    fn next_whole_file(&mut self) -> Result<Option<String>> {
        let path = &self.files[self.file_idx];
        let Some((reader, _)) = self.current.as_mut() else {
            return Ok(None);
        };
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(reader, &mut bytes)
            .map_err(io_err(format!("reading {}", path.display())))?;
        if bytes.is_empty() {
            return Ok(None);
        }
        self.bytes_read += bytes.len() as u64;
        String::from_utf8(bytes).map(Some).map_err(|e| {
            let valid = e.utf8_error().valid_up_to();
            let line = e.as_bytes()[..valid]
                .iter()
                .filter(|&&b| b == b'\n')
                .count()
                + 1;
            bad_input(path, Some(line), "not valid UTF-8")
        })
    }

    /// Blank lines separate documents; they are not empty documents.
    fn next_nonblank_line(&mut self) -> Result<Option<String>> {
        while let Some(line) = self.read_line()? {
            if !line.trim().is_empty() {
                return Ok(Some(line));
            }
        }
        Ok(None)
    }

    fn next_paragraph(&mut self) -> Result<Option<String>> {
        let mut text = String::new();
        while let Some(line) = self.read_line()? {
            if line.trim().is_empty() {
                if text.is_empty() {
                    continue;
                }
                return Ok(Some(text));
            }
            if !text.is_empty() {
                text.push('\n');
            }
            text.push_str(&line);
        }
        Ok((!text.is_empty()).then_some(text))
    }

    /// Up to BATCH_DOCS documents or BATCH_BYTES of text.
    fn next_batch(&mut self) -> Result<Vec<String>> {
        let mut batch = Vec::new();
        let mut bytes = 0;
        while batch.len() < BATCH_DOCS && bytes < BATCH_BYTES {
            match self.next_document()? {
                Some(doc) => {
                    bytes += doc.len();
                    batch.push(doc);
                }
                None => break,
            }
        }
        Ok(batch)
    }
}

fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// Deterministic uniform in [0, 1) from (seed, document index) (splitmix64).
fn split_draw(seed: u64, index: u64) -> f64 {
    let mut z = seed
        ^ index
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .wrapping_add(0x632b_e59b_d9b4_e019);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

/// A hidden directory inside `out_dir` where shards are written before being moved into
/// place; removed on drop unless committed.
pub struct Staging {
    out_dir: PathBuf,
    dir: PathBuf,
    prefixes: Vec<String>,
    committed: bool,
    /// The output directory did not exist before: removed again (if empty) on failure.
    created_out_dir: bool,
}

impl Staging {
    /// Fails (as invalid input) if `out_dir` already holds shards with these prefixes,
    /// unless `overwrite`.
    pub fn new(out_dir: &Path, prefixes: &[&str], overwrite: bool) -> Result<Staging> {
        if out_dir.exists() && !out_dir.is_dir() {
            return Err(bad_input(
                out_dir,
                None,
                "output path exists and is not a directory",
            ));
        }
        if out_dir.is_dir() && !overwrite {
            for prefix in prefixes {
                let existing = list_shards(out_dir, prefix)?;
                if let Some(first) = existing.first() {
                    return Err(bad_input(
                        out_dir,
                        None,
                        format!(
                            "already holds {} shard(s) matching {prefix}*.bin ({}); pass --force to replace them",
                            existing.len(),
                            first.display()
                        ),
                    ));
                }
            }
        }
        let created_out_dir = !out_dir.exists();
        std::fs::create_dir_all(out_dir)
            .map_err(io_err(format!("creating {}", out_dir.display())))?;
        let dir = out_dir.join(format!(".prepare-tmp-{}", std::process::id()));
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(io_err(format!("removing {}", dir.display())))?;
        }
        std::fs::create_dir(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
        Ok(Staging {
            out_dir: out_dir.to_path_buf(),
            dir,
            prefixes: prefixes.iter().map(|p| p.to_string()).collect(),
            committed: false,
            created_out_dir,
        })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Removes old shards of the prefixes (overwrite), then moves every staged file into
    /// the output directory. Returns the final paths of the staged files, in order.
    pub fn commit(mut self) -> Result<Vec<PathBuf>> {
        for prefix in &self.prefixes {
            for old in list_shards(&self.out_dir, prefix)? {
                std::fs::remove_file(&old)
                    .map_err(io_err(format!("removing {}", old.display())))?;
            }
        }
        let mut names: Vec<PathBuf> = std::fs::read_dir(&self.dir)
            .map_err(io_err(format!("listing {}", self.dir.display())))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        names.sort();
        let mut moved = Vec::with_capacity(names.len());
        for path in names {
            let Some(name) = path.file_name() else {
                continue;
            };
            let target = self.out_dir.join(name);
            std::fs::rename(&path, &target)
                .map_err(io_err(format!("moving {} into place", target.display())))?;
            moved.push(target);
        }
        self.committed = true;
        let _ = std::fs::remove_dir(&self.dir);
        Ok(moved)
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.dir);
            if self.created_out_dir {
                let _ = std::fs::remove_dir(&self.out_dir);
            }
        }
    }
}

fn relocate(paths: &[PathBuf], staging: &Path, out_dir: &Path) -> Vec<PathBuf> {
    paths
        .iter()
        .map(|p| {
            p.strip_prefix(staging)
                .map(|rel| out_dir.join(rel))
                .unwrap_or_else(|_| p.clone())
        })
        .collect()
}

fn split_summary(written: WriteSummary, staging: &Path, out_dir: &Path) -> SplitSummary {
    SplitSummary {
        documents: written.documents,
        tokens: written.tokens,
        shards: relocate(&written.files, staging, out_dir),
        padding_tokens: written.padding_tokens,
        dropped_tokens: written.dropped_tokens,
    }
}

/// Tokenizes the inputs into `{train_prefix}_*.bin` and `{val_prefix}_*.bin` shards.
pub fn prepare(opts: &PrepareOptions) -> Result<PrepareSummary> {
    let start = Instant::now();
    if !(0.0..=1.0).contains(&opts.val_fraction) {
        return Err(RuntimeError::Message(format!(
            "validation fraction {} is outside [0, 1]",
            opts.val_fraction
        )));
    }
    if opts.chunk_size == 0 {
        return Err(RuntimeError::Message("chunk size must be positive".into()));
    }
    if opts.train_prefix == opts.val_prefix {
        return Err(RuntimeError::Message(
            "train and validation prefixes must differ".into(),
        ));
    }
    let files = expand_inputs(&opts.inputs)?;
    let tokenizer = Tokenizer::load(&opts.tokenizer)?;
    let vocab_size = tokenizer.vocab_size();
    let eos_id = match opts.eos_id.or_else(|| tokenizer.default_eos()) {
        Some(id) => id,
        None => {
            let path = match &opts.tokenizer {
                TokenizerChoice::HuggingFace(p) => p.clone(),
                TokenizerChoice::Gpt2 => PathBuf::from("gpt2"),
            };
            return Err(bad_input(
                &path,
                None,
                "no end-of-text token found (</s>, <|endoftext|>, ...); pass --eos-id",
            ));
        }
    };
    let sep_id = opts
        .sep_id
        .or_else(|| tokenizer.default_bos())
        .unwrap_or(eos_id);
    let dtype = Dtype::for_vocab(vocab_size.max(eos_id as usize + 1).max(sep_id as usize + 1));

    let staging = Staging::new(
        &opts.out_dir,
        &[&opts.train_prefix, &opts.val_prefix],
        opts.overwrite,
    )?;
    let mut train = PackedWriter::new(
        staging.path(),
        &opts.train_prefix,
        opts.chunk_size,
        dtype,
        sep_id,
    )?;
    let mut val = PackedWriter::new(
        staging.path(),
        &opts.val_prefix,
        opts.chunk_size,
        dtype,
        sep_id,
    )?;

    let total_bytes: u64 = files
        .iter()
        .filter_map(|f| std::fs::metadata(f).ok())
        .map(|m| m.len())
        .sum();
    let bar = if opts.progress {
        ProgressBar::new(total_bytes)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {wide_bar} {binary_bytes}/{binary_total_bytes} ({binary_bytes_per_sec}, eta {eta}) {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );

    let mut reader = DocumentReader::new(opts, &files);
    let mut doc_index = 0u64;
    loop {
        let batch = reader.next_batch()?;
        if batch.is_empty() {
            break;
        }
        let encoded: Vec<std::result::Result<Vec<u32>, String>> = batch
            .par_iter()
            .map(|text| tokenizer.encode(text))
            .collect();
        for (i, tokens) in encoded.into_iter().enumerate() {
            let mut tokens = tokens.map_err(|e| {
                RuntimeError::Message(format!(
                    "tokenizing document {} failed: {e}",
                    doc_index + i as u64
                ))
            })?;
            tokens.push(eos_id);
            let to_val = split_draw(opts.seed, doc_index + i as u64) < opts.val_fraction;
            if to_val { &mut val } else { &mut train }.add_document(&tokens)?;
        }
        doc_index += batch.len() as u64;
        bar.set_position(reader.bytes_read);
        bar.set_message(format!("{doc_index} docs"));
    }
    bar.finish_and_clear();
    let files_read = files.len();
    let bytes_read = reader.bytes_read;
    let empty_documents_skipped = reader.empty_skipped;
    let staged_dir = staging.path().to_path_buf();
    let train = train.finish(opts.final_chunk)?;
    let val = val.finish(opts.final_chunk)?;
    staging.commit()?;
    Ok(PrepareSummary {
        tokenizer: tokenizer.name(&opts.tokenizer),
        vocab_size,
        eos_id,
        sep_id,
        dtype,
        chunk_size: opts.chunk_size,
        files_read,
        bytes_read,
        empty_documents_skipped,
        train: split_summary(train, &staged_dir, &opts.out_dir),
        validation: split_summary(val, &staged_dir, &opts.out_dir),
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Writes the synthetic corpus into `out_dir` (train and validation shards plus
/// `synthetic.json`), staged like [`prepare`].
pub fn prepare_synthetic(
    out_dir: &Path,
    seed: u64,
    tokens: u64,
    overwrite: bool,
) -> Result<synthetic::Manifest> {
    let staging = Staging::new(
        out_dir,
        &[synthetic::TRAIN_PREFIX, synthetic::VALIDATION_PREFIX],
        overwrite,
    )?;
    let manifest = synthetic::write_corpus(staging.path(), seed, tokens)?;
    staging.commit()?;
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::packed::PackedFile;

    fn read_all(paths: &[PathBuf]) -> Vec<u32> {
        paths
            .iter()
            .flat_map(|p| PackedFile::open(p).expect("open").tokens().expect("tokens"))
            .collect()
    }

    #[test]
    fn gpt2_tokenizes_offline() {
        let tok = Tokenizer::load(&TokenizerChoice::Gpt2).expect("gpt2");
        // "Hello world" in GPT-2 is [15496, 995].
        assert_eq!(tok.encode("Hello world").expect("encode"), vec![15496, 995]);
        assert_eq!(tok.default_eos(), Some(GPT2_EOS));
    }

    #[test]
    fn text_paragraphs_become_documents_with_eos() {
        let dir = tempfile::tempdir().expect("tempdir");
        let input = dir.path().join("a.txt");
        std::fs::write(&input, "Hello world\n\n\n  \nHello world\nHello\n").expect("write");
        let mut opts = PrepareOptions::new(vec![input], dir.path().join("out"));
        opts.val_fraction = 0.0;
        opts.chunk_size = 16;
        let summary = prepare(&opts).expect("prepare");
        assert_eq!(summary.train.documents, 2);
        assert_eq!(summary.validation.documents, 0);
        assert!(summary.validation.shards.is_empty());
        let tokens = read_all(&summary.train.shards);
        let tok = Tokenizer::load(&TokenizerChoice::Gpt2).expect("gpt2");
        let mut expected = tok.encode("Hello world").expect("encode");
        expected.push(GPT2_EOS);
        expected.extend(tok.encode("Hello world\nHello").expect("encode"));
        expected.push(GPT2_EOS);
        assert_eq!(summary.train.tokens, expected.len() as u64);
        expected.resize(16, GPT2_EOS);
        assert_eq!(tokens, expected);
        assert!(!dir
            .path()
            .join("out")
            .join(format!(".prepare-tmp-{}", std::process::id()))
            .exists());
    }

    /// A minimal word-level tokenizer.json: EOS found by name, BOS as the separator.
    const TINY_TOKENIZER: &str = r#"{
      "version": "1.0", "truncation": null, "padding": null,
      "added_tokens": [
        {"id": 0, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
        {"id": 1, "content": "</s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
      ],
      "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
      "model": {"type": "WordLevel", "vocab": {"<s>": 0, "</s>": 1, "hello": 2, "world": 3, "[UNK]": 4}, "unk_token": "[UNK]"}
    }"#;

    #[test]
    fn hugging_face_tokenizer_json() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tok_path = dir.path().join("tokenizer.json");
        std::fs::write(&tok_path, TINY_TOKENIZER).expect("write");
        let input = dir.path().join("a.jsonl");
        std::fs::write(
            &input,
            "{\"text\": \"hello world\"}\n{\"text\": \"world hello nope\"}\n",
        )
        .expect("write");
        let mut opts = PrepareOptions::new(vec![input], dir.path().join("out"));
        opts.tokenizer = TokenizerChoice::HuggingFace(tok_path.clone());
        opts.val_fraction = 0.0;
        opts.chunk_size = 10;
        let summary = prepare(&opts).expect("prepare");
        assert_eq!(
            (summary.eos_id, summary.sep_id, summary.vocab_size),
            (1, 0, 5)
        );
        assert_eq!(
            read_all(&summary.train.shards),
            vec![2, 3, 1, 3, 2, 4, 1, 0, 0, 0]
        );
        // A file that is not a tokenizer is invalid input.
        std::fs::write(&tok_path, "{}").expect("write");
        opts.overwrite = true;
        assert!(matches!(prepare(&opts), Err(RuntimeError::BadInput { .. })));
    }

    #[test]
    fn directories_and_document_splits() {
        let dir = tempfile::tempdir().expect("tempdir");
        let corpus = dir.path().join("corpus");
        std::fs::create_dir_all(corpus.join("sub")).expect("mkdir");
        std::fs::write(corpus.join("b.txt"), "one\n\ntwo\nthree\n").expect("write");
        std::fs::write(corpus.join("sub").join("a.txt"), "four\n").expect("write");
        std::fs::write(corpus.join(".hidden.txt"), "never\n").expect("write");
        std::fs::write(corpus.join("empty.txt"), "  \n").expect("write");
        let count = |split: DocSplit| {
            let mut opts = PrepareOptions::new(vec![corpus.clone()], dir.path().join("out"));
            opts.doc_split = split;
            opts.val_fraction = 0.0;
            opts.chunk_size = 64;
            opts.overwrite = true;
            let summary = prepare(&opts).expect("prepare");
            (
                summary.files_read,
                summary.train.documents,
                summary.empty_documents_skipped,
            )
        };
        // Files in name order: b.txt, empty.txt, sub/a.txt (the hidden file is skipped).
        assert_eq!(count(DocSplit::File), (3, 2, 1));
        assert_eq!(count(DocSplit::BlankLine), (3, 3, 0));
        assert_eq!(count(DocSplit::Line), (3, 4, 0));
    }

    #[test]
    fn split_is_deterministic_and_near_the_fraction() {
        let n = 20_000;
        let hits = (0..n).filter(|&i| split_draw(3407, i) < 0.1).count();
        assert!((1800..2200).contains(&hits), "{hits}");
        let again = (0..n).filter(|&i| split_draw(3407, i) < 0.1).count();
        assert_eq!(hits, again);
    }

    #[test]
    fn bad_json_names_the_line_and_leaves_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let input = dir.path().join("a.jsonl");
        std::fs::write(&input, "{\"text\": \"ok\"}\n{\"text\": \"ok\"\n").expect("write");
        let out = dir.path().join("out");
        let err = prepare(&PrepareOptions::new(vec![input], out.clone())).expect_err("bad json");
        match err {
            RuntimeError::BadInput { line, .. } => assert_eq!(line, Some(2)),
            other => panic!("unexpected {other}"),
        }
        assert!(
            !out.exists(),
            "the output directory it created is removed again"
        );
    }
}
