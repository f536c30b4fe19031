//! A model trained on the built-in synthetic TEXT corpus (byte tokens, as the quickstart):
//! every eval task, generation and export run on it with the tokenizer picked from the
//! data source, and the results are well formed and deterministic.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_archscale");

fn archscale(dir: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_str(&ok(out)).unwrap()
}

/// The quickstart's data and model family, shrunk: depth 2, T 64, 8 steps of 256 tokens.
fn train(dir: &Path) -> PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let quickstart = std::fs::read_to_string(repo.join("experiments/quickstart.toml")).unwrap();
    assert!(
        quickstart.contains("corpus = \"text\""),
        "quickstart trains on text"
    );
    let text = r#"arch = "tiny-transformer"
depth = 2
parametrization = "sp"

[base]
depth = 2
lr = 3e-3
batch_tokens = 256
warmup_tokens = 512
min_lr = 3e-4

[train]
tokens = 2048
seq_len = 64
micro_batch = 4
schedule = "cosine"
eval_interval = 4
save_interval = 4
log_interval = 1

[data]
train = [{ synthetic = { corpus = "text", seed = 7, tokens = 100_000 } }]
val = [{ synthetic = { corpus = "text", seed = 8, tokens = 10_000 } }]

[cluster]
nodes = 1
gpus_per_node = 1
"#;
    let path = dir.join("text.toml");
    std::fs::write(&path, text).unwrap();
    ok(&archscale(
        dir,
        &["run", path.to_str().unwrap(), "--backend", "cpu"],
    ));
    let run = std::fs::read_dir(dir.join("runs"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.join("plan.json").is_file())
        .unwrap();
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let losses: Vec<f64> = metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["loss"].as_f64())
        .collect();
    assert_eq!(losses.len(), 8);
    assert!(
        losses[7] < losses[0] - 0.5,
        "byte-level loss falls: {losses:?}"
    );
    run
}

#[test]
fn text_corpus_model_runs_every_eval_generate_and_export() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let run = train(dir);
    let run_s = run.to_str().unwrap();
    let choices =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments/evals/quickstart_choice.jsonl");
    let args = [
        "eval",
        run_s,
        "--task",
        "val,phonebook,niah,choice",
        "--backend",
        "cpu",
        "--val-batches",
        "2",
        "--min-size",
        "3",
        "--max-size",
        "5",
        "--num-eval",
        "2",
        "--phonebook-batches",
        "4",
        "--batch-size",
        "2",
        "--lengths",
        "448",
        "--depths",
        "0,1",
        "--samples",
        "1",
        "--choices",
        choices.to_str().unwrap(),
        "--json",
    ];
    let a = json(&archscale(dir, &args));
    assert_eq!(a, json(&archscale(dir, &args)), "evals are deterministic");
    let val = a["val"]["at"][0]["loss"].as_f64().unwrap();
    assert!(val.is_finite() && val < (512f64).ln(), "{val}");
    let sizes = a["phonebook"]["sizes"].as_array().unwrap();
    assert_eq!(sizes.len(), 2);
    for s in sizes {
        assert_eq!(s["samples"].as_array().unwrap().len(), 8);
        let acc = s["accuracy_mean"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&acc));
        // Byte tokens: a book of 3 entries is well over 100 tokens.
        assert!(s["prompt_tokens_mean"].as_f64().unwrap() > 100.0);
        for sample in s["samples"].as_array().unwrap() {
            let label = sample["label"].as_str().unwrap();
            assert!(label.len() == 10 && label.bytes().all(|b| b.is_ascii_digit()));
        }
    }
    let cells = a["niah"]["cells"].as_array().unwrap();
    assert_eq!(cells.len(), 2);
    for c in cells {
        let tokens = c["prompt_tokens_mean"].as_f64().unwrap();
        assert!(tokens > 400.0 && tokens <= 448.0, "{tokens}");
    }
    let ch = &a["choice"];
    assert_eq!(ch["items"], 12);
    for s in ch["scores"].as_array().unwrap() {
        assert!(s["loglikelihoods"]
            .as_array()
            .unwrap()
            .iter()
            .all(|l| l.as_f64().unwrap() < 0.0));
    }
    // The readable table names every task.
    let table = ok(&archscale(dir, &args[..args.len() - 1]));
    for word in ["val on cpu", "phonebook", "niah", "acc_norm"] {
        assert!(table.contains(word), "{word} in {table}");
    }

    // generate: text in, text out (the byte tokenizer), deterministic for a seed.
    let gen = |seed: &str| {
        json(&archscale(
            dir,
            &[
                "generate",
                run_s,
                "--prompt",
                "The old miller",
                "--max-new-tokens",
                "24",
                "--temperature",
                "0.8",
                "--seed",
                seed,
                "--ignore-eos",
                "--json",
            ],
        ))
    };
    let g = gen("1");
    assert_eq!(g, gen("1"));
    assert_eq!(
        g["prompt_ids"].as_array().unwrap().len(),
        "The old miller".len()
    );
    assert_eq!(g["ids"].as_array().unwrap().len(), 24);
    assert!(g["text"].is_string());
    let plain = ok(&archscale(
        dir,
        &[
            "generate",
            run_s,
            "--prompt",
            "The sky",
            "--max-new-tokens",
            "8",
        ],
    ));
    assert!(plain.starts_with("The sky"), "{plain}");

    // export: safetensors, config with the graph, and the verification sample.
    ok(&archscale(
        dir,
        &["export", run_s, "--format", "hf", "--out", "export"],
    ));
    let read = |name: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(dir.join("export").join(name)).unwrap())
            .unwrap()
    };
    let cfg = read("config.json");
    assert_eq!(cfg["resolved"]["n_layer"], 2);
    assert_eq!(cfg["blocks"].as_array().unwrap().len(), 2);
    assert_eq!(cfg["blocks"][0]["mixer"]["kind"], "attention");
    assert_eq!(cfg["multipliers"]["logit_scale"], 1.0);
    let verify = read("verify.json");
    let rows = verify["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].as_array().unwrap().len(), 65);
    let lps = verify["target_logprobs"][1].as_array().unwrap();
    assert_eq!(lps.len(), 64);
    assert!(lps.iter().all(|l| l.as_f64().unwrap() <= 0.0));
    let loss = verify["mean_loss"].as_f64().unwrap();
    assert!(loss.is_finite() && loss > 0.0);
    assert_eq!(
        verify["full_logprobs"][0][2].as_array().unwrap().len(),
        cfg["resolved"]["padded_vocab_size"].as_u64().unwrap() as usize
    );
    // The same sample from a bf16 export is computed on the bf16-rounded values.
    ok(&archscale(
        dir,
        &["export", run_s, "--out", "export-bf16", "--dtype", "bf16"],
    ));
    let bf16: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("export-bf16/verify.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(bf16["rows"], verify["rows"]);
    assert_ne!(bf16["target_logprobs"], verify["target_logprobs"]);
}
