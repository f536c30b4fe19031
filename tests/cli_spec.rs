//! End-to-end tests of `archscale validate`, `schema` and `import-archscale` on experiments/.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_archscale"));
    c.current_dir(env!("CARGO_MANIFEST_DIR"));
    c.env("NO_COLOR", "1");
    c
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("archscale runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn toml_files(dir: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(dir))
        .expect("dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    v.sort();
    v
}

fn write(dir: &tempfile::TempDir, name: &str, body: &str) -> PathBuf {
    let p = dir.path().join(name);
    std::fs::write(&p, body).expect("write temp file");
    p
}

#[test]
fn every_experiment_and_arch_file_validates() {
    let mut files = toml_files("experiments");
    files.extend(toml_files("experiments/archs"));
    assert!(files.len() >= 22, "{files:?}");
    let args: Vec<String> = std::iter::once("validate".to_string())
        .chain(files.iter().map(|p| p.display().to_string()))
        .collect();
    let out = bin().args(&args).output().unwrap();
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}\n{}", stdout, text(&out.stderr));
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("ok: ")).count(),
        files.len(),
        "{stdout}"
    );
    assert!(
        stdout.contains("sambay_flops_scaling.toml (5 runs)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("sambayda.toml (arch, builds at depth 8, 16, 24)"),
        "{stdout}"
    );
}

#[test]
fn bad_file_exits_2_with_location_and_help() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(
        &dir,
        "bad.toml",
        "arch = \"transformer\"\ndepth = 8\nparametrization = \"mup++\"\n[train]\nseq_len = \"long\"\noptimizer = \"sgd\"\n",
    );
    let out = run(&["validate", f.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.contains("bad.toml:5:11"), "{err}");
    assert!(err.contains("bad.toml:6:13"), "{err}");
    assert!(err.contains("help:"), "{err}");
    assert!(err.contains("2 errors"), "{err}");
    assert!(
        text(&out.stdout).is_empty(),
        "nothing on stdout for invalid input"
    );
    // Nothing was written next to the file.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn unknown_key_says_did_you_mean() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(&dir, "typo.toml", "arch = \"transformer\"\ndepth = 8\nparametrization = \"mup++\"\n[base]\nlearning_rat = 1e-3\n");
    let out = run(&["validate", f.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.contains("unknown key `learning_rat`"), "{err}");
    assert!(
        err.contains("did you mean `lr`?") || err.contains("did you mean"),
        "{err}"
    );
    assert!(err.contains("typo.toml:5:1"), "{err}");
}

#[test]
fn sambayda_d12_is_rejected_naming_the_member() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(&dir, "da.toml", "arch = \"sambayda\"\ndepth = [8, 12, 16]\nparametrization = \"mup++\"\n[cluster]\ngpus_per_node = 8\n");
    let out = run(&["validate", f.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.contains("sweep member depth=12"), "{err}");
    assert!(err.contains("even number of heads and KV groups"), "{err}");
    assert!(err.contains("da.toml:2:13"), "{err}");
    assert!(!err.contains("depth=16"), "{err}");
}

#[test]
fn set_overrides_apply_and_bad_keys_are_diagnosed() {
    let ok = run(&[
        "validate",
        "experiments/quickstart.toml",
        "--set",
        "depth=[2,4]",
        "--set",
        "base.lr=1e-3",
    ]);
    assert!(ok.status.success(), "{}", text(&ok.stderr));
    assert!(
        text(&ok.stdout).contains("(2 runs)"),
        "{}",
        text(&ok.stdout)
    );
    let bad = run(&[
        "validate",
        "experiments/quickstart.toml",
        "--set",
        "train.seq_lem=64",
    ]);
    assert_eq!(bad.status.code(), Some(2));
    let err = text(&bad.stderr);
    assert!(err.contains("did you mean `train.seq_len`?"), "{err}");
}

#[test]
fn schema_command_prints_the_committed_schemas() {
    for kind in ["experiment", "arch"] {
        let out = run(&["schema", kind]);
        assert!(out.status.success());
        let committed = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("schema/{kind}.json")),
        )
        .unwrap();
        assert_eq!(text(&out.stdout), committed);
    }
    assert_ne!(run(&["schema", "nonsense"]).status.code(), Some(0));
}

#[test]
fn import_archscale_round_trips_through_validate() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&[&str], &str, &str); 3] = [
        (
            &[
                "--train_model",
                "phi4miniflash",
                "--depth",
                "32",
                "--ctx_len",
                "8192",
                "--max_tokens",
                "5e12",
                "--train_name",
                "scaling",
                "--base_hps.eta0=5e-4",
                "--base_hps.b0=8388608",
                "--base_hps.warmup_tokens0=25_165_824_000",
            ],
            "128",
            "8",
        ),
        (
            &[
                "--train_model",
                "transformer",
                "--depth",
                "16",
                "--ctx_len",
                "32768",
                "--max_tokens",
                "4e10",
                "--train_name",
                "scaling_mup_rbase_varlen",
            ],
            "1",
            "8",
        ),
        (
            &[
                "--train_model",
                "sambay",
                "--depth",
                "12",
                "--train_name",
                "scaling_mup",
            ],
            "3",
            "8",
        ),
    ];
    for (i, (argv, nodes, gpus)) in cases.iter().enumerate() {
        let mut args = vec![
            "import-archscale",
            "--nodes",
            nodes,
            "--gpus-per-node",
            gpus,
            "--",
        ];
        args.extend_from_slice(argv);
        let out = run(&args);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let toml = text(&out.stdout);
        let f = write(&dir, &format!("imported{i}.toml"), &toml);
        let v = run(&["validate", f.to_str().unwrap()]);
        assert!(v.status.success(), "{toml}\n{}", text(&v.stderr));
    }
}

#[test]
fn import_archscale_rejects_unknown_flags_by_name() {
    let out = run(&[
        "import-archscale",
        "--",
        "--train_model",
        "sambay",
        "--micro_bsz",
        "4",
        "--yarn_scale=2",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains("--micro_bsz") && err.contains("--yarn_scale"),
        "{err}"
    );
    assert!(text(&out.stdout).is_empty());
}

#[test]
fn a_new_hybrid_is_just_a_toml_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("archs")).unwrap();
    write(
        &dir,
        "archs/hymba.toml",
        r#"name = "hymba"
width = { aspect_ratio = 64 }
heads = "depth"
kv_groups = "depth // 2"
head_dim = 64
vocab_size = 1000
position = { kind = "rope", base = 10000 }
local_window = 256
token_rule = { mult = "14*ar^2" }

[[section]]
layers = "0 .. depth - 2"
pattern = ["mamba", { mixer = "attention", export_kv = "kv", export_memory = "m" }]

[[section]]
layers = "depth - 2 .. depth"
pattern = [{ mixer = "gmu", memory = "m" }, "cross_attention"]
"#,
    );
    let exp = write(
        &dir,
        "exp.toml",
        "arch = \"archs/hymba.toml\"\ndepth = 6\nparametrization = \"mup++\"\n[base]\nbatch_tokens = 32768\n[train]\nseq_len = 1024\n",
    );
    let out = run(&["plan", exp.to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let layers = plan["runs"][0]["layers"].as_array().unwrap();
    let kinds: Vec<&str> = layers
        .iter()
        .map(|l| l["mixer"]["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        [
            "mamba",
            "attention",
            "mamba",
            "attention",
            "gmu",
            "attention"
        ]
    );
    assert_eq!(layers[4]["mixer"]["memory_from"], 3);
    assert_eq!(layers[5]["mixer"]["kv_from"], 3);
}
