//! `archscale`: a thin CLI over the spec, compiler and runtime crates.

use clap::{Parser, Subcommand};
use std::process::ExitCode;

mod commands;

#[derive(Parser)]
#[command(
    name = "archscale",
    version,
    about = "Neural-architecture and scaling-law research toolkit"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check experiment and architecture files; print every diagnostic.
    Validate(commands::validate::Args),
    /// Compile an experiment into plans and show them (no GPU needed).
    Plan(commands::plan::Args),
    /// Print the JSON Schema of a spec kind (for editor completion).
    Schema(commands::schema::Args),
    /// Translate ArchScale pretrain.py arguments into an experiment TOML.
    ImportArchscale(commands::import_archscale::Args),
    /// Tokenize text/JSONL into packed LITPKDS shards, or write the synthetic corpus.
    Prepare(commands::prepare::Args),
    /// Train the runs of an experiment.
    Run(commands::run::Args),
    /// Print a Slurm or torchrun script that launches an experiment on its cluster.
    Launch(commands::launch::Args),
    /// Check every kernel against the CPU reference on fresh random inputs.
    Selftest(commands::selftest::Args),
    /// Measure training throughput, MFU and peak memory.
    Bench(commands::bench::Args),
    /// Evaluate a checkpoint: validation loss/perplexity, Phonebook, needle-in-a-haystack, multiple choice.
    Eval(commands::eval::Args),
    /// Generate text from a checkpoint (greedy, temperature, top-p).
    Generate(commands::generate::Args),
    /// Export a checkpoint for the PyTorch stack (safetensors + config.json).
    Export(commands::export::Args),
    /// Fit scaling laws L(x) = A·x^(−b) + C to runs, compare architectures, draw the figure.
    Fit(commands::fit::Args),
    /// Plot loss curves of runs, and final loss against peak LR for LR sweeps.
    Plot(commands::plot::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Validate(a) => commands::validate::run(a),
        Command::Plan(a) => commands::plan::run(a),
        Command::Schema(a) => commands::schema::run(a),
        Command::ImportArchscale(a) => commands::import_archscale::run(a),
        Command::Prepare(a) => commands::prepare::run(a),
        Command::Run(a) => commands::run::run(a),
        Command::Launch(a) => commands::launch::run(a),
        Command::Selftest(a) => commands::selftest::run(a),
        Command::Bench(a) => commands::bench::run(a),
        Command::Eval(a) => commands::eval::run(a),
        Command::Generate(a) => commands::generate::run(a),
        Command::Export(a) => commands::export::run(a),
        Command::Fit(a) => commands::fit::run(a),
        Command::Plot(a) => commands::plot::run(a),
    };
    match result {
        Ok(code) => code,
        Err(report) => {
            eprintln!("{report:?}");
            ExitCode::from(1)
        }
    }
}
