//! `archscale eval CHECKPOINT_OR_RUN_DIR --task val|phonebook|niah|choice ...`: results as a
//! table (and `--json`), deterministic given the seed and the device. Every task runs on the
//! chosen backend: CUDA (bf16, as training; decoding re-runs the forward per new token,
//! choices are scored from the forward's losses) or the CPU (fp32; the decoder with caches).

use super::run::BackendChoice;
use archscale_runtime::eval::{
    choice, load_model, niah, phonebook, val, Decoder, EvalModel, LoadedModel, TextTokenizer,
    TokenizerChoice,
};
use archscale_runtime::{Backend, RuntimeError};
use serde_json::json;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Task {
    /// Validation loss and perplexity at 1×..k× the training context.
    Val,
    /// Phonebook look-up (ArchScale eval_phonebook.py protocol).
    Phonebook,
    /// Single needle in a haystack at chosen lengths × depths.
    Niah,
    /// Multiple-choice likelihood scoring of a JSONL file.
    Choice,
}

#[derive(clap::Args)]
pub struct Args {
    /// A checkpoint directory (<run>/checkpoints/step-N) or a run directory (its newest checkpoint).
    pub checkpoint: PathBuf,
    /// Tasks to run (repeat or comma-separate).
    #[arg(long = "task", value_enum, value_delimiter = ',', required = true)]
    pub tasks: Vec<Task>,
    /// Device of every task (auto: CUDA when available, else CPU with a warning).
    #[arg(long, value_enum, default_value = "auto")]
    pub backend: BackendChoice,
    /// Where relative data paths and synthetic corpora resolve (as for `archscale run`).
    #[arg(long, default_value = ".")]
    pub data_root: PathBuf,
    /// auto, gpt2, bytes, ids, or a path to a tokenizer.json.
    #[arg(long, default_value = "auto")]
    pub tokenizer: String,
    /// Seed of the Phonebook and NIAH prompts.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// val: largest context multiple k (default: the plan's num_extrapol).
    #[arg(long)]
    pub extrapolate: Option<usize>,
    /// val: batches per rank (default: the plan's eval_iters).
    #[arg(long)]
    pub val_batches: Option<usize>,
    /// phonebook: smallest book (entries).
    #[arg(long, default_value_t = 480)]
    pub min_size: usize,
    /// phonebook: largest book (entries).
    #[arg(long, default_value_t = 480)]
    pub max_size: usize,
    /// phonebook: number of book sizes between min and max.
    #[arg(long, default_value_t = 1)]
    pub num_eval: usize,
    /// phonebook: batches per size (over 4 measurements).
    #[arg(long, default_value_t = 8)]
    pub phonebook_batches: usize,
    /// Prompts decoded together, each with its own cache (phonebook: prompts per batch, as
    /// ArchScale; niah and choice: results do not depend on it).
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// niah: prompt lengths in tokens.
    #[arg(long, value_delimiter = ',', default_value = "1024,2048")]
    pub lengths: Vec<usize>,
    /// niah: needle depths as fractions of the haystack.
    #[arg(long, value_delimiter = ',', default_value = "0,0.25,0.5,0.75,1")]
    pub depths: Vec<f64>,
    /// niah: prompts per length × depth.
    #[arg(long, default_value_t = 4)]
    pub samples: usize,
    /// choice: JSONL items {"context", "choices", "label"} (e.g.
    /// experiments/evals/quickstart_choice.jsonl for the quickstart model).
    #[arg(long, visible_alias = "choices")]
    pub items: Option<PathBuf>,
    /// choice: longest input in tokens (default: the training context).
    #[arg(long)]
    pub max_length: Option<usize>,
    /// Print the results as JSON instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Also write the JSON results to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

fn fail(e: RuntimeError) -> miette::Result<ExitCode> {
    let input = matches!(e, RuntimeError::BadInput { .. });
    eprintln!("{:?}", miette::Report::new(e));
    Ok(ExitCode::from(if input { 2 } else { 1 }))
}

fn progress(task: &'static str) -> impl FnMut(usize, usize) {
    let tty = std::io::stderr().is_terminal();
    move |done, total| {
        if tty {
            eprint!("\r{task} {done}/{total}");
            if done == total {
                eprintln!();
            }
        }
    }
}

/// The backend of `val`: as `archscale run` chooses it (auto falls back to the CPU).
fn make_backend(
    choice: BackendChoice,
    plan: &archscale_compiler::Plan,
) -> archscale_runtime::Result<Box<dyn Backend>> {
    let cpu = || -> archscale_runtime::Result<Box<dyn Backend>> {
        Ok(Box::new(archscale_runtime::cpu_backend::CpuBackend::new(
            plan,
        )?))
    };
    match choice {
        BackendChoice::Cpu => cpu(),
        BackendChoice::Cuda => archscale_runtime::cuda_backend(plan),
        BackendChoice::Auto => archscale_runtime::cuda_backend(plan).or_else(|e| {
            eprintln!("warning: CUDA backend unavailable ({e}); running on the CPU");
            cpu()
        }),
    }
}

pub fn run(args: Args) -> miette::Result<ExitCode> {
    if args.tasks.contains(&Task::Choice) && args.items.is_none() {
        eprintln!("error: --task choice needs --items (or --choices) FILE.jsonl");
        return Ok(ExitCode::from(2));
    }
    let items = match &args.items {
        Some(p) if args.tasks.contains(&Task::Choice) => match choice::read_items(p) {
            Ok(i) => Some(i),
            Err(e) => return fail(e),
        },
        _ => None,
    };
    let model = match load_model(&args.checkpoint) {
        Ok(m) => m,
        Err(e) => return fail(e),
    };
    let needs_text = args.tasks.iter().any(|t| *t != Task::Val);
    let tokenizer = if needs_text {
        match TextTokenizer::load(&TokenizerChoice::parse(&args.tokenizer), &model.plan) {
            Ok(t) => Some(t),
            Err(e) => return fail(e),
        }
    } else {
        None
    };
    let mut backend = if args.tasks.contains(&Task::Val) {
        match make_backend(
            args.backend,
            &val::backend_plan(&model.plan, args.extrapolate),
        ) {
            Ok(b) => Some(b),
            Err(e) => return fail(e),
        }
    } else {
        None
    };
    let mut results = serde_json::Map::new();
    results.insert(
        "model".into(),
        json!({
            "run_name": model.plan.run_name,
            "checkpoint": model.checkpoint.display().to_string(),
            "step": model.step,
            "tokens": model.tokens,
        }),
    );
    let mut text = format!(
        "{} (step {}, {} tokens)\n",
        model.plan.run_name, model.step, model.tokens
    );
    for (k, task) in args.tasks.iter().enumerate() {
        // the decoding tasks build their own device backend: free val's once it is done
        if !args.tasks[k..].contains(&Task::Val) {
            backend = None;
        }
        let outcome = run_task(
            *task,
            &args,
            &model,
            backend.as_mut(),
            tokenizer.as_ref(),
            items.as_deref(),
            &mut text,
        );
        match outcome {
            Ok((name, value)) => {
                results.insert(name.into(), value);
            }
            Err(e) => return fail(e),
        }
    }
    let value = serde_json::Value::Object(results);
    let json_text = serde_json::to_string_pretty(&value)
        .map_err(|e| miette::miette!("encoding results: {e}"))?
        + "\n";
    if let Some(path) = &args.out {
        std::fs::write(path, &json_text)
            .map_err(|e| miette::miette!("writing {}: {e}", path.display()))?;
    }
    let out = if args.json { json_text } else { text };
    let _ = std::io::stdout().lock().write_all(out.as_bytes());
    Ok(ExitCode::SUCCESS)
}

fn run_task(
    task: Task,
    args: &Args,
    model: &archscale_runtime::eval::LoadedModel,
    backend: Option<&mut Box<dyn Backend>>,
    tokenizer: Option<&TextTokenizer>,
    items: Option<&[choice::ChoiceItem]>,
    text: &mut String,
) -> archscale_runtime::Result<(&'static str, serde_json::Value)> {
    match task {
        Task::Val => {
            let backend =
                backend.ok_or_else(|| RuntimeError::Message("no backend for val".into()))?;
            let r = val::evaluate(
                model,
                backend.as_mut(),
                &args.data_root,
                args.extrapolate,
                args.val_batches,
            )?;
            text.push_str(&format!(
                "\nval on {} ({} batches of {} rows, T = {})\n",
                r.backend, r.batches, r.rows_per_batch, r.seq_len
            ));
            text.push_str("  context  tokens  loss     ppl\n");
            for a in &r.at {
                text.push_str(&format!(
                    "  {:>5}x  {:>6}  {:<7.4}  {:.3}\n",
                    a.factor, a.context, a.loss, a.ppl
                ));
            }
            Ok(("val", js(&r)?))
        }
        Task::Phonebook => {
            let tok = tokenizer.ok_or_else(|| RuntimeError::Message("no tokenizer".into()))?;
            let opts = phonebook::PhonebookOptions {
                min_size: args.min_size,
                max_size: args.max_size,
                num_eval: args.num_eval,
                batches: args.phonebook_batches,
                batch_size: args.batch_size,
                seed: args.seed,
            };
            let longest = phonebook::longest_prompt(tok, &opts)?;
            let mut engine = Engine::new(args, model, longest + phonebook::MAX_NEW_TOKENS)?;
            let mut dec = engine.model(model.plan.model.vocab_size);
            let r = phonebook::evaluate(&mut dec, tok, &opts, progress("phonebook"))?;
            text.push_str(&format!(
                "\nphonebook (seed {}, greedy on {}, ≤{} new tokens, exact match)\n",
                args.seed,
                dec.name(),
                phonebook::MAX_NEW_TOKENS
            ));
            text.push_str("  entries  prompt tokens  accuracy (mean ± std over 4)\n");
            for s in &r {
                text.push_str(&format!(
                    "  {:>7}  {:>13.0}  {:.3} ± {:.3}\n",
                    s.size, s.prompt_tokens_mean, s.accuracy_mean, s.accuracy_std
                ));
            }
            Ok((
                "phonebook",
                json!({ "options": opts, "decoder": dec.name(), "sizes": js(&r)? }),
            ))
        }
        Task::Niah => {
            let tok = tokenizer.ok_or_else(|| RuntimeError::Message("no tokenizer".into()))?;
            let opts = niah::NiahOptions {
                lengths: args.lengths.clone(),
                depths: args.depths.clone(),
                samples: args.samples,
                seed: args.seed,
                batch_size: args.batch_size,
            };
            let longest = niah::longest_prompt(tok, &opts)?;
            let mut engine = Engine::new(args, model, longest + niah::MAX_NEW_TOKENS)?;
            let mut dec = engine.model(model.plan.model.vocab_size);
            let cells = niah::evaluate(&mut dec, tok, &opts, progress("niah"))?;
            text.push_str(&format!(
                "\nniah single needle (seed {}, greedy on {}, {} samples per cell, accuracy)\n",
                args.seed,
                dec.name(),
                args.samples
            ));
            text.push_str(&format!("  {:>7}", "length"));
            for d in &opts.depths {
                text.push_str(&format!("  {:>6}", format!("{:.0}%", d * 100.0)));
            }
            text.push('\n');
            for &len in &opts.lengths {
                text.push_str(&format!("  {len:>7}"));
                for c in cells.iter().filter(|c| c.length == len) {
                    text.push_str(&format!("  {:>6.2}", c.accuracy));
                }
                text.push('\n');
            }
            Ok((
                "niah",
                json!({ "options": opts, "decoder": dec.name(), "cells": js(&cells)? }),
            ))
        }
        Task::Choice => {
            let tok = tokenizer.ok_or_else(|| RuntimeError::Message("no tokenizer".into()))?;
            let items = items.ok_or_else(|| RuntimeError::Message("no items".into()))?;
            let max_length = args.max_length.unwrap_or(model.plan.model.block_size);
            let mut engine = Engine::new(args, model, max_length)?;
            let mut dec = engine.model(model.plan.model.vocab_size);
            let r = choice::evaluate(
                &mut dec,
                tok,
                items,
                max_length,
                args.batch_size,
                progress("choice"),
            )?;
            text.push_str(&format!(
                "\nchoice ({} items, max length {}, on {})\n",
                r.items,
                r.max_length,
                dec.name()
            ));
            text.push_str(&format!(
                "  acc       {:.4} ± {:.4}\n  acc_norm  {:.4} ± {:.4}\n",
                r.acc, r.acc_stderr, r.acc_norm, r.acc_norm_stderr
            ));
            let mut v = js(&r)?;
            v["decoder"] = json!(dec.name());
            Ok(("choice", v))
        }
    }
}

/// What runs a decoding task: a device backend holding the checkpoint, or the CPU decoder
/// (`--backend cpu`, or auto without a GPU).
enum Engine<'p> {
    Device(Box<dyn Backend>),
    Cpu(Decoder<'p>),
}

impl<'p> Engine<'p> {
    /// The engine for inputs of up to `tokens` tokens (a device backend is sized for them).
    fn new(args: &Args, model: &'p LoadedModel, tokens: usize) -> archscale_runtime::Result<Self> {
        let cpu = || Ok(Engine::Cpu(Decoder::new(&model.plan, &model.params)?));
        if args.backend == BackendChoice::Cpu {
            return cpu();
        }
        let mut plan = model.plan.clone();
        plan.data.val_block_size = plan.data.val_block_size.max(tokens + 1);
        match archscale_runtime::cuda_backend(&plan) {
            Ok(mut b) => {
                b.write_params(&model.params)?;
                Ok(Engine::Device(b))
            }
            Err(e) if args.backend == BackendChoice::Auto => {
                eprintln!("warning: CUDA backend unavailable ({e}); decoding on the CPU");
                cpu()
            }
            Err(e) => Err(e),
        }
    }

    fn model(&mut self, vocab: usize) -> EvalModel<'_, 'p> {
        match self {
            Engine::Device(b) => EvalModel::Device {
                backend: b.as_mut(),
                vocab,
            },
            Engine::Cpu(d) => EvalModel::Cpu(d),
        }
    }
}

fn js<T: serde::Serialize>(v: &T) -> archscale_runtime::Result<serde_json::Value> {
    serde_json::to_value(v).map_err(|e| RuntimeError::Message(format!("encoding results: {e}")))
}
