//! Executes Plans: the CPU reference backend (the oracle), the CUDA backend, optimizers,
//! packed data, checkpoints and the training loop.

pub mod backend;

pub use backend::{Backend, OptimizerState};

/// Runtime errors carry enough context to act on (file, offset, what was expected).
#[derive(Debug, thiserror::Error, miette::Diagnostic)]
pub enum RuntimeError {
    #[error("{0}")]
    Message(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, RuntimeError>;
