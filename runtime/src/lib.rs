//! Executes Plans: the CPU reference backend (the oracle), the CUDA backend, optimizers,
//! packed data, checkpoints and the training loop.

pub mod backend;
pub mod checkpoint;
pub mod cpu;
pub mod cpu_backend;
pub mod cuda;
pub mod data;
pub mod distributed;
pub mod eval;
pub mod optim;
pub mod train;

pub use backend::{Backend, OptimizerShard, OptimizerState};

/// The CUDA backend on GPU 0 for `plan`, initialised exactly as the CPU reference would be
/// (same init rules, same seed), or an error naming what is missing (GPU, driver, library).
pub fn cuda_backend(plan: &archscale_compiler::Plan) -> Result<Box<dyn Backend>> {
    // A missing driver is the likelier reason on most machines; say it before shape limits.
    archscale_kernels::gpu::ensure_driver()
        .map_err(|e| RuntimeError::Message(format!("CUDA backend: {e}")))?;
    let init = cpu::model::CpuModel::<f32>::new(plan)?.init_params();
    Ok(Box::new(cuda::CudaBackend::new(plan, 0, &init)?))
}

/// Runtime errors carry enough context to act on (file, offset, what was expected).
#[derive(Debug, thiserror::Error, miette::Diagnostic)]
pub enum RuntimeError {
    #[error("{0}")]
    Message(String),
    /// The run directory already has checkpoints and no resume was asked for.
    #[error("{} already holds a checkpoint ({})", run_dir.display(), checkpoint.display())]
    #[diagnostic(help("continue it with `--resume auto`, or set a different `train.out_dir`"))]
    RunExists {
        run_dir: std::path::PathBuf,
        checkpoint: std::path::PathBuf,
    },
    /// A packed (LITPKDS) shard is malformed: bad header, truncated, invalid token.
    #[error("corrupt packed shard {}: at byte {offset}: {reason}", path.display())]
    CorruptShard {
        path: std::path::PathBuf,
        offset: u64,
        reason: String,
    },
    /// Input to `prepare` or a data source is unusable (missing file, bad JSON line, ...).
    #[error("{}{}: {reason}", path.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
    BadInput {
        path: std::path::PathBuf,
        line: Option<usize>,
        reason: String,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, RuntimeError>;
