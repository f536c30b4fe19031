//! `archscale prepare`: tokenize text / JSONL into packed LITPKDS shards, or write the
//! built-in synthetic corpus.

use archscale_runtime::data::packed::{FinalChunk, ARCHSCALE_CHUNK_SIZE};
use archscale_runtime::data::prepare::{
    prepare, prepare_synthetic, DocSplit, InputFormat, PrepareOptions, PrepareSummary,
    SplitSummary, TokenizerChoice,
};
use archscale_runtime::RuntimeError;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

/// `println!` that ignores a closed stdout (`archscale prepare ... | head`).
macro_rules! say {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum FormatArg {
    /// `.jsonl`, `.ndjson`, `.json`: JSONL; anything else: plain text.
    Auto,
    Text,
    Jsonl,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum DocSplitArg {
    /// Each file is one document.
    File,
    /// Paragraphs separated by blank lines are documents.
    BlankLine,
    /// Each non-empty line is a document.
    Line,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum FinalChunkArg {
    /// Write the last partial shard, its tail filled with the separator token.
    Pad,
    /// Drop the last partial shard, as ArchScale's prepare_slimpajama.py does.
    Drop,
}

/// Tokenize text or JSONL into packed shards (`train_*.bin`, `validation_*.bin`), or write
/// the synthetic corpus with `--synthetic`.
#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
    archscale prepare corpus.jsonl --out data/mycorpus\n  \
    archscale prepare shakespeare.txt --out data/shakespeare --val-fraction 0.1 --chunk-size 32784\n  \
    archscale prepare docs/ --doc-split file --tokenizer tokenizer.json --out data/docs\n  \
    archscale prepare --synthetic --seed 1 --tokens 10000000 --out data/synthetic")]
pub struct Args {
    /// Text or JSONL files, or directories of them (walked recursively in name order).
    #[arg(required_unless_present = "synthetic", conflicts_with = "synthetic")]
    inputs: Vec<PathBuf>,
    /// Output directory for the shards.
    #[arg(long, short)]
    out: PathBuf,
    /// `gpt2` (built in, offline) or the path of a Hugging Face tokenizer.json.
    #[arg(long, default_value = "gpt2")]
    tokenizer: String,
    /// Token appended to every document [default: the tokenizer's end-of-text token].
    #[arg(long)]
    eos_id: Option<u32>,
    /// Token filling the unused tail of the last shard [default: BOS if any, else EOS].
    #[arg(long)]
    sep_id: Option<u32>,
    #[arg(long, value_enum, default_value_t = FormatArg::Auto)]
    format: FormatArg,
    /// How plain text splits into documents (JSONL: one document per line).
    #[arg(long, value_enum, default_value_t = DocSplitArg::BlankLine)]
    doc_split: DocSplitArg,
    /// JSONL field holding the text.
    #[arg(long, default_value = "text")]
    text_field: String,
    /// Fraction of documents written to validation shards (deterministic by --seed).
    #[arg(long, default_value_t = 0.01)]
    val_fraction: f64,
    /// Seed of the train/validation split, or of the synthetic corpus.
    #[arg(long, default_value_t = 3407)]
    seed: u64,
    /// Tokens per shard (ArchScale: 2049 * 1024).
    #[arg(long, default_value_t = ARCHSCALE_CHUNK_SIZE)]
    chunk_size: usize,
    /// What to do with the last, partly filled shard of each split.
    #[arg(long, value_enum, default_value_t = FinalChunkArg::Pad)]
    final_chunk: FinalChunkArg,
    #[arg(long, default_value = "train")]
    train_prefix: String,
    #[arg(long, default_value = "validation")]
    val_prefix: String,
    /// Replace shards with the same prefixes already in the output directory.
    #[arg(long)]
    force: bool,
    /// Write the built-in synthetic corpus (vocabulary 512) instead of tokenizing input.
    #[arg(long)]
    synthetic: bool,
    /// Training tokens of the synthetic corpus.
    #[arg(long, default_value_t = 10_000_000, requires = "synthetic")]
    tokens: u64,
    /// No progress bar.
    #[arg(long, short)]
    quiet: bool,
}

/// Invalid input exits 2; anything else (I/O, ...) 1.
fn exit_for(err: RuntimeError) -> miette::Result<ExitCode> {
    let code = match err {
        RuntimeError::BadInput { .. } | RuntimeError::CorruptShard { .. } => 2,
        RuntimeError::Message(_) => 2,
        _ => 1,
    };
    eprintln!("{:?}", miette::Report::new(err));
    Ok(ExitCode::from(code))
}

pub fn run(args: Args) -> miette::Result<ExitCode> {
    if args.synthetic {
        return match prepare_synthetic(&args.out, args.seed, args.tokens, args.force) {
            Ok(m) => {
                say!(
                    "synthetic corpus ({}) seed {} in {}\n  train:      {} shards x {} tokens\n  validation: {} shards x {} tokens\n  vocabulary {} (BOS {}, EOS {}), u16; process entropy {:.3} nats/token (uniform: {:.3})",
                    m.generator,
                    m.seed,
                    args.out.display(),
                    m.train_files,
                    m.chunk_size,
                    m.validation_files,
                    m.validation_chunk_size,
                    m.vocab_size,
                    m.bos,
                    m.eos,
                    m.entropy_nats_per_token,
                    (m.vocab_size as f64).ln()
                );
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => exit_for(e),
        };
    }
    let tokenizer = if args.tokenizer == "gpt2" {
        TokenizerChoice::Gpt2
    } else {
        TokenizerChoice::HuggingFace(PathBuf::from(&args.tokenizer))
    };
    let opts = PrepareOptions {
        inputs: args.inputs,
        out_dir: args.out.clone(),
        tokenizer,
        eos_id: args.eos_id,
        sep_id: args.sep_id,
        format: match args.format {
            FormatArg::Auto => InputFormat::Auto,
            FormatArg::Text => InputFormat::Text,
            FormatArg::Jsonl => InputFormat::Jsonl,
        },
        doc_split: match args.doc_split {
            DocSplitArg::File => DocSplit::File,
            DocSplitArg::BlankLine => DocSplit::BlankLine,
            DocSplitArg::Line => DocSplit::Line,
        },
        text_field: args.text_field,
        val_fraction: args.val_fraction,
        seed: args.seed,
        chunk_size: args.chunk_size,
        final_chunk: match args.final_chunk {
            FinalChunkArg::Pad => FinalChunk::Pad,
            FinalChunkArg::Drop => FinalChunk::Drop,
        },
        train_prefix: args.train_prefix,
        val_prefix: args.val_prefix,
        overwrite: args.force,
        progress: !args.quiet && std::io::stderr().is_terminal(),
    };
    match prepare(&opts) {
        Ok(summary) => {
            print_summary(&summary, &opts);
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => exit_for(e),
    }
}

fn print_summary(s: &PrepareSummary, opts: &PrepareOptions) {
    say!(
        "prepared {} file(s), {:.1} MiB, with {} (vocabulary {}, EOS {}, separator {}, {:?} shards of {} tokens) in {:.2} s, {:.0} tokens/s",
        s.files_read,
        s.bytes_read as f64 / (1 << 20) as f64,
        s.tokenizer,
        s.vocab_size,
        s.eos_id,
        s.sep_id,
        s.dtype,
        s.chunk_size,
        s.seconds,
        s.tokens_per_second()
    );
    let line = |name: &str, prefix: &str, split: &SplitSummary| {
        let mut text = format!(
            "  {name:<10} {:>9} documents {:>12} tokens {:>5} shards ({}/{prefix}_*.bin)",
            split.documents,
            split.tokens,
            split.shards.len(),
            opts.out_dir.display()
        );
        if split.padding_tokens > 0 {
            text += &format!(
                "; last shard padded with {} separator tokens",
                split.padding_tokens
            );
        }
        if split.dropped_tokens > 0 {
            text += &format!(
                "; {} tokens of the last partial shard dropped (--final-chunk drop)",
                split.dropped_tokens
            );
        }
        say!("{text}");
    };
    line("train", &opts.train_prefix, &s.train);
    line("validation", &opts.val_prefix, &s.validation);
    if s.empty_documents_skipped > 0 {
        say!("  skipped {} empty document(s)", s.empty_documents_skipped);
    }
    if opts.val_fraction > 0.0 && s.validation.documents == 0 {
        let hint = match opts.doc_split {
            DocSplit::File => "; a file is one document: try --doc-split blank-line",
            _ => "",
        };
        say!(
            "  note: no document went to validation ({} documents in all{hint})",
            s.train.documents
        );
    }
}
