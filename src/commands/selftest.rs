//! `archscale selftest [--seed N] [--require-gpu]`: every CUDA kernel against the CPU
//! reference on fresh random inputs; prints relative errors, exits 1 on any failure.
//! Without a GPU it compiles the kernels (when NVRTC is present) and says why the GPU checks
//! were skipped.

use std::process::ExitCode;

#[derive(clap::Args)]
pub struct Args {
    /// Seed of the random inputs (default: drawn from the clock, printed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Fail (exit 1) when no GPU is usable instead of running the CPU-side parts only.
    #[arg(long)]
    pub require_gpu: bool,
    /// Also check the whole model: the first run of this experiment, CUDA backend against
    /// the CPU reference model (loss and every gradient, same init and batch).
    #[arg(long, value_name = "FILE")]
    pub model: Option<std::path::PathBuf>,
    /// Override a value of the `--model` experiment (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE", requires = "model")]
    pub set: Vec<String>,
    /// Only run the kernel suites whose name contains this (e.g. `mamba`, `flash`).
    #[arg(long, value_name = "SUITE")]
    pub only: Option<String>,
    /// Also time the Mamba selective scan forward and backward (and the causal conv and the
    /// GMU gate) at the SambaY-d16 and SambaY-d8 shapes.
    #[arg(long)]
    pub bench_scan: bool,
}

pub fn run(args: Args) -> miette::Result<ExitCode> {
    // The model plan is validated first: bad input exits 2 before any GPU work.
    let model_plan = match &args.model {
        Some(file) => {
            let experiment = match archscale_spec::load_experiment(file, &args.set) {
                Ok(e) => e,
                Err(errors) => {
                    eprint!("{}", errors.render());
                    eprintln!("{errors}");
                    return Ok(ExitCode::from(2));
                }
            };
            match archscale_compiler::plan_experiment(&experiment) {
                Ok(mut plans) if !plans.is_empty() => Some(plans.swap_remove(0)),
                Ok(_) => {
                    eprintln!("error: {} has no runs", file.display());
                    return Ok(ExitCode::from(2));
                }
                Err(errors) => {
                    eprint!("{}", errors.render());
                    eprintln!("{errors}");
                    return Ok(ExitCode::from(2));
                }
            }
        }
        None => None,
    };
    let opts = archscale_runtime::cuda::selftest::Options {
        only: args.only.clone(),
        bench_scan: args.bench_scan,
    };
    let mut report = archscale_runtime::cuda::selftest::run_with(args.seed, &opts);
    if let (Some(plan), Ok(_)) = (&model_plan, &report.device) {
        match archscale_runtime::cuda::selftest::model_parity(plan, report.seed) {
            Ok(checks) => report.checks.extend(checks),
            Err(e) => report.errors.push(format!("model parity: {e}")),
        }
    }
    println!("archscale selftest (seed {})", report.seed);
    match &report.compile {
        Ok(mods) => {
            let list: Vec<String> = mods.iter().map(|(m, b)| format!("{m} ({b} B)")).collect();
            println!(
                "NVRTC compile for {}: ok: {}",
                report.compile_arch,
                list.join(", ")
            );
        }
        Err(e) => println!(
            "NVRTC compile for {}: FAILED or unavailable: {e}",
            report.compile_arch
        ),
    }
    let gpu_ok = match &report.device {
        Ok(d) => {
            println!("device: {d}");
            true
        }
        Err(e) => {
            println!("GPU checks skipped: {e}");
            false
        }
    };
    if !report.checks.is_empty() {
        let w = report
            .checks
            .iter()
            .map(|c| c.name.chars().count())
            .max()
            .unwrap_or(10)
            .max(10);
        let ws = report
            .checks
            .iter()
            .map(|c| c.shape.chars().count())
            .max()
            .unwrap_or(10)
            .max(10);
        println!(
            "{:<w$}  {:<ws$}  {:>10}  {:>8}  result",
            "check", "shape", "rel err", "tol"
        );
        for c in &report.checks {
            println!(
                "{:<w$}  {:<ws$}  {:>10.3e}  {:>8.1e}  {}",
                c.name,
                c.shape,
                c.rel_err,
                c.tol,
                if c.passed() { "ok" } else { "FAIL" }
            );
        }
    }
    for line in &report.bench {
        println!("{line}");
    }
    for e in &report.errors {
        println!("ERROR {e}");
    }
    let failed = report.checks.iter().filter(|c| !c.passed()).count();
    println!(
        "{} passed, {} failed",
        report.checks.len() - failed,
        failed + report.errors.len()
    );
    let compile_failed = matches!(&report.compile, Err(e) if !e.contains("not found"));
    if compile_failed || failed > 0 || !report.errors.is_empty() || (!gpu_ok && args.require_gpu) {
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}
