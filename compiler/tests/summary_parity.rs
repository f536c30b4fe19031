//! Every case of tests/data/archscale-hps.json, compiled from hand-built inputs (the
//! argv decoded in tests/common), against ArchScale's own summary. The end-to-end version
//! through import-archscale and the TOML specs is tests/plan_parity.rs at the root.

mod common;

use common::compare;
use serde_json::Value;

const CASES: &str = include_str!("../../tests/data/archscale-hps.json");

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
                compare(
                    "summary",
                    &plan.archscale_summary,
                    &case["summary"],
                    &mut errors,
                );
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
