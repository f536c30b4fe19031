//! Experiment and architecture specs: TOML types, validation with span-carrying
//! diagnostics (miette), sweep expansion, JSON Schema, and ArchScale argv import.
//!
//! Entry points: [`load_experiment`] / [`parse_experiment`] give an [`Experiment`] with one
//! validated [`RunSpec`] per sweep member, or [`SpecErrors`] holding every problem found.

pub mod arch;
pub mod diag;
pub mod experiment;
pub mod expr;
pub mod import;
pub mod names;
pub mod schema;
pub mod tree;

pub use arch::{ArchSpec, ResolvedArch, ResolvedLayer, ResolvedMamba, ResolvedMixer};
pub use diag::{SourceFile, SpecError, SpecErrors};
pub use experiment::{
    load_experiment, parse_experiment, BaseSpec, DataSourceSpec, Decay, Experiment, Optimizer,
    Parametrization, RunSpec, Sharding,
};

/// What kind of spec a TOML file is: experiments name an `arch`, arch files a family `name`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpecKind {
    Experiment,
    Arch,
}

/// Guess the kind of a spec file from its top-level keys (`arch` means experiment).
pub fn detect_kind(text: &str) -> SpecKind {
    match toml_edit::ImDocument::parse(text) {
        Ok(doc)
            if doc.get("arch").is_none()
                && (doc.get("section").is_some() || doc.get("name").is_some()) =>
        {
            SpecKind::Arch
        }
        _ => SpecKind::Experiment,
    }
}
