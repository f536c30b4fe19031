//! `archscale run FILE`: compile the experiment and train its runs, one after another.

use archscale_runtime::train::{self, Resume, TrainOptions};
use archscale_runtime::Backend;
use miette::{miette, IntoDiagnostic};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendChoice {
    /// CUDA when a GPU and the CUDA libraries are present, otherwise CPU (with a warning).
    Auto,
    Cpu,
    Cuda,
}

#[derive(clap::Args)]
pub struct Args {
    /// Experiment TOML file.
    pub file: PathBuf,
    /// Override a spec value: `--set base.lr=1e-3` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Which device to train on.
    #[arg(long, value_enum, default_value = "auto")]
    pub backend: BackendChoice,
    /// `auto` continues from the run directory's newest checkpoint; or a checkpoint directory.
    #[arg(long)]
    pub resume: Option<String>,
    /// Train only the sweep member with this run name.
    #[arg(long)]
    pub run: Option<String>,
    /// Stop after this many optimizer steps (a checkpoint is written); resume continues.
    #[arg(long)]
    pub max_steps: Option<u64>,
}

static STOP: AtomicBool = AtomicBool::new(false);

fn make_backend(
    choice: BackendChoice,
    plan: &archscale_compiler::Plan,
) -> miette::Result<Box<dyn Backend>> {
    let cpu = || -> miette::Result<Box<dyn Backend>> {
        Ok(Box::new(archscale_runtime::cpu_backend::CpuBackend::new(
            plan,
        )?))
    };
    match choice {
        BackendChoice::Cpu => cpu(),
        BackendChoice::Cuda => archscale_runtime::cuda_backend(plan).map_err(|e| miette!("{e}")),
        BackendChoice::Auto => match archscale_runtime::cuda_backend(plan) {
            Ok(b) => Ok(b),
            Err(e) => {
                eprintln!("warning: CUDA backend unavailable ({e}); training on the CPU");
                cpu()
            }
        },
    }
}

pub fn run(args: Args) -> miette::Result<ExitCode> {
    let experiment = match archscale_spec::load_experiment(&args.file, &args.set) {
        Ok(e) => e,
        Err(errors) => {
            eprintln!("{:?}", miette::Report::new(errors));
            return Ok(ExitCode::from(2));
        }
    };
    let plans = match archscale_compiler::plan_experiment(&experiment) {
        Ok(p) => p,
        Err(report) => {
            eprintln!("{report:?}");
            return Ok(ExitCode::from(2));
        }
    };
    let plans: Vec<_> = match &args.run {
        None => plans,
        Some(name) => {
            let names: Vec<String> = plans.iter().map(|p| p.run_name.clone()).collect();
            let chosen: Vec<_> = plans.into_iter().filter(|p| &p.run_name == name).collect();
            if chosen.is_empty() {
                eprintln!(
                    "error: no run named `{name}` in {}; its runs are:\n  {}",
                    args.file.display(),
                    names.join("\n  ")
                );
                return Ok(ExitCode::from(2));
            }
            chosen
        }
    };
    let resume = match args.resume.as_deref() {
        None => Resume::No,
        Some("auto") => Resume::Auto,
        Some(path) => {
            let p = PathBuf::from(path);
            if plans.len() != 1 {
                eprintln!("error: --resume PATH needs a single run; pick one with --run");
                return Ok(ExitCode::from(2));
            }
            Resume::From(p)
        }
    };
    // Under torchrun / Slurm each process would be one rank; until the NCCL runtime exists,
    // refuse rather than have every process train every rank.
    let env = archscale_runtime::distributed::RankEnv::from_env().map_err(miette::Report::new)?;
    if env.world > 1 {
        return Err(miette!(
            help = "run one process: it computes every rank of the plan's world in turn (same optimizer steps)",
            "launched as rank {} of {} processes, but multi-process data-parallel training over NCCL is not built yet",
            env.rank,
            env.world
        ));
    }
    ctrlc::set_handler(|| {
        if STOP.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!(
            "\nstopping: writing a checkpoint at the end of this step (Ctrl-C again to abort)"
        );
    })
    .into_diagnostic()?;

    let data_root = std::env::current_dir().into_diagnostic()?;
    let progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
    for plan in &plans {
        let mut backend = make_backend(args.backend, plan)?;
        eprintln!(
            "run {} on {} -> {}",
            plan.run_name,
            backend.name(),
            train::run_dir(plan).display()
        );
        let opts = TrainOptions {
            data_root: data_root.clone(),
            resume: resume.clone(),
            stop: &STOP,
            max_steps_this_run: args.max_steps,
            progress,
        };
        match train::train(plan, backend.as_mut(), &opts) {
            Ok(s) => {
                eprintln!(
                    "{}: {} steps, loss {} -> {}, val {}, {:.0} tokens/s",
                    plan.run_name,
                    s.steps,
                    s.first_loss.map_or("-".into(), |l| format!("{l:.4}")),
                    s.last_loss.map_or("-".into(), |l| format!("{l:.4}")),
                    s.last_val_loss.map_or("-".into(), |l| format!("{l:.4}")),
                    s.tokens_per_s
                );
                if s.interrupted {
                    return Ok(ExitCode::from(130));
                }
            }
            Err(e @ archscale_runtime::RuntimeError::RunExists { .. }) => {
                eprintln!("{:?}", miette::Report::new(e));
                return Ok(ExitCode::from(2));
            }
            Err(e) => return Err(miette::Report::new(e)),
        }
    }
    Ok(ExitCode::SUCCESS)
}
