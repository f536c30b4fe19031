//! Errors of the CUDA layer. Every failure names what failed (library, kernel, call).

/// Something in the CUDA stack failed or is missing.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// A shared library could not be loaded (no driver, no toolkit on the library path).
    #[error("CUDA library {library} not found: {hint}")]
    LibraryMissing { library: &'static str, hint: String },
    /// The driver loaded but reports no device.
    #[error("no CUDA device found ({0})")]
    NoDevice(String),
    /// A driver call failed.
    #[error("CUDA driver call {call} failed: {message}")]
    Driver { call: String, message: String },
    /// NVRTC rejected a kernel source.
    #[error("NVRTC could not compile kernel module `{module}` for {arch}:\n{log}")]
    Compile {
        module: String,
        arch: String,
        log: String,
    },
    /// A cuBLASLt call failed.
    #[error("cuBLASLt {call} failed: {message}")]
    Cublas { call: String, message: String },
    /// The kernel cache directory could not be used.
    #[error("kernel cache {path}: {source}")]
    Cache {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// Arguments that no kernel here supports.
    #[error("{0}")]
    Unsupported(String),
}

pub type Result<T> = std::result::Result<T, KernelError>;

pub(crate) fn driver<T>(
    call: &str,
    r: std::result::Result<T, cudarc::driver::DriverError>,
) -> Result<T> {
    r.map_err(|e| KernelError::Driver {
        call: call.to_string(),
        message: format!("{e:?}"),
    })
}
