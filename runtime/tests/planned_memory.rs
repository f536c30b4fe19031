//! The compiler's per-GPU memory estimate (`archscale plan`, `choose_sharding`) against the
//! CUDA runtime's own account of what it allocates (`planned_bytes`, which mirrors
//! `CudaBackend::with_comm` buffer by buffer), and both against measured peaks.

use archscale_compiler::estimates::{plan_memory, GIB};
use archscale_compiler::plan::Plan;
use archscale_runtime::cuda::backend::planned_bytes;

/// The compiler and the runtime agree to the byte, except that the runtime counts Muon's
/// scratch unrounded and the compiler in 256-byte allocations (5 buffers).
const TOLERANCE_BYTES: u64 = 5 * 256;

/// Plans of `arch` at `depth` with `micro` rows of `seq` tokens; `extra` is appended to the
/// spec (`[cluster]` tables, train keys as `train.x` overrides).
fn plans(arch: &str, depth: usize, seq: usize, micro: usize, sets: &[&str]) -> Vec<Plan> {
    let dir = tempfile::tempdir().unwrap();
    let swa = seq.min(2048);
    let text = format!(
        r#"arch = "{arch}"
depth = {depth}
parametrization = "mup++"

[train]
seq_len = {seq}
micro_batch = {micro}
swa_len = {swa}

[data]
train = [{{ synthetic = {{ seed = 1, tokens = 100_000 }} }}]
"#
    );
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    let exp = archscale_spec::parse_experiment("exp.toml", &text, dir.path(), &sets)
        .unwrap_or_else(|e| panic!("{arch} d{depth} T{seq} micro {micro}: {e:?}"));
    archscale_compiler::plan_experiment(&exp)
        .unwrap_or_else(|e| panic!("{arch} d{depth} T{seq} micro {micro}: {e:?}"))
}

fn plan(arch: &str, depth: usize, seq: usize, micro: usize, sets: &[&str]) -> Plan {
    plans(arch, depth, seq, micro, sets).swap_remove(0)
}

fn check(p: &Plan) -> u64 {
    let runtime = planned_bytes(p).unwrap_or_else(|e| panic!("{}: {e}", p.run_name)) as u64;
    let compiler = plan_memory(p).total_bytes;
    assert!(
        compiler.abs_diff(runtime) <= TOLERANCE_BYTES,
        "{} micro {} world {} {:?}: compiler {compiler} B, runtime {runtime} B",
        p.run_name,
        p.layout.micro_batch,
        p.layout.world,
        p.layout.sharding
    );
    // the plan's own estimate is the same figure
    assert_eq!(p.estimates.memory.total_bytes, compiler, "{}", p.run_name);
    runtime
}

#[test]
fn compiler_constants_are_the_runtimes() {
    use archscale_runtime::distributed::flat_layout::OPT_CHUNK;
    assert_eq!(archscale_compiler::estimates::ADAMW_ITEM, OPT_CHUNK);
    assert_eq!(
        archscale_compiler::estimates::CUBLASLT_WORKSPACE,
        archscale_kernels::cublaslt::WORKSPACE_BYTES
    );
    assert_eq!(
        archscale_compiler::estimates::SCAN_CKPT_EVERY,
        archscale_kernels::ops::SCAN_CKPT_EVERY
    );
}

#[test]
fn compiler_estimate_matches_the_runtimes_plan_for_every_cuda_family() {
    // seq 512: evaluation rows are 2 x 512, so micro 1 exercises the evaluation capacity
    for (arch, depth) in [
        ("transformer", 8),
        ("samba", 8),
        ("sambay", 8),
        ("sambayda", 8),
        ("sambayoco", 8),
        ("sambaymlp", 16),
        ("sambayattn", 16),
        ("sambayattnall", 16),
        ("phi4miniflash", 32),
    ] {
        for micro in [1, 2, 4] {
            check(&plan(arch, depth, 512, micro, &[]));
        }
    }
    // varlen (document masking)
    check(&plan("sambay", 8, 512, 1, &["train.varlen=true"]));
    // Muon matrices (AdamW vectors)
    check(&plan(
        "transformer",
        4,
        512,
        2,
        &["train.optimizer=\"muon\""],
    ));
}

#[test]
fn compiler_estimate_matches_the_runtimes_plan_for_every_sharding() {
    for (arch, depth) in [("transformer", 8), ("sambayda", 8), ("phi4miniflash", 32)] {
        for sharding in ["data_parallel", "zero1", "zero3", "hybrid_shard"] {
            let sh = format!("cluster.sharding=\"{sharding}\"");
            let one_node = [
                "cluster.gpus_per_node=4",
                "base.batch_tokens=4096",
                sh.as_str(),
            ];
            check(&plan(arch, depth, 512, 2, &one_node));
            let two_nodes = [
                "cluster.nodes=2",
                "cluster.gpus_per_node=4",
                "base.batch_tokens=8192",
                sh.as_str(),
            ];
            check(&plan(arch, depth, 512, 2, &two_nodes));
        }
    }
}

/// Peaks measured on one H200 (bench/RESULTS.md: `peak_gib` of `archscale bench`,
/// `peak_mem_bytes` of `archscale run`, the high-water mark of the runtime's `Gpu::alloc`).
#[test]
fn estimate_matches_the_measured_peaks() {
    let gib = |p: &Plan| check(p) as f64 / GIB;
    let bench_with = |arch: &str, depth: usize, micro: usize, sets: &[&str]| {
        let mut p = plan(arch, depth, 4096, 4, sets);
        // as `archscale bench --micro`: the micro-batch changes after planning
        p.layout.micro_batch = micro;
        p.estimates.memory = plan_memory(&p);
        p
    };
    let bench = |arch: &str, depth: usize, micro: usize| bench_with(arch, depth, micro, &[]);
    // (plan, measured GiB, digits the measurement was recorded with)
    let cases = [
        (bench("transformer", 8, 4), 8.296, 3),
        (bench("transformer", 8, 8), 13.388, 3),
        (bench("transformer", 8, 16), 23.6, 1),
        (bench("transformer", 12, 4), 18.5, 1),
        (bench("transformer", 12, 8), 28.3, 1),
        (bench("transformer", 16, 4), 35.042, 3),
        (bench("transformer", 16, 8), 51.5, 1),
        (bench("samba", 8, 4), 9.825, 3),
        (bench("sambayda", 8, 4), 10.867, 3),
        (bench("sambay", 8, 4), 10.113, 3),
        (bench("sambay", 16, 4), 40.297, 3),
        // session 6 (RESULTS, "Session 6"): the SambaY d8 scan at micro 8, Phi-4's
        // LayerNorm, biases and 200k vocabulary
        (bench("sambay", 8, 8), 16.97, 2),
        // session 7 (RESULTS, "Session 7", call 3): Muon matrices without `exp_avg_sq`
        (
            bench_with("transformer", 8, 4, &["train.optimizer=\"muon\""]),
            7.878,
            3,
        ),
        (bench("phi4miniflash", 32, 1), 89.94, 2),
        // the largest micro-batches that fit an H200 (`bench --micro fit`, calls 9 and 10)
        (bench("sambay", 8, 78), 136.92, 2),
        (bench("sambay", 16, 22), 136.12, 2),
        (bench("transformer", 8, 106), 138.13, 2),
        (bench("transformer", 16, 29), 137.95, 2),
    ];
    for (p, measured, digits) in &cases {
        let est = gib(p);
        // the recorded rounding, plus 0.003 GiB: the runs predate the AdamW work items'
        // shrinking from 65536 to 8192 elements (16 B of tables each, 2 MiB at d16)
        let half_ulp = 0.5 * 10f64.powi(-digits);
        assert!(
            (est - measured).abs() <= half_ulp + 0.003,
            "{} micro {}: estimate {est:.3} GiB, measured {measured} GiB",
            p.run_name,
            p.layout.micro_batch
        );
    }
    // Transformer++ d16, untied, micro 1, 4 GPUs (bench/gpu/zero.sh memory)
    for (sharding, measured) in [("zero1", 18.12), ("zero3", 10.51)] {
        let sh = format!("cluster.sharding=\"{sharding}\"");
        let p = plan(
            "transformer",
            16,
            4096,
            1,
            &["cluster.gpus_per_node=4", "base.batch_tokens=16384", &sh],
        );
        let est = gib(&p);
        assert!(
            (est - measured).abs() <= 0.005 + 0.003,
            "{sharding}: estimate {est:.3} GiB, measured {measured} GiB"
        );
    }
}

/// The runtime's account against what it really allocates: needs a GPU (and the CUDA
/// libraries on `LD_LIBRARY_PATH`); `cargo test -p archscale-runtime --test planned_memory
/// -- --ignored`.
#[test]
#[ignore = "needs a CUDA GPU"]
fn planned_bytes_is_the_backends_peak_on_a_gpu() {
    use archscale_runtime::cuda::CudaBackend;
    let cases = [
        plan("transformer", 8, 512, 1, &[]),
        plan("transformer", 8, 512, 2, &["train.optimizer=\"muon\""]),
        plan("samba", 8, 512, 2, &[]),
        plan("sambay", 8, 512, 1, &["train.varlen=true"]),
        plan("sambayda", 8, 512, 2, &[]),
        plan("sambaymlp", 16, 512, 1, &[]),
        plan("sambayattn", 16, 512, 1, &[]),
    ];
    for p in &cases {
        let init: Vec<Vec<f32>> = p.params.iter().map(|s| vec![0.0; s.numel()]).collect();
        let be = CudaBackend::new(p, 0, &init).unwrap_or_else(|e| panic!("{}: {e}", p.run_name));
        assert_eq!(
            be.peak_bytes(),
            planned_bytes(p).unwrap(),
            "{} micro {}",
            p.run_name,
            p.layout.micro_batch
        );
    }
}
