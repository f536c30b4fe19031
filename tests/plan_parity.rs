//! The parity contract: every case of tests/data/archscale-hps.json (ArchScale's own
//! setup() output) goes argv -> import-archscale TOML -> load and expand -> compile, and
//! the plan's `archscale_summary` must equal the reference key by key: integers equal
//! (and still integers), floats within 1e-12 relative, bools and strings equal, lists
//! elementwise. `expect: reject` cases must fail with a diagnostic.
//!
//! Also the `archscale plan` command itself: JSON shape, `--run`, exit codes.

use serde_json::Value;
use std::path::Path;
use std::process::Command;

const CASES: &str = include_str!("data/archscale-hps.json");

fn compare(path: &str, got: &Value, want: &Value, errors: &mut Vec<String>) {
    match (got, want) {
        (Value::Number(g), Value::Number(w)) => {
            if w.is_f64() != g.is_f64() {
                errors.push(format!("{path}: {g} vs {w} (int/float kind differs)"));
            } else if w.is_f64() {
                let (g, w) = (
                    g.as_f64().unwrap_or(f64::NAN),
                    w.as_f64().unwrap_or(f64::NAN),
                );
                // NaN on either side is a mismatch
                let close = (g - w).abs() <= 1e-12 * w.abs();
                if !close {
                    errors.push(format!("{path}: {g:e} vs {w:e}"));
                }
            } else if g.as_i64() != w.as_i64() {
                errors.push(format!("{path}: {g} vs {w}"));
            }
        }
        (Value::Array(g), Value::Array(w)) => {
            if g.len() != w.len() {
                errors.push(format!("{path}: {} items vs {}", g.len(), w.len()));
            }
            for (i, (g, w)) in g.iter().zip(w).enumerate() {
                compare(&format!("{path}[{i}]"), g, w, errors);
            }
        }
        (Value::Object(g), Value::Object(w)) => {
            for k in w.keys().filter(|k| !g.contains_key(*k)) {
                errors.push(format!("{path}.{k}: missing"));
            }
            for k in g.keys().filter(|k| !w.contains_key(*k)) {
                errors.push(format!("{path}.{k}: not in the reference"));
            }
            for (k, w) in w {
                if let Some(g) = g.get(k) {
                    compare(&format!("{path}.{k}"), g, w, errors);
                }
            }
        }
        (g, w) if g == w => {}
        (g, w) => errors.push(format!("{path}: {g} vs {w}")),
    }
}

/// argv -> TOML -> Experiment -> plans, or the diagnostic text of the stage that refused.
fn plan_case(
    argv: &[String],
    nodes: usize,
    gpus: usize,
) -> Result<Vec<archscale_compiler::Plan>, String> {
    let toml = archscale_spec::import::archscale_argv_to_toml(argv, nodes, gpus)
        .map_err(|e| format!("import: {e}"))?;
    let experiment = archscale_spec::parse_experiment("imported.toml", &toml, Path::new("."), &[])
        .map_err(|e| format!("validate: {}\n{toml}", e.render()))?;
    archscale_compiler::plan_experiment(&experiment).map_err(|e| format!("plan: {}", e.render()))
}

#[test]
fn every_reference_case_matches_archscale() {
    let data: Value = serde_json::from_str(CASES).unwrap();
    let cases = data["cases"].as_array().unwrap();
    let mut failures = Vec::new();
    let (mut compared, mut rejected) = (0, 0);
    for case in cases {
        let argv: Vec<String> = case["argv"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_string())
            .collect();
        let nodes = case["nodes"].as_u64().unwrap() as usize;
        let gpus = case["gpus_per_node"].as_u64().unwrap() as usize;
        let label = argv.join(" ");
        let result = plan_case(&argv, nodes, gpus);
        if case.get("expect").and_then(Value::as_str) == Some("reject") {
            match result {
                Ok(_) => failures.push(format!("{label}: expected a rejection, got a plan")),
                Err(diag) if diag.trim().is_empty() => {
                    failures.push(format!("{label}: rejected without a diagnostic"))
                }
                Err(_) => rejected += 1,
            }
            continue;
        }
        match result {
            Err(e) => failures.push(format!("{label}: {e}")),
            Ok(plans) if plans.len() != 1 => {
                failures.push(format!("{label}: {} runs, expected 1", plans.len()))
            }
            Ok(plans) => {
                let mut errors = Vec::new();
                compare(
                    "summary",
                    &plans[0].archscale_summary,
                    &case["summary"],
                    &mut errors,
                );
                if errors.is_empty() {
                    compared += 1;
                } else {
                    failures.push(format!("{label}:\n  {}", errors.join("\n  ")));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} case(s) fail:\n{}",
        failures.len(),
        failures.join("\n\n")
    );
    assert_eq!(compared + rejected, cases.len());
    assert!(
        rejected >= 2 && compared >= 22,
        "{compared} compared, {rejected} rejected"
    );
}

fn archscale(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_archscale"))
        .args(args)
        .output()
        .expect("run archscale")
}

fn write_temp(name: &str, text: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(name), text).unwrap();
    dir
}

fn imported(argv: &[&str], nodes: usize, gpus: usize) -> String {
    let argv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
    archscale_spec::import::archscale_argv_to_toml(&argv, nodes, gpus).unwrap()
}

#[test]
fn plan_json_is_the_runs_object_and_run_selects_one() {
    let toml = imported(
        &[
            "--train_model",
            "sambay",
            "--depth",
            "8",
            "--train_name",
            "scaling_mup",
        ],
        1,
        8,
    );
    let dir = write_temp("sambay.toml", &toml);
    let file = dir.path().join("sambay.toml");
    let file = file.to_str().unwrap();

    let out = archscale(&["plan", file, "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    let runs = json["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0]["run_name"], "scaling_mup_sambay_d8_ctx4096");
    assert_eq!(runs[0]["archscale_summary"]["params"], 190340000);
    // Two invocations print the same bytes (stable key order).
    assert_eq!(archscale(&["plan", file, "--json"]).stdout, out.stdout);

    // A depth sweep through --set: one summary row per run, then every run.
    let out = archscale(&["plan", file, "--set", "depth=[8, 12, 16]"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("3 runs"), "{text}");
    for d in [8, 12, 16] {
        assert!(
            text.contains(&format!("== scaling_mup_sambay_d{d}_ctx4096 ==")),
            "{text}"
        );
    }
    assert!(text.contains("M S M S | M* A | G X"), "{text}");

    let out = archscale(&[
        "plan",
        file,
        "--set",
        "depth=[8, 12]",
        "--run",
        "scaling_mup_sambay_d12_ctx4096",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["runs"].as_array().unwrap().len(), 1);
    assert_eq!(json["runs"][0]["model"]["n_layer"], 12);

    let out = archscale(&["plan", file, "--run", "nope"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("scaling_mup_sambay_d8_ctx4096"));
}

#[test]
fn invalid_input_exits_2_with_a_diagnostic_and_prints_nothing() {
    // sambayda at depth 12 has 3 KV groups: differential attention cannot pair them.
    let toml = imported(
        &[
            "--train_model",
            "sambayda",
            "--depth",
            "12",
            "--train_name",
            "scaling_mup",
        ],
        1,
        8,
    );
    let dir = write_temp("da.toml", &toml);
    let out = archscale(&[
        "plan",
        dir.path().join("da.toml").to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
    assert!(!out.stderr.is_empty());

    let out = archscale(&["plan", "/nonexistent/experiment.toml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
}
