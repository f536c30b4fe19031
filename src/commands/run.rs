//! `archscale run FILE`: compile the experiment and train its runs, one after another.
//! `--gpus N` (N > 1) spawns N local worker processes, one per GPU; under torchrun or Slurm
//! each process is one rank already (data parallel over NCCL, CUDA backend only).

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
    /// Train data parallel on this many local GPUs, one worker process each (the plan's
    /// world, cluster.nodes x cluster.gpus_per_node, must equal it).
    #[arg(long, value_name = "N")]
    pub gpus: Option<usize>,
}

/// The command line without `--gpus N` / `--gpus=N`, for the workers.
fn worker_args() -> Vec<std::ffi::OsString> {
    let mut out = Vec::new();
    let mut it = std::env::args_os().skip(1);
    while let Some(a) = it.next() {
        if a == "--gpus" {
            it.next();
        } else if !a.to_string_lossy().starts_with("--gpus=") {
            out.push(a);
        }
    }
    out
}

/// Spawns `n` workers of this binary (rank = local rank = GPU), waits for all, and returns
/// the first failure's exit code (killing the other workers), or success.
fn launch_local(n: usize) -> miette::Result<ExitCode> {
    let exe = std::env::current_exe().into_diagnostic()?;
    // A free port for the NCCL bootstrap, unless the user chose one.
    let port = match std::env::var("MASTER_PORT") {
        Ok(p) if !p.trim().is_empty() => p,
        _ => std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port().to_string())
            .into_diagnostic()?,
    };
    // Ctrl-C reaches the workers too; they checkpoint and exit, and we wait for them.
    ctrlc::set_handler(|| {}).into_diagnostic()?;
    let mut children = Vec::with_capacity(n);
    for r in 0..n {
        let child = std::process::Command::new(&exe)
            .args(worker_args())
            .env("RANK", r.to_string())
            .env("WORLD_SIZE", n.to_string())
            .env("LOCAL_RANK", r.to_string())
            .env("LOCAL_WORLD_SIZE", n.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", &port)
            .spawn();
        match child {
            Ok(c) => children.push(Some(c)),
            Err(e) => {
                for c in children.iter_mut().flatten() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                return Err(miette!("starting worker {r} ({}): {e}", exe.display()));
            }
        }
    }
    let mut failure: Option<(usize, i32)> = None;
    while children.iter().any(Option::is_some) {
        for (r, slot) in children.iter_mut().enumerate() {
            let Some(child) = slot else { continue };
            match child.try_wait() {
                Ok(Some(status)) => {
                    *slot = None;
                    if !status.success() && failure.is_none() {
                        failure = Some((r, status.code().unwrap_or(1)));
                    }
                }
                Ok(None) => {}
                Err(e) => return Err(miette!("waiting for worker {r}: {e}")),
            }
        }
        if failure.is_some() {
            // A rank that failed leaves the others blocked in a collective: stop them.
            for c in children.iter_mut().flatten() {
                let _ = c.kill();
                let _ = c.wait();
            }
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    match failure {
        None => Ok(ExitCode::SUCCESS),
        Some((r, code)) => {
            eprintln!("worker {r} of {n} failed (exit {code}); the others were stopped");
            Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
        }
    }
}

/// The CUDA backend of `plan` on this rank's GPU, one rank of `comm` (bootstrapped on the
/// first call): data parallel, ZeRO-1 or ZeRO-3 as the plan's layout says.
fn data_parallel_backend(
    plan: &archscale_compiler::Plan,
    env: &archscale_runtime::distributed::RankEnv,
    comm: &mut Option<std::rc::Rc<archscale_runtime::distributed::nccl::NcclComm>>,
    gpu: &mut Option<std::sync::Arc<archscale_kernels::Gpu>>,
) -> miette::Result<Box<dyn Backend>> {
    use archscale_runtime::distributed::nccl::NcclComm;
    env.check_layout(&plan.layout)
        .map_err(miette::Report::new)?;
    archscale_kernels::gpu::ensure_driver().map_err(|e| miette!("CUDA backend: {e}"))?;
    let init = archscale_runtime::cpu::model::CpuModel::<f32>::new(plan)
        .map_err(miette::Report::new)?
        .init_params();
    let device = match gpu {
        Some(g) => g.clone(),
        None => {
            let cuda = |e: archscale_kernels::KernelError| miette!("CUDA backend: {e}");
            let visible = archscale_kernels::gpu::device_count().map_err(cuda)?;
            let ordinal = archscale_kernels::gpu::device_for_local_rank(env.local_rank, visible)
                .map_err(cuda)?;
            let g = archscale_kernels::Gpu::new(ordinal).map_err(cuda)?;
            *gpu = Some(g.clone());
            g
        }
    };
    let comm = match comm {
        Some(c) => c.clone(),
        None => {
            let c = std::rc::Rc::new(
                NcclComm::bootstrap(env, device.clone()).map_err(miette::Report::new)?,
            );
            *comm = Some(c.clone());
            c
        }
    };
    let backend = archscale_runtime::cuda::CudaBackend::with_comm(plan, device, &init, Some(comm))
        .map_err(miette::Report::new)?;
    Ok(Box::new(backend))
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
    // Under torchrun / Slurm (or our own `--gpus` workers) each process is one rank.
    let env = archscale_runtime::distributed::RankEnv::from_env().map_err(miette::Report::new)?;
    if env.world > 1 && args.backend == BackendChoice::Cpu {
        return Err(miette!(
            help = "use --backend cuda, or run one process: it computes every rank of the plan's world in turn (same optimizer steps)",
            "launched as rank {} of {} processes, but the CPU backend has no collective: multi-process data parallel with --backend cpu is not built yet",
            env.rank,
            env.world
        ));
    }
    if let Some(n) = args.gpus {
        if n == 0 {
            eprintln!("error: --gpus must be at least 1");
            return Ok(ExitCode::from(2));
        }
        if env.world == 1 && n > 1 {
            if args.backend == BackendChoice::Cpu {
                eprintln!(
                    "error: --gpus {n} trains on GPUs; it cannot be combined with --backend cpu"
                );
                return Ok(ExitCode::from(2));
            }
            for plan in &plans {
                if plan.layout.world != n {
                    eprintln!(
                        "error: --gpus {n}, but run {} plans a world of {} ({} nodes x {} GPUs); set cluster.gpus_per_node={n}",
                        plan.run_name, plan.layout.world, plan.layout.nodes, plan.layout.gpus_per_node
                    );
                    return Ok(ExitCode::from(2));
                }
            }
            return launch_local(n);
        }
        if env.world > 1 && env.world != n {
            eprintln!(
                "error: --gpus {n}, but the launcher started {} processes",
                env.world
            );
            return Ok(ExitCode::from(2));
        }
    }
    let lead = env.rank == 0;
    let mut comm = None;
    let mut gpu = None;
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
        let mut backend = if env.world > 1 {
            data_parallel_backend(plan, &env, &mut comm, &mut gpu)?
        } else {
            make_backend(args.backend, plan)?
        };
        let collective = comm
            .clone()
            .map(|c| c as std::rc::Rc<dyn train::Collective>);
        if lead {
            eprintln!(
                "run {} on {} -> {}",
                plan.run_name,
                backend.name(),
                train::run_dir(plan).display()
            );
        }
        let opts = TrainOptions {
            data_root: data_root.clone(),
            resume: resume.clone(),
            stop: &STOP,
            max_steps_this_run: args.max_steps,
            progress,
            collective,
        };
        match train::train(plan, backend.as_mut(), &opts) {
            Ok(s) => {
                if lead {
                    eprintln!(
                        "{}: {} steps, loss {} -> {}, val {}, {:.0} tokens/s",
                        plan.run_name,
                        s.steps,
                        s.first_loss.map_or("-".into(), |l| format!("{l:.4}")),
                        s.last_loss.map_or("-".into(), |l| format!("{l:.4}")),
                        s.last_val_loss.map_or("-".into(), |l| format!("{l:.4}")),
                        s.tokens_per_s
                    );
                }
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
