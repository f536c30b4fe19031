//! CUDA kernels for archscale: CUDA C sources (compiled by NVRTC at first use for the
//! device's compute capability and cached on disk), a cuBLASLt wrapper, and typed launch
//! wrappers. Builds and links with no CUDA installed: every library is loaded at run time,
//! and a missing one is an error naming it.

pub mod cublaslt;
pub mod error;
pub mod gpu;
pub mod muon;
pub mod nvrtc;
pub mod ops;
pub mod tensor_map;

pub use error::{KernelError, Result};
pub use gpu::{Args, DeviceBuffer, Gpu};

const COMMON: &str = include_str!("../cuda/common.cuh");

/// Kernel modules: (name, source without the common header).
pub const MODULES: &[(&str, &str)] = &[
    ("elementwise", include_str!("../cuda/elementwise.cu")),
    ("loss_optim", include_str!("../cuda/loss_optim.cu")),
    (
        "flash",
        concat!(
            include_str!("../cuda/flash_common.cuh"),
            include_str!("../cuda/flash.cu")
        ),
    ),
    (
        "flash_sm90",
        concat!(
            include_str!("../cuda/flash_common.cuh"),
            include_str!("../cuda/flash_sm90.cu")
        ),
    ),
    (
        "flash_sm90_ws",
        concat!(
            include_str!("../cuda/flash_common.cuh"),
            include_str!("../cuda/flash_sm90_wgmma.cuh"),
            include_str!("../cuda/flash_sm90_ws.cu")
        ),
    ),
    ("mamba", include_str!("../cuda/mamba.cu")),
    ("hybrid", include_str!("../cuda/hybrid.cu")),
    ("muon", include_str!("../cuda/muon.cu")),
];

/// Full source of module `name` (common header prepended), as NVRTC compiles it.
pub fn module_source(name: &str) -> Option<String> {
    // Timing experiments only: ARCHSCALE_KERNEL_DEFINES="A B" prepends `#define A` ...
    let defines: String = std::env::var("ARCHSCALE_KERNEL_DEFINES")
        .map(|v| {
            v.split_whitespace()
                .map(|d| format!("#define {d}\n"))
                .collect()
        })
        .unwrap_or_default();
    MODULES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, src)| format!("{defines}{COMMON}\n#line 1 \"{name}.cu\"\n{src}"))
}

/// Compiles every module for `arch` (e.g. `sm_90a`) into the disk cache. Needs only NVRTC,
/// not a GPU. Returns (module, cubin bytes) per module. With `ARCHSCALE_NVRTC_LOG` set, a
/// fresh compile prints NVRTC's log with ptxas' register and spill report.
pub fn compile_all(arch: &str) -> Result<Vec<(String, usize)>> {
    let mut out = Vec::new();
    for (name, _) in MODULES {
        let src = module_source(name)
            .ok_or_else(|| KernelError::Unsupported(format!("unknown module {name}")))?;
        let cubin = nvrtc::compile_cubin(name, &src, arch, &[])?;
        out.push((name.to_string(), cubin.len()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hopper_gets_the_wgmma_capable_target() {
        assert_eq!(gpu::arch_for((9, 0)), "sm_90a");
        assert_eq!(gpu::arch_for((8, 0)), "sm_80");
        assert_eq!(gpu::arch_for((12, 0)), "sm_120");
    }

    #[test]
    fn every_module_source_has_the_common_header_and_its_kernels() {
        for (name, _) in MODULES {
            let src = module_source(name).expect("known module");
            assert!(src.contains("typedef __nv_bfloat16 bf16;"), "{name}");
            assert!(src.contains("extern \"C\" __global__"), "{name}");
        }
        assert!(module_source("nope").is_none());
        let flash = module_source("flash").unwrap_or_default();
        for k in [
            "flash_fwd_d64",
            "flash_fwd_d128",
            "flash_bwd_d64",
            "flash_bwd_d128",
            "flash_bwd_delta",
            "flash_bwd_dq",
        ] {
            assert!(flash.contains(k), "{k}");
        }
        let flash9 = module_source("flash_sm90").unwrap_or_default();
        for k in ["flash_bwd_prep_sm90", "flash_bwd_dq2_sm90"] {
            assert!(flash9.contains(k), "{k}");
        }
        let ws = module_source("flash_sm90_ws").unwrap_or_default();
        for k in [
            "flash_fwd_ws_d64",
            "flash_fwd_ws_d128",
            "flash_bwd_ws_leanv_d64",
            "flash_bwd_ws_leanv_d128",
            "wg_ss_n128_t00",
        ] {
            assert!(ws.contains(k), "{k}");
        }
        let mamba = module_source("mamba").unwrap_or_default();
        for k in ops::HYBRID_KERNELS {
            let src = module_source(k.0).unwrap_or_default();
            assert!(src.contains(&format!(" {}(", k.1)), "{}", k.1);
        }
        assert!(mamba.contains("#define SCAN_N 16"));
    }

    #[test]
    fn missing_cuda_libraries_are_errors_that_name_them() {
        // On a machine with CUDA these succeed; without, they must fail cleanly (no panic).
        if let Err(e) = compile_all("sm_90a") {
            let msg = e.to_string();
            assert!(msg.contains("nvrtc") || msg.contains("NVRTC"), "{msg}");
        }
        if let Err(e) = Gpu::new(0) {
            let msg = e.to_string();
            assert!(
                msg.contains("libcuda") || msg.contains("device") || msg.contains("CUDA"),
                "{msg}"
            );
        }
        if let Err(e) = cublaslt::ensure_cublaslt() {
            assert!(e.to_string().contains("cublasLt"));
        }
    }
}
