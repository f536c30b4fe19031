//! `archscale generate CHECKPOINT --prompt TEXT [--max-new-tokens N] [--temperature T]
//! [--top-p P] [--seed S]`: the same decoder and sampler the evals use. Temperature 0 is
//! greedy. Models of the synthetic id corpus read and print token ids; models of the
//! synthetic text corpus read and print text (byte tokens).

use archscale_runtime::eval::sampling::generate;
use archscale_runtime::eval::{
    load_model, Decoder, Sampler, SamplingOptions, TextTokenizer, TokenizerChoice,
};
use archscale_runtime::RuntimeError;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct Args {
    /// A checkpoint directory or a run directory (its newest checkpoint).
    pub checkpoint: PathBuf,
    /// Prompt text (token ids separated by spaces for models of the synthetic id corpus).
    #[arg(long)]
    pub prompt: String,
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Nucleus sampling mass.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// auto, gpt2, bytes, ids, or a path to a tokenizer.json.
    #[arg(long, default_value = "auto")]
    pub tokenizer: String,
    /// Keep generating past the end-of-text token.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Print {"prompt_ids", "ids", "text"} as JSON.
    #[arg(long)]
    pub json: bool,
}

fn fail(e: RuntimeError) -> miette::Result<ExitCode> {
    let input = matches!(e, RuntimeError::BadInput { .. });
    eprintln!("{:?}", miette::Report::new(e));
    Ok(ExitCode::from(if input { 2 } else { 1 }))
}

pub fn run(args: Args) -> miette::Result<ExitCode> {
    let opts = SamplingOptions {
        temperature: args.temperature,
        top_p: args.top_p,
        seed: args.seed,
    };
    if let Err(e) = opts.validate() {
        eprintln!("error: {e}");
        return Ok(ExitCode::from(2));
    }
    let model = match load_model(&args.checkpoint) {
        Ok(m) => m,
        Err(e) => return fail(e),
    };
    let tokenizer = match TextTokenizer::load(&TokenizerChoice::parse(&args.tokenizer), &model.plan)
    {
        Ok(t) => t,
        Err(e) => return fail(e),
    };
    let prompt_ids = match tokenizer.encode(&args.prompt) {
        Ok(ids) if !ids.is_empty() => ids,
        Ok(_) => {
            eprintln!("error: the prompt is empty");
            return Ok(ExitCode::from(2));
        }
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    if let Some(&t) = prompt_ids
        .iter()
        .find(|&&t| t as usize >= model.plan.model.vocab_size)
    {
        eprintln!(
            "error: prompt token {t} is outside the model's vocabulary of {}",
            model.plan.model.vocab_size
        );
        return Ok(ExitCode::from(2));
    }
    let stop = if args.ignore_eos {
        None
    } else {
        tokenizer.eos().or(match tokenizer {
            TextTokenizer::Ids => Some(model.plan.model.eos_token_id),
            _ => None,
        })
    };
    let result = Decoder::new(&model.plan, &model.params).and_then(|mut dec| {
        generate(
            &mut dec,
            &prompt_ids,
            args.max_new_tokens,
            &mut Sampler::new(opts),
            stop,
            |_| false,
        )
    });
    let ids = match result {
        Ok(ids) => ids,
        Err(e) => return fail(e),
    };
    let text = match tokenizer.decode(&ids) {
        Ok(t) => t,
        Err(e) => return fail(e),
    };
    let out = if args.json {
        serde_json::to_string_pretty(
            &serde_json::json!({ "prompt_ids": prompt_ids, "ids": ids, "text": text }),
        )
        .map_err(|e| miette::miette!("encoding: {e}"))?
            + "\n"
    } else if tokenizer.is_text() {
        format!("{}{}\n", args.prompt, text)
    } else {
        format!("{} | {}\n", args.prompt.trim(), text)
    };
    let _ = std::io::stdout().lock().write_all(out.as_bytes());
    Ok(ExitCode::SUCCESS)
}
