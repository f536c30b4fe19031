//! `archscale export` (being built in this session; until then it says so).

use std::process::ExitCode;

#[derive(clap::Args)]
pub struct Args {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
    rest: Vec<String>,
}

pub fn run(_args: Args) -> miette::Result<ExitCode> {
    Err(miette::miette!("`archscale export` is not built yet"))
}
