//! NVRTC compilation of the CUDA C sources to cubin for one architecture, with an on-disk
//! cache keyed by SHA-256 of (source, arch, options, NVRTC version).

use crate::error::{KernelError, Result};
use cudarc::nvrtc::{result as nvrtc, sys as nvrtc_sys};
use sha2::{Digest, Sha256};
use std::ffi::CString;
use std::path::{Path, PathBuf};

/// Loads NVRTC or says clearly that it is missing.
pub fn ensure_nvrtc() -> Result<()> {
    if unsafe { nvrtc_sys::is_culib_present() } {
        Ok(())
    } else {
        Err(KernelError::LibraryMissing {
            library: "libnvrtc.so (CUDA 13 runtime compiler)",
            hint: "install the CUDA toolkit and put its lib64 on LD_LIBRARY_PATH \
                   (on the GPU machine: /usr/local/cuda/lib64)"
                .into(),
        })
    }
}

/// NVRTC's version as (major, minor).
pub fn nvrtc_version() -> Result<(i32, i32)> {
    ensure_nvrtc()?;
    let (mut major, mut minor) = (0, 0);
    unsafe { nvrtc_sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| KernelError::Compile {
            module: "<version>".into(),
            arch: String::new(),
            log: format!("{e:?}"),
        })?;
    Ok((major, minor))
}

/// Directory holding `cuda_bf16.h`, if one is known: `$ARCHSCALE_CUDA_INCLUDE`,
/// `$CUDA_HOME/include`, `$CUDA_PATH/include`, `/usr/local/cuda/include`.
pub fn cuda_include_dir() -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Ok(dir) = std::env::var("ARCHSCALE_CUDA_INCLUDE") {
        candidates.push(dir.into());
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Ok(dir) = std::env::var(var) {
            candidates.push(Path::new(&dir).join("include"));
        }
    }
    candidates.push("/usr/local/cuda/include".into());
    candidates
        .into_iter()
        .find(|d| d.join("cuda_bf16.h").is_file())
}

/// Where compiled kernels are cached: `$ARCHSCALE_KERNEL_CACHE`, else
/// `~/.cache/archscale/kernels`.
pub fn cache_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("ARCHSCALE_KERNEL_CACHE") {
        return dir.into();
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| ".".into());
    Path::new(&home).join(".cache/archscale/kernels")
}

/// Compiles `source` to a cubin for `arch` (e.g. `sm_90a`), or returns the cached one.
/// `module` names the source in errors and in the cache file name.
pub fn compile_cubin(
    module: &str,
    source: &str,
    arch: &str,
    extra_options: &[String],
) -> Result<Vec<u8>> {
    ensure_nvrtc()?;
    let (major, minor) = nvrtc_version()?;
    let mut options: Vec<String> = vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".to_string(),
        "-default-device".to_string(),
    ];
    if let Some(inc) = cuda_include_dir() {
        options.push(format!("--include-path={}", inc.display()));
    }
    options.extend(extra_options.iter().cloned());
    let report = std::env::var_os("ARCHSCALE_NVRTC_LOG").is_some();

    let mut hasher = Sha256::new();
    hasher.update(source.as_bytes());
    hasher.update(arch.as_bytes());
    for o in &options {
        // The include directory's location does not change the code.
        if !o.starts_with("--include-path=") && !o.starts_with("--ptxas-options") {
            hasher.update(o.as_bytes());
        }
    }
    hasher.update(format!("nvrtc {major}.{minor}").as_bytes());
    let digest = hasher.finalize();
    let hex: String = digest.iter().take(16).map(|b| format!("{b:02x}")).collect();
    let dir = cache_dir();
    let path = dir.join(format!("{module}-{arch}-{hex}.cubin"));
    if let Ok(bytes) = std::fs::read(&path) {
        if !bytes.is_empty() {
            return Ok(bytes);
        }
    }

    if report {
        options.push("--ptxas-options=-v".to_string());
    }
    let cubin = compile_uncached(module, source, arch, &options)?;
    // The cache is an optimisation: a read-only home must not stop training.
    if std::fs::create_dir_all(&dir).is_ok() {
        let tmp = dir.join(format!(".{module}-{hex}.{}.tmp", std::process::id()));
        if std::fs::write(&tmp, &cubin).is_ok() {
            let _ = std::fs::rename(&tmp, &path);
        }
    }
    Ok(cubin)
}

fn compile_uncached(module: &str, source: &str, arch: &str, options: &[String]) -> Result<Vec<u8>> {
    let err = |log: String| KernelError::Compile {
        module: module.to_string(),
        arch: arch.to_string(),
        log,
    };
    let src = CString::new(source).map_err(|_| err("source contains a NUL byte".into()))?;
    let name = CString::new(format!("{module}.cu")).map_err(|_| err("bad module name".into()))?;
    let prog = nvrtc::create_program(&src, Some(&name)).map_err(|e| err(format!("{e:?}")))?;
    let compiled = unsafe { nvrtc::compile_program(prog, options) };
    let log = unsafe { nvrtc::get_program_log(prog) }
        .map(|raw| {
            let bytes: Vec<u8> = raw
                .iter()
                .map(|&c| c as u8)
                .take_while(|&c| c != 0)
                .collect();
            String::from_utf8_lossy(&bytes).into_owned()
        })
        .unwrap_or_default();
    if compiled.is_err() {
        let _ = unsafe { nvrtc::destroy_program(prog) };
        return Err(err(log));
    }
    let cubin = unsafe {
        let mut size = 0usize;
        let r = nvrtc_sys::nvrtcGetCUBINSize(prog, &mut size).result();
        let mut buf = vec![0u8; size];
        let r2 = if r.is_ok() {
            nvrtc_sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr() as *mut std::ffi::c_char).result()
        } else {
            r
        };
        let _ = nvrtc::destroy_program(prog);
        r2.map_err(|e| err(format!("nvrtcGetCUBIN: {e:?}\n{log}")))?;
        buf
    };
    if std::env::var_os("ARCHSCALE_NVRTC_LOG").is_some() && !log.trim().is_empty() {
        eprintln!("[nvrtc {module}]\n{log}");
    }
    Ok(cubin)
}
