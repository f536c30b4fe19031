//! End-to-end tests of `archscale run` on the CPU backend: training, resume exactness,
//! crash safety of checkpoints, divergence and corrupt-input handling.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_archscale");

/// A tiny Transformer++ experiment: depth 2, T=32, micro 4, gas 2 (256 tokens per step).
fn experiment(dir: &Path, steps: u64, extra_train: &str, extra_base: &str) -> PathBuf {
    let text = format!(
        r#"arch = "tiny-transformer"
depth = 2
parametrization = "sp"

[base]
depth = 2
lr = 3e-3
batch_tokens = 256
warmup_tokens = 512
min_lr = 3e-4
{extra_base}

[train]
tokens = {tokens}
seq_len = 32
micro_batch = 4
schedule = "cosine"
eval_interval = 5
save_interval = 4
log_interval = 1
out_dir = "{out}"
{extra_train}

[data]
train = [{{ synthetic = {{ seed = 11, tokens = 200_000 }} }}]
val = [{{ synthetic = {{ seed = 12, tokens = 20_000 }} }}]

[cluster]
nodes = 1
gpus_per_node = 1
"#,
        tokens = steps * 256,
        out = dir.join("runs").display(),
    );
    let path = dir.join("exp.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn run(dir: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .current_dir(dir)
        .arg("run")
        .args(args)
        .arg("--backend")
        .arg("cpu")
        .output()
        .unwrap()
}

fn run_dir(dir: &Path) -> PathBuf {
    let runs = dir.join("runs");
    let mut entries: Vec<PathBuf> = std::fs::read_dir(&runs)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("plan.json").exists())
        .collect();
    assert_eq!(
        entries.len(),
        1,
        "one run directory under {}",
        runs.display()
    );
    entries.pop().unwrap()
}

/// (step, loss) pairs of a metrics file.
type StepLosses = Vec<(u64, f64)>;

/// (step, loss) of every training line, and (step, val loss) of every validation line.
fn metrics(run: &Path) -> (StepLosses, StepLosses) {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let step = v["step"].as_u64().unwrap();
        if let Some(l) = v["loss"].as_f64() {
            train.push((step, l));
        }
        if let Some(l) = v["val_loss@1x"].as_f64() {
            val.push((step, l));
        }
    }
    (train, val)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn trains_with_falling_loss_and_writes_the_run_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let exp = experiment(tmp.path(), 40, "", "");
    let out = run(tmp.path(), &[exp.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let rd = run_dir(tmp.path());
    let (train, val) = metrics(&rd);
    assert_eq!(train.len(), 40);
    let first: f64 = train[..5].iter().map(|x| x.1).sum::<f64>() / 5.0;
    let last: f64 = train[35..].iter().map(|x| x.1).sum::<f64>() / 5.0;
    assert!(last < first - 0.5, "loss fell from {first:.3} to {last:.3}");
    assert!(
        val.first().unwrap().1 > val.last().unwrap().1,
        "validation loss fell: {val:?}"
    );
    let plan: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(rd.join("plan.json")).unwrap()).unwrap();
    assert_eq!(
        plan["run_name"].as_str().unwrap(),
        rd.file_name().unwrap().to_str().unwrap()
    );
    assert!(rd
        .join("checkpoints/step-00000040/model.safetensors")
        .is_file());
    assert!(rd.join("events.log").is_file());
}

#[test]
fn resume_reproduces_the_uninterrupted_run_exactly() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let exp_a = experiment(a.path(), 14, "", "");
    assert!(run(a.path(), &[exp_a.to_str().unwrap()]).status.success());

    let exp_b = experiment(b.path(), 14, "", "");
    let first = run(b.path(), &[exp_b.to_str().unwrap(), "--max-steps", "6"]);
    assert!(first.status.success(), "{}", stderr(&first));
    let second = run(b.path(), &[exp_b.to_str().unwrap(), "--resume", "auto"]);
    assert!(second.status.success(), "{}", stderr(&second));

    let (ta, va) = metrics(&run_dir(a.path()));
    let (tb, vb) = metrics(&run_dir(b.path()));
    assert_eq!(
        ta, tb,
        "training losses after resume must equal the uninterrupted run's"
    );
    assert_eq!(
        va, vb,
        "validation losses after resume must equal the uninterrupted run's"
    );
}

#[test]
fn a_finished_run_is_not_overwritten_without_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let exp = experiment(tmp.path(), 4, "", "");
    assert!(run(tmp.path(), &[exp.to_str().unwrap()]).status.success());
    let again = run(tmp.path(), &[exp.to_str().unwrap()]);
    assert_eq!(again.status.code(), Some(2), "{}", stderr(&again));
    assert!(stderr(&again).contains("--resume auto"));
    assert!(run_dir(tmp.path())
        .join("checkpoints/step-00000004/state.json")
        .is_file());
}

/// Complete checkpoints (not `.partial` / `.old`) of the single run under `dir/runs`.
fn complete_checkpoints(dir: &Path) -> usize {
    std::fs::read_dir(dir.join("runs"))
        .ok()
        .and_then(|mut d| d.next())
        .and_then(|e| e.ok())
        .and_then(|e| std::fs::read_dir(e.path().join("checkpoints")).ok())
        .map(|d| {
            d.flatten()
                .filter(|e| !e.file_name().to_string_lossy().contains('.'))
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn sigkill_mid_run_then_resume_matches_the_uninterrupted_run() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let steps = 30;
    let exp_a = experiment(a.path(), steps, "", "");
    assert!(run(a.path(), &[exp_a.to_str().unwrap()]).status.success());

    // Checkpoint every step so kills also land inside checkpoint and metrics writes.
    let exp = experiment(b.path(), steps, "", "");
    for (i, delay_ms) in [0u64, 23, 61].into_iter().enumerate() {
        let mut child = Command::new(BIN)
            .current_dir(b.path())
            .args([
                "run",
                exp.to_str().unwrap(),
                "--backend",
                "cpu",
                "--resume",
                "auto",
            ])
            .args(["--set", "train.save_interval=1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(120);
        while complete_checkpoints(b.path()) < (i + 1) * 4 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        std::thread::sleep(Duration::from_millis(delay_ms));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
    }
    // The newest complete checkpoint loads, and finishing from it reproduces run A exactly.
    let out = run(
        b.path(),
        &[
            exp.to_str().unwrap(),
            "--resume",
            "auto",
            "--set",
            "train.save_interval=1",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let (ta, va) = metrics(&run_dir(a.path()));
    let (tb, vb) = metrics(&run_dir(b.path()));
    assert_eq!(
        ta, tb,
        "training losses after kills and resume equal the uninterrupted run's"
    );
    assert_eq!(
        va, vb,
        "validation losses after kills and resume equal the uninterrupted run's"
    );
}

#[test]
fn sigint_writes_a_checkpoint_and_exits_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let exp = experiment(tmp.path(), 100_000, "save_interval = 100000", "");
    let exp_text = std::fs::read_to_string(&exp)
        .unwrap()
        .replace("save_interval = 4\n", "");
    std::fs::write(&exp, exp_text).unwrap();
    let child = Command::new(BIN)
        .current_dir(tmp.path())
        .args(["run", exp.to_str().unwrap(), "--backend", "cpu"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Let it train a few steps, then interrupt.
    let metrics_path = |d: &Path| {
        std::fs::read_dir(d.join("runs"))
            .ok()?
            .flatten()
            .next()
            .map(|e| e.path().join("metrics.jsonl"))
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        if let Some(p) = metrics_path(tmp.path()) {
            if std::fs::read_to_string(&p)
                .map(|t| t.lines().count() >= 4)
                .unwrap_or(false)
            {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    assert!(stderr(&out).contains("interrupted"), "{}", stderr(&out));
    let rd = run_dir(tmp.path());
    let n = std::fs::read_dir(rd.join("checkpoints")).unwrap().count();
    assert_eq!(n, 1, "exactly the interrupt checkpoint");
}

#[test]
fn divergence_stops_with_a_clear_message_and_keeps_the_last_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let exp = experiment(tmp.path(), 30, "save_interval = 1", "");
    let text = std::fs::read_to_string(&exp)
        .unwrap()
        .replace("save_interval = 4\n", "")
        .replace("lr = 3e-3", "lr = 1e30")
        .replace("warmup_tokens = 512", "warmup_tokens = 0");
    std::fs::write(&exp, text).unwrap();
    let out = run(tmp.path(), &[exp.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("diverged"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let rd = run_dir(tmp.path());
    let ck: Vec<_> = std::fs::read_dir(rd.join("checkpoints"))
        .unwrap()
        .flatten()
        .collect();
    assert!(
        !ck.is_empty(),
        "the checkpoints written before divergence remain"
    );
}

#[test]
fn a_corrupt_checkpoint_is_a_clear_error_and_is_left_in_place() {
    let tmp = tempfile::tempdir().unwrap();
    let exp = experiment(tmp.path(), 4, "", "");
    assert!(run(tmp.path(), &[exp.to_str().unwrap()]).status.success());
    let model = run_dir(tmp.path()).join("checkpoints/step-00000004/model.safetensors");
    let mut bytes = std::fs::read(&model).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 0x55;
    std::fs::write(&model, &bytes).unwrap();
    let out = run(
        tmp.path(),
        &[
            exp.to_str().unwrap(),
            "--resume",
            "auto",
            "--set",
            "train.tokens=2048",
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("corrupt"), "{}", stderr(&out));
    assert_eq!(
        std::fs::read(&model).unwrap(),
        bytes,
        "the corrupt file is not touched"
    );
}

#[test]
fn missing_data_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let exp = experiment(tmp.path(), 4, "", "");
    let text = std::fs::read_to_string(&exp).unwrap().replace(
        "train = [{ synthetic = { seed = 11, tokens = 200_000 } }]",
        "train = [{ dir = \"no/such/dir\", prefix = \"train\" }]",
    );
    std::fs::write(&exp, text).unwrap();
    let out = run(tmp.path(), &[exp.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("no/such/dir"), "{}", stderr(&out));
    assert!(!stderr(&out).contains("panicked"));
}

#[test]
fn an_invalid_spec_exits_2_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let exp = experiment(tmp.path(), 4, "learning_rate = 1", "");
    let out = run(tmp.path(), &[exp.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("learning_rate"), "{}", stderr(&out));
    assert!(!tmp.path().join("runs").exists(), "nothing written");
}

#[test]
fn multi_process_launch_on_the_cpu_backend_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let exp = experiment(tmp.path(), 4, "", "");
    let out = Command::new(BIN)
        .current_dir(tmp.path())
        .args(["run", exp.to_str().unwrap(), "--backend", "cpu"])
        .envs([
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("LOCAL_RANK", "1"),
            ("LOCAL_WORLD_SIZE", "2"),
        ])
        .envs([("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500")])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("CPU backend has no collective"),
        "{}",
        stderr(&out)
    );
    assert!(!tmp.path().join("runs").exists(), "nothing written");

    // `--gpus N` spawns GPU workers: refused up front with the CPU backend, and when the
    // plan's world is not N.
    for (backend, needle) in [("cpu", "--backend cpu"), ("cuda", "plans a world of 1")] {
        let out = Command::new(BIN)
            .current_dir(tmp.path())
            .args([
                "run",
                exp.to_str().unwrap(),
                "--backend",
                backend,
                "--gpus",
                "2",
            ])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
        assert!(stderr(&out).contains(needle), "{}", stderr(&out));
        assert!(!tmp.path().join("runs").exists(), "nothing written");
    }
}

#[test]
fn bench_refuses_a_bad_micro_batch_before_touching_a_gpu() {
    let dir = tempfile::tempdir().unwrap();
    let file = experiment(dir.path(), 2, "", "");
    for bad in ["0", "many", "4,fits"] {
        let o = Command::new(BIN)
            .current_dir(dir.path())
            .args(["bench", file.to_str().unwrap(), "--micro", bad])
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(2), "--micro {bad}: {}", stderr(&o));
        assert!(
            stderr(&o).contains("--micro"),
            "--micro {bad}: {}",
            stderr(&o)
        );
    }
}
