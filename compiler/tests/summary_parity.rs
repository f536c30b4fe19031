//! Every case of tests/data/archscale-hps.json, compiled from hand-built inputs (the
//! argv decoded in tests/common), against ArchScale's own summary. The end-to-end version
//! through import-archscale and the TOML specs is tests/plan_parity.rs at the root.

mod common;

use serde_json::Value;

const CASES: &str = include_str!("../../tests/data/archscale-hps.json");

/// Integers equal (and still integers), floats within 1e-12 relative (and still floats),
/// everything else equal; `path` names the key in messages.
fn compare(path: &str, got: &Value, want: &Value, errors: &mut Vec<String>) {
    match (got, want) {
        (Value::Number(g), Value::Number(w)) => {
            if w.is_f64() != g.is_f64() {
                errors.push(format!("{path}: {g} vs {w} (int/float kind differs)"));
            } else if w.is_f64() {
                let (g, w) = (g.as_f64().unwrap(), w.as_f64().unwrap());
                if (g - w).abs() > 1e-12 * w.abs() {
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

#[test]
fn every_reference_case() {
    let data: Value = serde_json::from_str(CASES).unwrap();
    let cases = data["cases"].as_array().unwrap();
    assert!(cases.len() >= 24);
    let mut failures = Vec::new();
    for case in cases {
        let argv: Vec<String> = case["argv"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_string())
            .collect();
        let nodes = case["nodes"].as_u64().unwrap() as usize;
        let gpus = case["gpus_per_node"].as_u64().unwrap() as usize;
        let inputs = common::from_argv(&argv, nodes, gpus);
        let result = archscale_compiler::compile(&inputs);
        let label = argv.join(" ");
        if case.get("expect").and_then(Value::as_str) == Some("reject") {
            if result.is_ok() {
                failures.push(format!("{label}: expected a rejection"));
            }
            continue;
        }
        match result {
            Err(e) => failures.push(format!("{label}: {e}")),
            Ok(plan) => {
                let mut errors = Vec::new();
                compare("summary", &plan.archscale_summary, &case["summary"], &mut errors);
                if !errors.is_empty() {
                    failures.push(format!("{label}:\n  {}", errors.join("\n  ")));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} case(s) differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
