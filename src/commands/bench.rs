//! `archscale bench FILE [--set k=v]... [--micro M|fit[,...]] [--steps N] [--warmup N] [--json PATH]`:
//! training throughput (tokens/s), MFU and peak GPU memory of the CUDA backend for each run
//! of an experiment, on a fixed random batch. `--micro fit` takes the largest micro-batch
//! whose planned memory (which is what the backend allocates) fits the GPU.

use archscale_compiler::estimates::largest_micro_that_fits;
use archscale_runtime::cuda::bench::{bench_plan, BenchResult};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct Args {
    /// Experiment file (TOML); every run of it is benchmarked.
    pub file: PathBuf,
    /// Override a spec value (repeatable), e.g. `--set depth=[8]`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Micro-batch per run (one value for all, or one per run in order): a positive number,
    /// or `fit` for the largest whose planned memory fits the GPU's free memory.
    #[arg(long, value_delimiter = ',', value_parser = parse_micro)]
    pub micro: Vec<Micro>,
    /// Timed optimizer steps.
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// Untimed steps first (kernel compile, cuBLASLt heuristics, clocks).
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Also time every op of one step with device events and print the breakdown.
    #[arg(long)]
    pub profile: bool,
    /// Also write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Micro {
    Sequences(usize),
    Fit,
}

fn parse_micro(s: &str) -> Result<Micro, String> {
    match s {
        "fit" => Ok(Micro::Fit),
        _ => match s.parse::<usize>() {
            Ok(0) => Err("must be positive".into()),
            Ok(m) => Ok(Micro::Sequences(m)),
            Err(_) => Err(format!("`{s}` is neither a number of sequences nor `fit`")),
        },
    }
}

/// Room left on the GPU beyond the plan's buffers: the kernels' modules, cuBLASLt's and
/// the driver's own allocations after the query.
const FIT_MARGIN_BYTES: u64 = 1 << 30;
/// The largest micro-batch `fit` tries.
const FIT_LIMIT: usize = 4096;

pub fn run(args: Args) -> miette::Result<ExitCode> {
    let experiment = match archscale_spec::load_experiment(&args.file, &args.set) {
        Ok(e) => e,
        Err(errors) => {
            eprint!("{}", errors.render());
            eprintln!("{errors}");
            return Ok(ExitCode::from(2));
        }
    };
    let mut plans = match archscale_compiler::plan_experiment(&experiment) {
        Ok(p) => p,
        Err(errors) => {
            eprint!("{}", errors.render());
            eprintln!("{errors}");
            return Ok(ExitCode::from(2));
        }
    };
    if !args.micro.is_empty() && args.micro.len() != 1 && args.micro.len() != plans.len() {
        eprintln!(
            "error: --micro has {} values for {} runs (give one, or one per run)",
            args.micro.len(),
            plans.len()
        );
        return Ok(ExitCode::from(2));
    }
    let mut free_bytes = None;
    for (i, p) in plans.iter_mut().enumerate() {
        match args.micro.get(i).or(args.micro.first()) {
            Some(Micro::Sequences(m)) => p.layout.micro_batch = *m,
            Some(Micro::Fit) => {
                let free = match free_bytes {
                    Some(f) => f,
                    None => {
                        let gpu = archscale_kernels::Gpu::new(0).map_err(|e| {
                            miette::miette!("--micro fit needs the GPU's free memory: {e}")
                        })?;
                        let (free, _) = gpu.mem_info().map_err(|e| miette::miette!("{e}"))?;
                        *free_bytes.insert(free as u64)
                    }
                };
                let room = free.saturating_sub(FIT_MARGIN_BYTES);
                match largest_micro_that_fits(p, room, FIT_LIMIT) {
                    Some(m) => p.layout.micro_batch = m,
                    None => {
                        eprintln!(
                            "error: {}: not even one sequence of {} tokens fits in {:.1} GiB",
                            p.run_name,
                            p.layout.seq_len,
                            room as f64 / (1u64 << 30) as f64
                        );
                        return Ok(ExitCode::from(1));
                    }
                }
            }
            None => {}
        }
    }
    let mut results: Vec<BenchResult> = Vec::new();
    let mut failed = false;
    for p in &plans {
        eprintln!(
            "bench {} (micro {}, T {}) ...",
            p.run_name, p.layout.micro_batch, p.layout.seq_len
        );
        match bench_plan(p, args.steps, args.warmup, args.profile) {
            Ok(r) => {
                println!("{}", serde_json::to_string(&r).unwrap_or_default());
                if !r.profile.is_empty() {
                    let total: f64 = r.profile.iter().map(|(_, ms)| ms).sum();
                    println!(
                        "profile of a step of {} ({total:.1} ms with event overhead; mean of 3):",
                        r.run_name
                    );
                    let mut sorted = r.profile.clone();
                    sorted.sort_by(|a, b| b.1.total_cmp(&a.1));
                    for (name, ms) in sorted {
                        println!("  {name:<16} {ms:>9.2} ms {:>5.1}%", 100.0 * ms / total);
                    }
                }
                results.push(r);
            }
            Err(e) => {
                eprintln!("error: {}: {e}", p.run_name);
                failed = true;
            }
        }
    }
    if !results.is_empty() {
        println!(
            "{:<40} {:>5} {:>5} {:>6} {:>9} {:>11} {:>7} {:>11} {:>9} {:>9}",
            "run",
            "depth",
            "micro",
            "T",
            "step s",
            "tokens/s",
            "MFU",
            "MFU(torch)",
            "peak GiB",
            "plan GiB"
        );
        for r in &results {
            println!(
                "{:<40} {:>5} {:>5} {:>6} {:>9.4} {:>11.0} {:>6.1}% {:>10.1}% {:>9.2} {:>9.2}",
                r.run_name,
                r.depth,
                r.micro,
                r.seq,
                r.step_s,
                r.tokens_per_s,
                100.0 * r.mfu,
                100.0 * r.mfu_torch_basis,
                r.peak_gib,
                r.planned_gib
            );
        }
        if let Some(dev) = results.first().map(|r| r.device.clone()) {
            println!("device: {dev}");
        }
    }
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&results).map_err(|e| miette::miette!("{e}"))?;
        std::fs::write(path, text)
            .map_err(|e| miette::miette!("cannot write {}: {e}", path.display()))?;
    }
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}
