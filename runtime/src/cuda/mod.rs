//! CUDA backend: the Plan's Transformer++ graph (and, experimental, Samba's Mamba layers)
//! on one GPU or one rank of many (fp32 master weights and AdamW state, bf16 activations
//! and matmul operands), the kernel self-test against the CPU reference, and the throughput
//! benchmark. Kernels live in `archscale-kernels`.

pub mod backend;
pub mod bench;
pub mod selftest;

pub use archscale_kernels::KernelError;
pub use backend::{CudaBackend, ShardMode};

impl From<KernelError> for crate::RuntimeError {
    fn from(e: KernelError) -> Self {
        crate::RuntimeError::Message(format!("CUDA: {e}"))
    }
}
