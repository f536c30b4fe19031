//! End-to-end tests of the analysis commands on real (tiny) CPU runs: `fit`, `plot`,
//! `eval` (val on the synthetic corpus; Phonebook, NIAH and multiple choice on a GPT-2
//! vocabulary model trained on prepared text), `generate` and `export`.

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

/// A tiny Transformer++ sweep on the synthetic corpus: 8 steps of 256 tokens per depth.
fn experiment(
    dir: &Path,
    arch: &str,
    depths: &str,
    lr: &str,
    data: &str,
    out_dir: &str,
) -> PathBuf {
    let text = format!(
        r#"arch = "{arch}"
depth = {depths}
parametrization = "sp"

[base]
depth = 2
lr = {lr}
batch_tokens = 256
warmup_tokens = 512
min_lr = 3e-4

[train]
tokens = 2048
seq_len = 32
micro_batch = 4
schedule = "cosine"
eval_interval = 4
save_interval = 4
log_interval = 1
out_dir = "{out_dir}"

[data]
{data}

[cluster]
nodes = 1
gpus_per_node = 1
"#
    );
    let path = dir.join(format!("{out_dir}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

const SYNTHETIC: &str = r#"train = [{ synthetic = { seed = 11, tokens = 200_000 } }]
val = [{ synthetic = { seed = 12, tokens = 20_000 } }]"#;

fn runs_in(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("plan.json").is_file())
        .collect();
    v.sort();
    v
}

fn final_val(run: &Path) -> f64 {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["final"] == true)
        .filter_map(|v| v["val_loss@1x"].as_f64())
        .next_back()
        .unwrap()
}

fn assert_figure(stem: &Path) {
    let svg = std::fs::read_to_string(stem.with_extension("svg")).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.contains("<text") && svg.len() > 2000,
        "svg of {}",
        stem.display()
    );
    let png = std::fs::read(stem.with_extension("png")).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "png of {}",
        stem.display()
    );
}

#[test]
fn sweep_fit_plot_eval_generate_export() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let exp = experiment(
        dir,
        "tiny-transformer",
        "[1, 2, 3]",
        "3e-3",
        SYNTHETIC,
        "runs",
    );
    ok(&archscale(
        dir,
        &["run", exp.to_str().unwrap(), "--backend", "cpu"],
    ));
    let lr_exp = experiment(dir, "tiny-transformer", "2", "1e-3", SYNTHETIC, "runs_lr");
    ok(&archscale(
        dir,
        &["run", lr_exp.to_str().unwrap(), "--backend", "cpu"],
    ));
    let runs = runs_in(&dir.join("runs"));
    assert_eq!(runs.len(), 3);

    // fit: one group of three points, JSON and figure.
    let fit = json(&archscale(
        dir,
        &[
            "fit",
            "runs",
            "--x",
            "params",
            "--json",
            "--bootstrap",
            "50",
            "--figure",
            "figs/scaling",
        ],
    ));
    let groups = fit["study"]["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 1);
    assert_eq!(groups[0]["group"], "tiny-transformer");
    assert_eq!(groups[0]["points"].as_array().unwrap().len(), 3);
    let f = &groups[0]["fit"];
    assert!(
        f["a"].as_f64().unwrap() >= 0.0 && f["r2"].as_f64().unwrap().is_finite(),
        "{f}"
    );
    let c = f["c"].as_f64().unwrap();
    let min_loss = runs
        .iter()
        .map(|r| final_val(r))
        .fold(f64::INFINITY, f64::min);
    assert!(
        (0.0..=min_loss + 1e-12).contains(&c),
        "C = {c} outside [0, {min_loss}]"
    );
    assert_figure(&dir.join("figs/scaling"));
    // The LR-sweep run shares depth 2 and the budget: it is kept out of the fit unless better.
    let both = json(&archscale(
        dir,
        &[
            "fit",
            "runs",
            "runs_lr",
            "--x",
            "flops",
            "--json",
            "--no-figure",
            "--bootstrap",
            "0",
        ],
    ));
    let g = &both["study"]["groups"][0];
    assert_eq!(
        g["points"].as_array().unwrap().len() + g["superseded"].as_array().unwrap().len(),
        4
    );
    let table = ok(&archscale(
        dir,
        &[
            "fit",
            "runs",
            "--x",
            "tokens",
            "--no-figure",
            "--bootstrap",
            "0",
        ],
    ));
    assert!(
        table.contains("tiny-transformer") && table.contains("R²"),
        "{table}"
    );

    // One curve per model: three single-point groups, each without a fit and saying why.
    let per_model = json(&archscale(
        dir,
        &[
            "fit",
            "runs",
            "--group-by",
            "model",
            "--json",
            "--no-figure",
        ],
    ));
    let groups = per_model["study"]["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 3);
    assert!(groups
        .iter()
        .all(|g| g["fit"].is_null() && g["note"].as_str().unwrap().contains("at least 3")));

    // plot: loss curves, and an LR sweep because two runs differ only in LR.
    let out = ok(&archscale(
        dir,
        &["plot", "runs", "runs_lr", "--out-dir", "figs"],
    ));
    assert!(out.contains("lr_sweep.png"), "{out}");
    assert_figure(&dir.join("figs/loss_curves"));
    assert_figure(&dir.join("figs/lr_sweep"));

    // eval val on the final checkpoint reproduces the logged final validation loss.
    let d2 = runs
        .iter()
        .find(|r| r.to_string_lossy().contains("_d2_"))
        .unwrap();
    let ev = json(&archscale(
        dir,
        &[
            "eval",
            d2.to_str().unwrap(),
            "--task",
            "val",
            "--backend",
            "cpu",
            "--json",
        ],
    ));
    assert_eq!(ev["val"]["backend"], "cpu");
    let loss = ev["val"]["at"][0]["loss"].as_f64().unwrap();
    assert!(
        (loss - final_val(d2)).abs() < 1e-9,
        "eval {loss} vs logged {}",
        final_val(d2)
    );
    let longer = json(&archscale(
        dir,
        &[
            "eval",
            d2.to_str().unwrap(),
            "--task",
            "val",
            "--extrapolate",
            "3",
            "--val-batches",
            "2",
            "--json",
        ],
    ));
    assert_eq!(longer["val"]["at"].as_array().unwrap().len(), 3);
    // --backend auto (the default) takes CUDA when present, else the CPU with a warning.
    let name = longer["val"]["backend"].as_str().unwrap();
    assert!(name == "cpu" || name.starts_with("cuda"), "{name}");

    // generate: ids in, ids out, deterministic for a seed.
    let gen = |seed: &str| {
        json(&archscale(
            dir,
            &[
                "generate",
                d2.to_str().unwrap(),
                "--prompt",
                "5 8 6",
                "--max-new-tokens",
                "12",
                "--temperature",
                "0.9",
                "--top-p",
                "0.9",
                "--seed",
                seed,
                "--json",
                "--ignore-eos",
            ],
        ))
    };
    let (a, b) = (gen("3"), gen("3"));
    assert_eq!(a, b);
    assert_eq!(a["ids"].as_array().unwrap().len(), 12);
    assert!(a["ids"]
        .as_array()
        .unwrap()
        .iter()
        .all(|v| v.as_u64().unwrap() < 512));

    // export: safetensors + config.
    ok(&archscale(
        dir,
        &[
            "export",
            d2.to_str().unwrap(),
            "--format",
            "hf",
            "--out",
            "export",
        ],
    ));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("export/config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["name"], "tiny-transformer_d2");
    assert_eq!(cfg["resolved"]["n_layer"], 2);
    assert!(
        std::fs::metadata(dir.join("export/model.safetensors"))
            .unwrap()
            .len()
            > 100_000
    );

    // Text tasks on an ids model, and bad input, fail cleanly.
    let pb = archscale(dir, &["eval", d2.to_str().unwrap(), "--task", "phonebook"]);
    assert!(!pb.status.success() && String::from_utf8_lossy(&pb.stderr).contains("text tokenizer"));
    assert_eq!(
        archscale(dir, &["fit", "no-such-dir"]).status.code(),
        Some(2)
    );
    assert_eq!(
        archscale(dir, &["eval", "no-such-dir", "--task", "val"])
            .status
            .code(),
        Some(2)
    );
}

/// A Transformer++ with GPT-2's vocabulary, trained two steps on prepared text, runs the
/// text evals end to end, deterministically.
#[test]
fn text_model_phonebook_niah_choice() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let paragraphs: Vec<String> = (0..60)
        .map(|i| {
            format!(
                "Entry {i}: the river runs past the old mill, and the miller counts {} sacks of grain before noon. \
                 Travellers ask for directions to the harbor; the answer is always the same.",
                i * 7 + 3
            )
        })
        .collect();
    std::fs::write(dir.join("corpus.txt"), paragraphs.join("\n\n")).unwrap();
    ok(&archscale(
        dir,
        &[
            "prepare",
            "corpus.txt",
            "--out",
            "data/text",
            "--val-fraction",
            "0.5",
            "--chunk-size",
            "8196",
            "-q",
        ],
    ));
    std::fs::create_dir_all(dir.join("archs")).unwrap();
    std::fs::write(
        dir.join("archs/tiny-gpt2.toml"),
        r#"name = "tiny-gpt2"
width = { n_embd = 32 }
heads = 2
kv_groups = 1
head_dim = 16
mlp = { kind = "swiglu", expand = 4 }
vocab_size = 50257
padding_multiple = 64
norm = { kind = "rmsnorm", eps = 1e-5 }
position = { kind = "rope", base = 10000 }
token_rule = { mult = "15 * n_embd^2 / depth^2" }

[[section]]
layers = "0 .. depth"
pattern = ["attention"]
"#,
    )
    .unwrap();
    let data = r#"train = [{ dir = "data/text", prefix = "train" }]
val = [{ dir = "data/text", prefix = "validation" }]"#;
    let exp = experiment(dir, "archs/tiny-gpt2.toml", "2", "3e-3", data, "runs");
    let text = std::fs::read_to_string(&exp)
        .unwrap()
        .replace("tokens = 2048", "tokens = 512");
    std::fs::write(&exp, text).unwrap();
    ok(&archscale(
        dir,
        &["run", exp.to_str().unwrap(), "--backend", "cpu"],
    ));
    let run = runs_in(&dir.join("runs")).pop().unwrap();
    std::fs::write(
        dir.join("items.jsonl"),
        "{\"context\": \"The river runs past the old\", \"choices\": [\" mill\", \" moon\"], \"label\": 0}\n\
         {\"context\": \"Travellers ask for directions to the \", \"choices\": [\"harbor\", \"sky\", \"number\"], \"label\": 0}\n\
         {\"context\": \"\", \"choices\": [\"Entry\", \"Zebra\"], \"label\": 0}\n",
    )
    .unwrap();
    let args = [
        "eval",
        run.to_str().unwrap(),
        "--task",
        "phonebook,niah,choice",
        "--min-size",
        "4",
        "--max-size",
        "4",
        "--phonebook-batches",
        "4",
        "--batch-size",
        "1",
        "--lengths",
        "96",
        "--depths",
        "0,1",
        "--samples",
        "1",
        "--items",
        "items.jsonl",
        "--json",
    ];
    let a = json(&archscale(dir, &args));
    let b = json(&archscale(dir, &args));
    assert_eq!(a, b, "evals are deterministic");
    // NIAH prompts and choice items decoded 2 and 3 at a time score as one at a time.
    let mut batched = args.to_vec();
    batched[3] = "niah,choice";
    assert_eq!(batched[10], "--batch-size");
    batched[11] = "3";
    let c = json(&archscale(dir, &batched));
    assert_eq!(c["niah"]["cells"], a["niah"]["cells"]);
    assert_eq!(c["choice"], a["choice"]);
    let pb = &a["phonebook"]["sizes"][0];
    assert_eq!(pb["size"], 4);
    assert_eq!(pb["samples"].as_array().unwrap().len(), 4);
    let acc = pb["accuracy_mean"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&acc));
    assert!(pb["prompt_tokens_mean"].as_f64().unwrap() > 30.0);
    let cells = a["niah"]["cells"].as_array().unwrap();
    assert_eq!(cells.len(), 2);
    assert!(cells
        .iter()
        .all(|c| c["prompt_tokens_mean"].as_f64().unwrap() <= 96.0));
    let ch = &a["choice"];
    assert_eq!(ch["items"], 3);
    let lls = ch["scores"][1]["loglikelihoods"].as_array().unwrap();
    assert_eq!(lls.len(), 3);
    assert!(lls.iter().all(|l| l.as_f64().unwrap() < 0.0));
    // The readable table names every task.
    let table = ok(&archscale(dir, &args[..args.len() - 1]));
    assert!(
        table.contains("phonebook") && table.contains("niah") && table.contains("acc_norm"),
        "{table}"
    );
    // GPT-2 generation decodes text.
    let g = json(&archscale(
        dir,
        &[
            "generate",
            run.to_str().unwrap(),
            "--prompt",
            "The river",
            "--max-new-tokens",
            "5",
            "--json",
            "--ignore-eos",
        ],
    ));
    assert_eq!(g["ids"].as_array().unwrap().len(), 5);
    assert!(g["text"].is_string());
}
