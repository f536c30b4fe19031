//! A tiny member of every runnable architecture family trains on the CPU through
//! `archscale run`: each builtin arch file is shrunk (width 32, 4 heads of 8, 2 KV groups,
//! vocab 512, window 8) keeping its layer pattern, and its loss must fall within 40 steps.

use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_archscale");

/// The builtin arch file of `family` with only its sizes replaced.
fn shrunk_arch(family: &str) -> String {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("experiments/archs/{family}.toml")),
    )
    .unwrap();
    text.lines()
        .map(|line| match line.split(['=', ' ']).next().unwrap_or("") {
            "depths" => String::new(),
            "width" => "width = { n_embd = 32 }".into(),
            "heads" => "heads = 4".into(),
            "kv_groups" => "kv_groups = 2".into(),
            "head_dim" => "head_dim = 8".into(),
            "vocab_size" => "vocab_size = 512".into(),
            "local_window" => "local_window = 8".into(),
            "token_rule" => "token_rule = { mult = \"15 * n_embd^2 / depth^2\" }".into(),
            _ => line.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Trains `family` for 40 steps of 256 tokens and returns the (first 5, last 5) mean losses.
fn train(family: &str, parametrization: &str, optimizer: &str, extra_train: &str) -> (f64, f64) {
    let dir = tempfile::tempdir().unwrap();
    let arch = dir.path().join(format!("{family}.toml"));
    std::fs::write(&arch, shrunk_arch(family)).unwrap();
    let exp = format!(
        r#"arch = "{arch}"
depth = 8
parametrization = "{parametrization}"

[base]
depth = 8
lr = 3e-3
batch_tokens = 256
warmup_tokens = 512

[train]
tokens = 10240
seq_len = 32
micro_batch = 4
optimizer = "{optimizer}"
eval_interval = 1000
save_interval = 1000
log_interval = 1
out_dir = "{out}"
{extra_train}

[data]
train = [{{ synthetic = {{ seed = 5, tokens = 100_000 }} }}]
val = [{{ synthetic = {{ seed = 6, tokens = 10_000 }} }}]

[cluster]
nodes = 1
gpus_per_node = 1
"#,
        arch = arch.display(),
        out = dir.path().join("runs").display()
    );
    // An `extra_train` micro-batch replaces the default one.
    let exp = if extra_train.contains("micro_batch") {
        exp.replace("micro_batch = 4\n", "")
    } else {
        exp
    };
    let exp_path = dir.path().join("exp.toml");
    std::fs::write(&exp_path, exp).unwrap();
    let out = Command::new(BIN)
        .current_dir(dir.path())
        .args(["run", exp_path.to_str().unwrap(), "--backend", "cpu"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{family}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = std::fs::read_dir(dir.path().join("runs"))
        .unwrap()
        .flatten()
        .next()
        .unwrap()
        .path();
    let losses: Vec<f64> = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["loss"].as_f64())
        .collect();
    assert_eq!(losses.len(), 40, "{family}");
    let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len() as f64;
    (mean(&losses[..5]), mean(&losses[35..]))
}

fn assert_learns(family: &str, parametrization: &str, optimizer: &str, extra_train: &str) {
    let (first, last) = train(family, parametrization, optimizer, extra_train);
    assert!(
        last < first - 0.3,
        "{family} ({parametrization}, {optimizer}): loss {first:.3} -> {last:.3}"
    );
}

macro_rules! family_trains {
    ($($name:ident => $family:expr),* $(,)?) => {$(
        #[test]
        fn $name() {
            assert_learns($family, "mup++", "adamw", "");
        }
    )*};
}

family_trains! {
    transformer_trains => "transformer",
    transformerls_trains => "transformerls",
    samba_trains => "samba",
    sambay_trains => "sambay",
    sambayda_trains => "sambayda",
    sambayoco_trains => "sambayoco",
    mambay_trains => "mambay",
    sambaymlp_trains => "sambaymlp",
    sambayattn_trains => "sambayattn",
    sambayattnall_trains => "sambayattnall",
    phi4miniflash_trains => "phi4miniflash",
}

#[test]
fn sambay_trains_with_muon() {
    assert_learns("sambay", "mup++", "muon", "");
}

#[test]
fn transformer_trains_with_nadam() {
    assert_learns("transformer", "mup++", "nadam", "");
}

#[test]
fn sambay_trains_with_varlen() {
    // Varlen needs micro-batch 1 (8 accumulation steps of one 32-token row).
    let (first, last) = train("sambay", "mup++", "adamw", "varlen = true\nmicro_batch = 1");
    assert!(
        last < first - 0.3,
        "sambay varlen: loss {first:.3} -> {last:.3}"
    );
}

#[test]
fn plan_only_mixers_are_rejected_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let arch = dir.path().join("mambay2.toml");
    std::fs::write(&arch, shrunk_arch("mambay2")).unwrap();
    let exp = format!(
        "arch = \"{}\"\ndepth = 8\nparametrization = \"mup++\"\n[base]\ndepth = 8\nbatch_tokens = 256\n[train]\ntokens = 2560\nseq_len = 32\nmicro_batch = 4\nout_dir = \"{}\"\n[data]\ntrain = [{{ synthetic = {{ seed = 5, tokens = 100_000 }} }}]\nval = [{{ synthetic = {{ seed = 6, tokens = 10_000 }} }}]\n[cluster]\nnodes = 1\ngpus_per_node = 1\n",
        arch.display(),
        dir.path().join("runs").display()
    );
    let exp_path = dir.path().join("exp.toml");
    std::fs::write(&exp_path, exp).unwrap();
    let out = Command::new(BIN)
        .current_dir(dir.path())
        .args(["run", exp_path.to_str().unwrap(), "--backend", "cpu"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("mamba2") && err.contains("plan-only"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
