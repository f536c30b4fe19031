//! `archscale export CHECKPOINT --format hf --out DIR`: safetensors with ArchScale's
//! parameter names, a lit-gpt `config.json` (fields documented in
//! `archscale_runtime::eval::export`) and `verify.json` (what the weights must compute,
//! for bench/export/check_export.py).

use archscale_runtime::eval::export::{export_hf, ExportDtype};
use archscale_runtime::eval::load_model;
use archscale_runtime::RuntimeError;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Format {
    /// model.safetensors + config.json for ArchScale's lit_gpt (`Config.from_name`, `GPT`).
    Hf,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum DtypeArg {
    F32,
    Bf16,
}

#[derive(clap::Args)]
pub struct Args {
    /// A checkpoint directory or a run directory (its newest checkpoint).
    pub checkpoint: PathBuf,
    #[arg(long, value_enum, default_value = "hf")]
    pub format: Format,
    /// Output directory (created).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: DtypeArg,
}

pub fn run(args: Args) -> miette::Result<ExitCode> {
    let model = match load_model(&args.checkpoint) {
        Ok(m) => m,
        Err(e) => {
            let input = matches!(e, RuntimeError::BadInput { .. });
            eprintln!("{:?}", miette::Report::new(e));
            return Ok(ExitCode::from(if input { 2 } else { 1 }));
        }
    };
    let dtype = match args.dtype {
        DtypeArg::F32 => ExportDtype::F32,
        DtypeArg::Bf16 => ExportDtype::Bf16,
    };
    let Format::Hf = args.format;
    match export_hf(&model, &args.out, dtype) {
        Ok(paths) => {
            for p in paths {
                println!("wrote {}", p.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("{:?}", miette::Report::new(e));
            Ok(ExitCode::from(1))
        }
    }
}
