//! `archscale launch FILE --scheduler slurm|torchrun [--set k=v]... [--run NAME]`: print a
//! launch script (tera template) that runs `archscale run FILE --backend cuda` on the
//! experiment's cluster, one process per GPU, as ArchScale's torchrun lines do.

use archscale_compiler::plan::{Plan, Sharding};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Scheduler {
    /// A bash script for `sbatch` that starts one task per GPU with `srun`.
    Slurm,
    /// A bash script that runs `torchrun` (run it on every node).
    Torchrun,
}

#[derive(clap::Args)]
pub struct Args {
    /// Experiment file (TOML).
    pub file: PathBuf,
    /// Which launcher the script uses.
    #[arg(long, value_enum)]
    pub scheduler: Scheduler,
    /// Override a spec value, e.g. `--set cluster.nodes=4` (repeatable; passed on to `archscale run`).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Launch only the run with this name.
    #[arg(long = "run", value_name = "NAME")]
    pub run: Option<String>,
}

const TORCHRUN_TEMPLATE: &str = include_str!("../templates/launch/torchrun.sh");
const SLURM_TEMPLATE: &str = include_str!("../templates/launch/slurm.sh");

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
    if let Some(name) = &args.run {
        match plans.iter().position(|p| &p.run_name == name) {
            Some(i) => plans = vec![plans.swap_remove(i)],
            None => {
                eprintln!(
                    "error: no run named `{name}` in {}; its runs are:",
                    args.file.display()
                );
                for p in &plans {
                    eprintln!("  {}", p.run_name);
                }
                return Ok(ExitCode::from(2));
            }
        }
    }
    let Some(first) = plans.first() else {
        eprintln!("error: {} has no runs", args.file.display());
        return Ok(ExitCode::from(2));
    };
    // One script launches one cluster shape; a sweep over the cluster needs one per run.
    let shape = |p: &Plan| (p.layout.nodes, p.layout.gpus_per_node);
    if let Some(other) = plans.iter().find(|p| shape(p) != shape(first)) {
        eprintln!(
            "error: runs `{}` ({} x {} GPUs) and `{}` ({} x {} GPUs) need different clusters; pick one with --run NAME",
            first.run_name, first.layout.nodes, first.layout.gpus_per_node,
            other.run_name, other.layout.nodes, other.layout.gpus_per_node
        );
        return Ok(ExitCode::from(2));
    }
    let text = render(
        args.scheduler,
        &args.file,
        &args.set,
        args.run.as_deref(),
        &plans,
    )?;
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
    Ok(ExitCode::SUCCESS)
}

/// The launch script for `plans` (all on one cluster shape).
pub fn render(
    scheduler: Scheduler,
    file: &std::path::Path,
    set: &[String],
    run: Option<&str>,
    plans: &[Plan],
) -> miette::Result<String> {
    let first = plans
        .first()
        .ok_or_else(|| miette::miette!("launch: no runs to launch"))?;
    let mut command = vec![
        "archscale".to_string(),
        "run".into(),
        shell_quote(&file.display().to_string()),
        "--backend".into(),
        "cuda".into(),
    ];
    for s in set {
        command.push("--set".into());
        command.push(shell_quote(s));
    }
    if let Some(name) = run {
        command.push("--run".into());
        command.push(shell_quote(name));
    }
    let stem = file
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let (what, job) = match plans {
        [one] => (format!("run {}", one.run_name), one.run_name.clone()),
        many => (format!("{} runs of {}", many.len(), file.display()), stem),
    };
    let layouts: Vec<&str> = plans
        .iter()
        .map(|p| sharding_name(p.layout.sharding))
        .collect();
    let sharding = if layouts.iter().all(|l| *l == layouts[0]) {
        layouts[0].to_string()
    } else {
        format!("per run ({})", layouts.join(", "))
    };
    let most = plans
        .iter()
        .max_by_key(|p| p.estimates.memory.total_bytes)
        .map(memory_line)
        .unwrap_or_default();
    let mut context = tera::Context::new();
    context.insert("what", &what);
    context.insert("job", &job_name(&job));
    context.insert("nodes", &first.layout.nodes);
    context.insert("gpus_per_node", &first.layout.gpus_per_node);
    context.insert("world", &first.layout.world);
    context.insert("sharding", &sharding);
    context.insert("memory", &most);
    context.insert("command", &command.join(" "));
    let (name, template) = match scheduler {
        Scheduler::Torchrun => ("torchrun.sh", TORCHRUN_TEMPLATE),
        Scheduler::Slurm => ("slurm.sh", SLURM_TEMPLATE),
    };
    let mut tera = tera::Tera::default();
    tera.add_raw_template(name, template).map_err(tera_error)?;
    tera.render(name, &context).map_err(tera_error)
}

fn sharding_name(s: Sharding) -> &'static str {
    match s {
        Sharding::DataParallel => "data_parallel",
        Sharding::Zero1 => "zero1",
        Sharding::Zero3 => "zero3",
        Sharding::HybridShard => "hybrid_shard",
    }
}

fn memory_line(p: &Plan) -> String {
    let m = &p.estimates.memory;
    let gib = |b: u64| b as f64 / (1024.0 * 1024.0 * 1024.0);
    format!(
        "{:.2} GiB ({}: params {:.2}, grads {:.2}, optimizer {:.2}, bf16 copy or gather slots {:.2}, activations and scratch {:.2}) of {:.0} GiB{}",
        gib(m.total_bytes),
        p.run_name,
        gib(m.params_bytes),
        gib(m.grads_bytes),
        gib(m.optimizer_bytes),
        gib(m.working_bytes),
        gib(m.activations_bytes),
        gib(m.gpu_bytes),
        if m.fits { "" } else { " -- DOES NOT FIT" }
    )
}

/// A job name Slurm and shells accept: letters, digits, `._-`.
fn job_name(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    if s.is_empty() {
        "archscale".into()
    } else {
        s
    }
}

/// `s` as one shell word: bare when safe, else single-quoted.
fn shell_quote(s: &str) -> String {
    let safe = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-=,:+@%".contains(c));
    if safe {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

fn tera_error(e: tera::Error) -> miette::Report {
    use std::error::Error;
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        msg.push_str(&format!(": {s}"));
        source = s.source();
    }
    miette::miette!("launch template: {msg}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_words() {
        assert_eq!(shell_quote("exp/a.toml"), "exp/a.toml");
        assert_eq!(shell_quote("depth=[8,12]"), "'depth=[8,12]'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(job_name("d12 lr=1e-3"), "d12_lr_1e-3");
    }
}
