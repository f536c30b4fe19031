//! The whole pipeline below the CLI: ArchScale argv -> import-archscale TOML -> parsed and
//! validated Experiment -> `plan_experiment`. First against ArchScale's own numbers
//! (tests/data/archscale-hps.json), then against the hand-built families of tests/common
//! on a grid of families, depths, train names, token budgets, contexts and cluster sizes:
//! the arch TOMLs and their expansion must give the same plans as the rules restated there.

mod common;

use common::compare;
use serde_json::Value;
use std::path::Path;

const CASES: &str = include_str!("../../tests/data/archscale-hps.json");

fn pipeline(
    argv: &[String],
    nodes: usize,
    gpus: usize,
) -> Result<Vec<archscale_compiler::Plan>, String> {
    let toml = archscale_spec::import::archscale_argv_to_toml(argv, nodes, gpus)
        .map_err(|e| format!("import: {e}"))?;
    let experiment = archscale_spec::parse_experiment("imported.toml", &toml, Path::new("."), &[])
        .map_err(|e| format!("validate: {}", e.render()))?;
    archscale_compiler::plan_experiment(&experiment).map_err(|e| format!("plan: {}", e.render()))
}

#[test]
fn reference_cases_through_import() {
    let data: Value = serde_json::from_str(CASES).unwrap();
    let mut failures = Vec::new();
    for case in data["cases"].as_array().unwrap() {
        let argv: Vec<String> = case["argv"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_string())
            .collect();
        let nodes = case["nodes"].as_u64().unwrap() as usize;
        let gpus = case["gpus_per_node"].as_u64().unwrap() as usize;
        let label = argv.join(" ");
        let result = pipeline(&argv, nodes, gpus);
        if case.get("expect").and_then(Value::as_str) == Some("reject") {
            match result {
                Err(diag) if !diag.trim().is_empty() => {}
                _ => failures.push(format!("{label}: expected a rejection with a diagnostic")),
            }
            continue;
        }
        match result {
            Err(e) => failures.push(format!("{label}: {e}")),
            Ok(plans) => {
                let mut errors = Vec::new();
                compare(
                    "summary",
                    &plans[0].archscale_summary,
                    &case["summary"],
                    &mut errors,
                );
                if !errors.is_empty() {
                    failures.push(format!("{label}:\n  {}", errors.join("\n  ")));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn arch_specs_agree_with_the_restated_rules() {
    let families: &[(&str, &[usize])] = &[
        ("transformer", &[8, 12, 16, 20, 24]),
        ("transformerls", &[8, 12, 16, 20, 24]),
        ("samba", &[8, 12, 16, 20, 24]),
        ("sambay", &[8, 12, 16, 20, 24]),
        ("sambayda", &[8, 16, 24]),
        ("sambayoco", &[8, 12, 16, 20, 24]),
        ("phi4miniflash", &[32]),
    ];
    let names = [
        "scaling",
        "scaling_mup",
        "scaling_mup_tie",
        "scaling_ori_mup",
        "scaling_mup_rbase_varlen",
        "scaling_mup_hadam_cosine",
        "scaling_mup_muon_wsd",
        "scaling_muon",
        "scaling_mup_ls_tie",
        "scaling_mup_tie_rbase_prolong_varlen",
    ];
    let extras: [&[&str]; 5] = [
        &[],
        &["--max_tokens", "3e11"],
        &["--ctx_len", "2048"],
        &["--ctx_len", "8192", "--swa_len", "256"],
        &["--base_hps.eta0=1e-3", "--base_hps.b0=4194304"],
    ];
    let mut failures = Vec::new();
    let mut cases = 0;
    for (family, depths) in families {
        for depth in *depths {
            for name in names {
                for extra in extras {
                    for nodes in [1, 3, 8] {
                        let mut argv: Vec<String> = [
                            "--train_model",
                            family,
                            "--depth",
                            &depth.to_string(),
                            "--train_name",
                            name,
                        ]
                        .iter()
                        .map(|s| s.to_string())
                        .collect();
                        argv.extend(extra.iter().map(|s| s.to_string()));
                        let label = format!("{} on {nodes} node(s)", argv.join(" "));
                        cases += 1;
                        let hand = archscale_compiler::compile(&common::from_argv(&argv, nodes, 8));
                        match (hand, pipeline(&argv, nodes, 8)) {
                            (Ok(a), Ok(b)) => {
                                let b = &b[0];
                                let same = a.run_name == b.run_name
                                    && a.model == b.model
                                    && a.layers == b.layers
                                    && a.params == b.params
                                    && a.optimizer == b.optimizer
                                    && a.schedule == b.schedule
                                    && a.layout == b.layout
                                    && a.archscale_summary == b.archscale_summary;
                                if !same {
                                    failures.push(format!(
                                        "{label}: plans differ ({} vs {})",
                                        a.run_name, b.run_name
                                    ));
                                }
                            }
                            (Err(_), Err(_)) => {}
                            (Ok(_), Err(e)) => {
                                failures.push(format!("{label}: only the pipeline rejects: {e}"))
                            }
                            (Err(e), Ok(_)) => {
                                failures.push(format!("{label}: only compile rejects: {e}"))
                            }
                        }
                    }
                }
            }
        }
    }
    assert!(cases > 4000);
    assert!(
        failures.is_empty(),
        "{} of {cases} differ:\n{}",
        failures.len(),
        failures[..failures.len().min(20)].join("\n")
    );
}
