//! `archscale validate FILE... [--set k=v]...`: check experiment and arch files and print
//! every diagnostic. Exit 2 if any file is invalid.

use archscale_spec::{SpecErrors, SpecKind};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct Args {
    /// Experiment or arch files (TOML). The kind is detected: experiments name an `arch`.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Override a spec value in every experiment, e.g. `--set base.lr=1e-3` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
}

pub fn run(args: Args) -> miette::Result<ExitCode> {
    let mut failed = 0usize;
    for file in &args.files {
        match check(file, &args.set) {
            Ok(summary) => println!("ok: {} ({summary})", file.display()),
            Err(errors) => {
                failed += 1;
                eprint!("{}", errors.render());
                eprintln!("error: {errors}");
            }
        }
    }
    if failed > 0 {
        eprintln!("{failed} of {} file(s) invalid", args.files.len());
        return Ok(ExitCode::from(2));
    }
    Ok(ExitCode::SUCCESS)
}

fn check(file: &PathBuf, set: &[String]) -> Result<String, SpecErrors> {
    let text = std::fs::read_to_string(file).map_err(|e| {
        let src = archscale_spec::SourceFile::new(file.display().to_string(), "");
        SpecErrors::from(archscale_spec::SpecError::new(
            &src,
            0..0,
            format!("cannot read {}: {e}", file.display()),
        ))
    })?;
    match archscale_spec::detect_kind(&text) {
        SpecKind::Arch => {
            let src = archscale_spec::SourceFile::new(file.display().to_string(), text);
            let depths = archscale_spec::arch::validate_arch(&src).map_err(SpecErrors::new)?;
            let list: Vec<String> = depths.iter().map(|d| d.to_string()).collect();
            Ok(format!("arch, builds at depth {}", list.join(", ")))
        }
        SpecKind::Experiment => {
            let experiment = archscale_spec::load_experiment(file, set)?;
            let plans = archscale_compiler::plan_experiment(&experiment)?;
            let n = plans.len();
            Ok(format!("{n} run{}", if n == 1 { "" } else { "s" }))
        }
    }
}
