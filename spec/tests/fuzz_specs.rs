//! Property tests: random and mutated spec files never panic, and every error carries a
//! non-empty-source span that lies inside its own source text.

use archscale_spec::{arch, experiment, parse_experiment, SourceFile, SpecError, SpecErrors};
use proptest::prelude::*;
use std::path::Path;

const SEEDS: &[&str] = &[
    include_str!("../../experiments/quickstart.toml"),
    include_str!("../../experiments/sambay_flops_scaling.toml"),
    include_str!("../../experiments/transformer_lr_sweep.toml"),
    include_str!("../../experiments/transformer_data_scaling.toml"),
    include_str!("../../experiments/phi4miniflash_pretrain.toml"),
    include_str!("../../experiments/transformer_long_context.toml"),
];

fn spans_ok(errors: &[SpecError]) -> Result<(), String> {
    if errors.is_empty() {
        return Err("an Err with no errors".into());
    }
    for e in errors {
        let len = e.src.text.len();
        if e.span.start > e.span.end || e.span.end > len {
            return Err(format!(
                "span {:?} outside {} ({} bytes): {}",
                e.span, e.src.name, len, e.message
            ));
        }
        if e.message.is_empty() {
            return Err("empty message".into());
        }
        if !e.src.text.is_char_boundary(e.span.start) || !e.src.text.is_char_boundary(e.span.end) {
            return Err(format!(
                "span {:?} splits a character: {}",
                e.span, e.message
            ));
        }
        for (s, _) in &e.extra {
            if s.end > len {
                return Err(format!("extra label {s:?} outside {}", e.src.name));
            }
        }
    }
    Ok(())
}

fn check_experiment(text: &str, overrides: &[String]) -> Result<(), String> {
    match parse_experiment("fuzz.toml", text, Path::new("/nonexistent"), overrides) {
        Ok(e) => {
            if e.runs.is_empty() {
                return Err("Ok with no runs".into());
            }
            Ok(())
        }
        Err(SpecErrors { errors }) => {
            // Rendering must not panic either.
            let _ = SpecErrors::new(errors.clone()).render();
            spans_ok(&errors)
        }
    }
}

/// Edits that keep a file mostly TOML: delete, duplicate, replace a token, swap a value.
#[derive(Debug, Clone)]
enum Edit {
    Delete(usize, usize),
    Insert(usize, String),
    DuplicateLine(usize),
    ReplaceValue(usize, String),
}

fn edit_strategy() -> impl Strategy<Value = Edit> {
    let snippet = prop_oneof![
        Just("0".to_string()),
        Just("-1".to_string()),
        Just("1e400".to_string()),
        Just("\"sambayda\"".to_string()),
        Just("[8, 12, 20]".to_string()),
        Just("\"\"".to_string()),
        Just("true".to_string()),
        Just("{ kind = \"wsd\" }".to_string()),
        Just("[sweep]\ndepth = []\n".to_string()),
        Just("\n[train]\nfoo = 1\n".to_string()),
        Just("{".to_string()),
        Just("é".to_string()),
        "[a-z_.=\\[\\]{}\" 0-9\n]{1,12}",
    ];
    prop_oneof![
        (any::<usize>(), 0usize..20).prop_map(|(a, n)| Edit::Delete(a, n)),
        (any::<usize>(), snippet.clone()).prop_map(|(a, s)| Edit::Insert(a, s)),
        any::<usize>().prop_map(Edit::DuplicateLine),
        (any::<usize>(), snippet).prop_map(|(a, s)| Edit::ReplaceValue(a, s)),
    ]
}

fn floor_boundary(s: &str, mut i: usize) -> usize {
    i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn apply(text: &str, edit: &Edit) -> String {
    let mut s = text.to_string();
    match edit {
        Edit::Delete(at, n) => {
            let a = floor_boundary(&s, at % (s.len() + 1));
            let b = floor_boundary(&s, a + n);
            s.replace_range(a..b, "");
        }
        Edit::Insert(at, snippet) => {
            let a = floor_boundary(&s, at % (s.len() + 1));
            s.insert_str(a, snippet);
        }
        Edit::DuplicateLine(at) => {
            let lines: Vec<&str> = s.lines().collect();
            if !lines.is_empty() {
                let i = at % lines.len();
                let mut out: Vec<&str> = lines.clone();
                out.insert(i, lines[i]);
                s = out.join("\n");
            }
        }
        Edit::ReplaceValue(at, snippet) => {
            let lines: Vec<String> = s.lines().map(String::from).collect();
            let with_eq: Vec<usize> = (0..lines.len())
                .filter(|&i| lines[i].contains('='))
                .collect();
            if !with_eq.is_empty() {
                let i = with_eq[at % with_eq.len()];
                let mut out = lines.clone();
                let key = lines[i].split('=').next().unwrap_or("").to_string();
                out[i] = format!("{key}= {snippet}");
                s = out.join("\n");
            }
        }
    }
    s
}

fn value_strategy() -> impl Strategy<Value = String> {
    prop_oneof![
        (-5i64..50).prop_map(|i| i.to_string()),
        prop_oneof![Just(4096i64), Just(2_097_152), Just(128), Just(8192)]
            .prop_map(|i| i.to_string()),
        (0.0f64..1.0).prop_map(|f| format!("{f:?}")),
        Just("1e11".to_string()),
        Just("true".to_string()),
        Just("\"mup++\"".to_string()),
        Just("\"sp\"".to_string()),
        Just("\"cosine\"".to_string()),
        Just("\"chinchilla\"".to_string()),
        Just("\"muon\"".to_string()),
        Just("\"scaling_mup{base.lr}\"".to_string()),
        Just("[8, 16]".to_string()),
        Just("[]".to_string()),
    ]
}

fn random_experiment() -> impl Strategy<Value = String> {
    let paths: Vec<String> = experiment::known_paths();
    let arch = prop::sample::select(vec![
        "transformer",
        "sambay",
        "sambayda",
        "phi4miniflash",
        "tiny-transformer",
        "nope",
        "samba",
    ]);
    let depth = prop_oneof![
        (0i64..40).prop_map(|d| d.to_string()),
        Just("[8, 12, 16]".to_string())
    ];
    let extra = prop::collection::vec((prop::sample::select(paths), value_strategy()), 0..6);
    (arch, depth, extra).prop_map(|(arch, depth, extra)| {
        let mut s = format!("arch = \"{arch}\"\ndepth = {depth}\nparametrization = \"mup++\"\n");
        for (path, value) in extra {
            if path == "arch" || path == "depth" || path == "parametrization" {
                continue;
            }
            // Dotted keys at the top level are valid TOML for nested tables.
            s.push_str(&format!("{path} = {value}\n"));
        }
        s
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 192, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn mutated_experiments_never_panic(seed in 0usize..SEEDS.len(), edits in prop::collection::vec(edit_strategy(), 1..4)) {
        let mut text = SEEDS[seed].to_string();
        for e in &edits {
            text = apply(&text, e);
        }
        prop_assert!(check_experiment(&text, &[]).is_ok(), "{:?}\n---\n{}", check_experiment(&text, &[]), text);
    }

    #[test]
    fn random_experiments_never_panic(text in random_experiment()) {
        let r = check_experiment(&text, &[]);
        prop_assert!(r.is_ok(), "{:?}\n---\n{}", r, text);
    }

    #[test]
    fn random_overrides_never_panic(key in "[a-z_.]{0,16}", value in "[a-z0-9_.\\[\\], \"=-]{0,12}") {
        let overrides = vec![format!("{key}={value}"), key.clone()];
        let r = check_experiment(SEEDS[0], &overrides);
        prop_assert!(r.is_ok(), "{:?}", r);
    }

    #[test]
    fn mutated_archs_never_panic(which in 0usize..arch::BUILTIN_ARCHS.len(), edits in prop::collection::vec(edit_strategy(), 1..4), depth in 0i64..40, swa in prop::option::of(0usize..300)) {
        let mut text = arch::BUILTIN_ARCHS[which].1.to_string();
        for e in &edits {
            text = apply(&text, e);
        }
        let src = SourceFile::new("fuzz-arch.toml", text.clone());
        match arch::parse_arch(&src) {
            Ok(spec) => {
                if let Err(issues) = arch::resolve(&spec, depth, swa) {
                    let errors: Vec<SpecError> = issues.into_iter().map(|i| i.error).collect();
                    prop_assert!(spans_ok(&errors).is_ok(), "{:?}\n{}", spans_ok(&errors), text);
                }
            }
            Err(errors) => prop_assert!(spans_ok(&errors).is_ok(), "{:?}\n{}", spans_ok(&errors), text),
        }
    }
}
