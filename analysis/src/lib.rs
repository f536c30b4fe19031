//! Scaling analysis of archscale run directories: read runs (`plan.json`,
//! `metrics.jsonl`), fit saturating power laws as ArchScale's plots do, compare
//! architectures (who wins at which budget, where curves cross) and draw paper-quality
//! figures (SVG and PNG, with a bundled font so text renders on machines without fonts).

pub mod compare;
pub mod fit;
pub mod plot;
pub mod runs;

use std::path::PathBuf;

#[derive(Debug, thiserror::Error, miette::Diagnostic)]
pub enum AnalysisError {
    /// A run directory is missing a file or holds something unreadable (user input).
    #[error("{}: {reason}", path.display())]
    #[diagnostic(help(
        "a run directory holds plan.json and metrics.jsonl, as `archscale run` writes them"
    ))]
    BadRun { path: PathBuf, reason: String },
    #[error("fit: {0}")]
    Fit(String),
    #[error("plot {}: {reason}", path.display())]
    Plot { path: PathBuf, reason: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl AnalysisError {
    /// True when the error is the user's input (exit code 2), not a failure of ours.
    pub fn is_input_error(&self) -> bool {
        matches!(self, AnalysisError::BadRun { .. } | AnalysisError::Fit(_))
    }
}
