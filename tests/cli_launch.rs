//! `archscale launch` prints a torchrun or Slurm script whose node and GPU counts come
//! from the experiment's cluster section; invalid specs exit 2 and print no script.

use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_archscale");

fn experiment(nodes: usize, gpus: usize) -> String {
    format!(
        r#"arch = "transformer"
depth = 4
parametrization = "mup++"

[base]
depth = 4
lr = 1e-3
batch_tokens = 4096
warmup_tokens = 4096

[train]
tokens = 40960
seq_len = 64
micro_batch = 1

[data]
train = [{{ synthetic = {{ seed = 1, tokens = 10_000 }} }}]
val = [{{ synthetic = {{ seed = 2, tokens = 1_000 }} }}]

[cluster]
nodes = {nodes}
gpus_per_node = {gpus}
gpu_memory_gib = 80
"#
    )
}

fn launch(text: &str, extra: &[&str]) -> (Output, String) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("exp.toml");
    std::fs::write(&file, text).unwrap();
    let out = Command::new(BIN)
        .arg("launch")
        .arg(&file)
        .args(extra)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    (out, stdout.replace(&file.display().to_string(), "EXP"))
}

#[test]
fn torchrun_script_for_8x8_and_1x1() {
    let (out, s) = launch(&experiment(8, 8), &["--scheduler", "torchrun"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(s.starts_with("#!/usr/bin/env bash\n"), "{s}");
    assert!(s.contains("torchrun --nnodes 8 --nproc_per_node 8 "), "{s}");
    assert!(
        s.contains("--rdzv_backend c10d --rdzv_endpoint \"$MASTER_ADDR:$MASTER_PORT\""),
        "{s}"
    );
    assert!(
        s.contains("--no-python archscale run EXP --backend cuda\n"),
        "{s}"
    );
    assert!(s.contains("world 64"), "{s}");
    assert!(s.contains("# export NCCL_NVLS_ENABLE=0"), "{s}");
    assert!(
        s.contains(": \"${MASTER_ADDR:?"),
        "multi-node needs MASTER_ADDR: {s}"
    );

    let (out, s) = launch(&experiment(1, 1), &["--scheduler", "torchrun"]);
    assert!(out.status.success());
    assert!(s.contains("torchrun --nnodes 1 --nproc_per_node 1 "), "{s}");
    assert!(s.contains("world 1, sharding data_parallel"), "{s}");
    assert!(
        s.contains("MASTER_ADDR=\"${MASTER_ADDR:-127.0.0.1}\""),
        "{s}"
    );
}

#[test]
fn slurm_script_for_8x8_and_1x1() {
    let (out, s) = launch(
        &experiment(8, 8),
        &["--scheduler", "slurm", "--set", "base.lr=2e-3"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        "#SBATCH --nodes=8\n",
        "#SBATCH --ntasks-per-node=8\n",
        "#SBATCH --gpus-per-node=8\n",
    ] {
        assert!(s.contains(line), "missing {line:?} in {s}");
    }
    assert!(
        s.contains(
            "srun --kill-on-bad-exit=1 archscale run EXP --backend cuda --set base.lr=2e-3\n"
        ),
        "{s}"
    );
    assert!(
        s.contains("scontrol show hostnames \"$SLURM_JOB_NODELIST\""),
        "{s}"
    );
    assert!(s.contains("# export NCCL_NVLS_ENABLE=0"), "{s}");

    let (out, s) = launch(&experiment(1, 1), &["--scheduler", "slurm"]);
    assert!(out.status.success());
    for line in [
        "#SBATCH --nodes=1\n",
        "#SBATCH --ntasks-per-node=1\n",
        "#SBATCH --gpus-per-node=1\n",
    ] {
        assert!(s.contains(line), "missing {line:?} in {s}");
    }
}

#[test]
fn set_overrides_the_cluster_and_is_passed_on() {
    let (out, s) = launch(
        &experiment(1, 1),
        &[
            "--scheduler",
            "torchrun",
            "--set",
            "cluster.nodes=2",
            "--set",
            "cluster.gpus_per_node=4",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(s.contains("torchrun --nnodes 2 --nproc_per_node 4 "), "{s}");
    assert!(
        s.contains("--backend cuda --set cluster.nodes=2 --set cluster.gpus_per_node=4\n"),
        "{s}"
    );
}

#[test]
fn invalid_spec_exits_2_with_no_script() {
    let (out, s) = launch(
        &experiment(1, 1).replace(
            "depth = 4\nparametrization",
            "depth = \"x\"\nparametrization",
        ),
        &["--scheduler", "slurm"],
    );
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(s.is_empty(), "{s}");
    let (out, s) = launch(
        &experiment(1, 1),
        &["--scheduler", "slurm", "--run", "nope"],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(s.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no run named `nope`"));
}
