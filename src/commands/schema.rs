//! `archscale schema experiment|arch`: print the JSON Schema of a spec kind, for editors
//! (taplo / Even Better TOML: `#:schema ./schema/experiment.json` at the top of a file).

use archscale_spec::schema::{schema_json, Kind};
use std::io::Write;
use std::process::ExitCode;

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum SchemaKind {
    /// Experiment files (experiments/*.toml).
    Experiment,
    /// Architecture files (experiments/archs/*.toml).
    Arch,
}

#[derive(clap::Args)]
pub struct Args {
    /// Which spec kind.
    pub kind: SchemaKind,
}

pub fn run(args: Args) -> miette::Result<ExitCode> {
    let text = schema_json(match args.kind {
        SchemaKind::Experiment => Kind::Experiment,
        SchemaKind::Arch => Kind::Arch,
    });
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
    Ok(ExitCode::SUCCESS)
}
