//! The JSON Schemas: committed files are current, every file in experiments/ validates
//! against its schema, and the schema's keys are exactly the keys the parser reads.
//!
//! Regenerate the committed schemas with `ARCHSCALE_BLESS=1 cargo test -p archscale-spec --test schema`.

use archscale_spec::schema::{schema_json, Kind};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn schema(kind: Kind) -> Value {
    serde_json::from_str(&schema_json(kind)).expect("schema is JSON")
}

fn toml_files(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("experiments dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    out.sort();
    out
}

fn as_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).expect("readable");
    let value: toml::Value =
        toml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::to_value(value).expect("toml converts to json")
}

/// A small JSON Schema (draft-07 subset that schemars emits) validator.
fn validate(root: &Value, schema: &Value, value: &Value, path: &str, errors: &mut Vec<String>) {
    let obj = match schema {
        Value::Bool(true) => return,
        Value::Bool(false) => {
            errors.push(format!("{path}: not allowed"));
            return;
        }
        Value::Object(o) => o,
        _ => panic!("bad schema at {path}"),
    };
    if let Some(Value::String(r)) = obj.get("$ref") {
        let name = r.trim_start_matches("#/definitions/");
        let target = &root["definitions"][name];
        assert!(!target.is_null(), "unresolved $ref {r}");
        validate(root, target, value, path, errors);
    }
    for key in ["anyOf", "oneOf"] {
        if let Some(Value::Array(branches)) = obj.get(key) {
            let ok = branches.iter().any(|b| {
                let mut e = Vec::new();
                validate(root, b, value, path, &mut e);
                e.is_empty()
            });
            if !ok {
                errors.push(format!(
                    "{path}: matches none of the {key} branches: {value}"
                ));
            }
        }
    }
    if let Some(Value::Array(all)) = obj.get("allOf") {
        for b in all {
            validate(root, b, value, path, errors);
        }
    }
    if let Some(t) = obj.get("type") {
        let types: Vec<&str> = match t {
            Value::String(s) => vec![s.as_str()],
            Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
            _ => vec![],
        };
        let fits = types.iter().any(|t| match *t {
            "null" => value.is_null(),
            "boolean" => value.is_boolean(),
            "string" => value.is_string(),
            "array" => value.is_array(),
            "object" => value.is_object(),
            "number" => value.is_number(),
            "integer" => value.is_i64() || value.is_u64(),
            _ => false,
        });
        if !fits {
            errors.push(format!("{path}: expected {types:?}, found {value}"));
            return;
        }
    }
    if let Some(Value::Array(options)) = obj.get("enum") {
        if !options.contains(value) {
            errors.push(format!("{path}: {value} is not one of {options:?}"));
        }
    }
    if let (Some(min), Some(x)) = (obj.get("minimum").and_then(Value::as_f64), value.as_f64()) {
        if x < min {
            errors.push(format!("{path}: {x} < minimum {min}"));
        }
    }
    if let Value::Object(map) = value {
        let props = obj.get("properties").and_then(Value::as_object);
        if let Some(Value::Array(required)) = obj.get("required") {
            for r in required.iter().filter_map(Value::as_str) {
                if !map.contains_key(r) {
                    errors.push(format!("{path}: missing required `{r}`"));
                }
            }
        }
        for (k, v) in map {
            let sub = format!("{path}.{k}");
            match props.and_then(|p| p.get(k)) {
                Some(s) => validate(root, s, v, &sub, errors),
                None => match obj.get("additionalProperties") {
                    Some(Value::Bool(false)) => errors.push(format!("{sub}: unknown key")),
                    Some(s @ Value::Object(_)) => validate(root, s, v, &sub, errors),
                    _ => {}
                },
            }
        }
    }
    if let (Value::Array(items), Some(item_schema)) = (value, obj.get("items")) {
        for (i, v) in items.iter().enumerate() {
            validate(root, item_schema, v, &format!("{path}[{i}]"), errors);
        }
    }
}

fn check(kind: Kind, file: &Path) -> Vec<String> {
    let s = schema(kind);
    let mut errors = Vec::new();
    validate(&s, &s, &as_json(file), "", &mut errors);
    errors
}

#[test]
fn committed_schemas_are_current() {
    for (kind, name) in [
        (Kind::Experiment, "experiment.json"),
        (Kind::Arch, "arch.json"),
    ] {
        let path = repo().join("schema").join(name);
        let fresh = schema_json(kind);
        if std::env::var_os("ARCHSCALE_BLESS").is_some() {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &fresh).unwrap();
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == fresh,
            "{} is stale; regenerate with ARCHSCALE_BLESS=1 cargo test -p archscale-spec --test schema",
            path.display()
        );
    }
}

#[test]
fn every_experiment_file_validates_against_the_schema() {
    let files = toml_files(&repo().join("experiments"));
    assert!(files.len() >= 6, "{files:?}");
    for f in files {
        let errors = check(Kind::Experiment, &f);
        assert!(errors.is_empty(), "{}: {errors:#?}", f.display());
    }
}

#[test]
fn every_arch_file_validates_against_the_schema() {
    let files = toml_files(&repo().join("experiments/archs"));
    assert!(files.len() >= 16, "{files:?}");
    for f in files {
        let errors = check(Kind::Arch, &f);
        assert!(errors.is_empty(), "{}: {errors:#?}", f.display());
    }
}

#[test]
fn the_validator_rejects_what_it_should() {
    let s = schema(Kind::Experiment);
    let bad = serde_json::json!({
        "arch": "sambay", "depth": 8, "parametrization": "mup+",
        "train": { "seq_lem": 4096, "optimizer": "sgd" },
        "cluster": { "nodes": "one" }
    });
    let mut errors = Vec::new();
    validate(&s, &s, &bad, "", &mut errors);
    assert!(errors.iter().any(|e| e.contains("seq_lem")), "{errors:#?}");
    assert!(
        errors.iter().any(|e| e.contains("parametrization")),
        "{errors:#?}"
    );
    assert!(
        errors.iter().any(|e| e.contains("optimizer")),
        "{errors:#?}"
    );
    assert!(errors.iter().any(|e| e.contains("nodes")), "{errors:#?}");
}

fn props(root: &Value, def: Option<&str>) -> Vec<String> {
    let node = match def {
        Some(d) => &root["definitions"][d],
        None => root,
    };
    let mut keys: Vec<String> = node["properties"]
        .as_object()
        .unwrap_or_else(|| panic!("no properties for {def:?}"))
        .keys()
        .cloned()
        .collect();
    keys.sort();
    keys
}

fn sorted(keys: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = keys.iter().map(|s| s.to_string()).collect();
    v.sort();
    v
}

#[test]
fn schema_keys_are_the_parser_keys() {
    use archscale_spec::{arch, experiment as e};
    let s = schema(Kind::Experiment);
    assert_eq!(props(&s, None), sorted(e::TOP_KEYS));
    assert_eq!(props(&s, Some("BaseFile")), sorted(e::BASE_KEYS));
    assert_eq!(props(&s, Some("TrainFile")), sorted(e::TRAIN_KEYS));
    assert_eq!(props(&s, Some("ScheduleTable")), sorted(e::SCHEDULE_KEYS));
    assert_eq!(props(&s, Some("DataFile")), sorted(e::DATA_KEYS));
    assert_eq!(props(&s, Some("SourceFile")), sorted(e::SOURCE_KEYS));
    assert_eq!(props(&s, Some("SyntheticFile")), sorted(e::SYNTHETIC_KEYS));
    assert_eq!(props(&s, Some("ClusterFile")), sorted(e::CLUSTER_KEYS));
    let a = schema(Kind::Arch);
    assert_eq!(props(&a, None), sorted(arch::TOP_KEYS));
    assert_eq!(props(&a, Some("Width")), sorted(arch::WIDTH_KEYS));
    assert_eq!(props(&a, Some("Mlp")), sorted(arch::MLP_KEYS));
    assert_eq!(props(&a, Some("Norm")), sorted(arch::NORM_KEYS));
    assert_eq!(props(&a, Some("Position")), sorted(arch::POSITION_KEYS));
    assert_eq!(props(&a, Some("Bias")), sorted(arch::BIAS_KEYS));
    assert_eq!(props(&a, Some("Mamba")), sorted(arch::MAMBA_KEYS));
    assert_eq!(props(&a, Some("TokenRule")), sorted(arch::TOKEN_RULE_KEYS));
    assert_eq!(props(&a, Some("Require")), sorted(arch::REQUIRE_KEYS));
    assert_eq!(props(&a, Some("Section")), sorted(arch::SECTION_KEYS));
    assert_eq!(props(&a, Some("LayerTable")), sorted(arch::LAYER_KEYS));
}

#[test]
fn every_experiment_file_parses_and_validates() {
    let dir = repo().join("experiments");
    for f in toml_files(&dir) {
        match archscale_spec::load_experiment(&f, &[]) {
            Ok(e) => assert!(!e.runs.is_empty()),
            Err(e) => panic!("{}", e.render()),
        }
    }
}
