//! Compiles every kernel module with NVRTC for one architecture (default sm_90a) into the
//! kernel cache; needs NVRTC but no GPU. `ARCHSCALE_NVRTC_LOG=1` prints ptxas' report.
fn main() {
    let arch = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "sm_90a".to_string());
    match archscale_kernels::compile_all(&arch) {
        Ok(list) => {
            for (name, bytes) in list {
                println!("{name}: {bytes} bytes of cubin for {arch}");
            }
        }
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    }
}
