//! `import-archscale`: ArchScale `pretrain.py` arguments -> an experiment TOML that plans to
//! the same numbers. Flags are decoded from `train_name` exactly as ArchScale tests them
//! (hp-spec §3), and the name is kept verbatim so the run is named the same.

use crate::arch;
use crate::names::{self, NameFlags};
use std::fmt::Write as _;

#[derive(Debug, thiserror::Error, miette::Diagnostic)]
#[error("{message}")]
pub struct ImportError {
    pub message: String,
    #[help]
    pub help: Option<String>,
}

impl ImportError {
    fn new(message: impl Into<String>, help: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            help: Some(help.into()),
        }
    }
}

/// `BaseHyperparameters` fields: ArchScale name, our `[base]` key, and whether it is an int.
const BASE_FIELDS: [(&str, &str, bool); 15] = [
    ("d0", "depth", true),
    ("eta0", "lr", false),
    ("b0", "batch_tokens", true),
    ("t0", "tokens", true),
    ("hd0", "head_dim", true),
    ("w_init0", "w_init", false),
    ("n0_mult", "n0_mult", false),
    ("weight_decay0", "weight_decay", false),
    ("eps0", "eps", false),
    ("min_lr0", "min_lr", false),
    ("warmup_tokens0", "warmup_tokens", true),
    ("beta1_0", "beta1", false),
    ("beta2_0", "beta2", false),
    ("muon_beta_0", "muon_beta", false),
    ("weight_lr_scale_0", "weight_lr_scale", false),
];

/// `setup()` arguments at ArchScale 1a2e505 that import understands.
const SETUP_ARGS: [&str; 12] = [
    "train_model",
    "train_name",
    "depth",
    "max_tokens",
    "ctx_len",
    "swa_len",
    "train_data_dir",
    "val_data_dir",
    "data_mixture",
    "resume",
    "fsdp_save_mem",
    "load_dir",
];

/// ArchScale's default `train_name` (pretrain.py:131).
pub const DEFAULT_TRAIN_NAME: &str = "scaling_mup_tie_rbase_prolong_varlen";

/// Python `int()` on a CLI string: digits with single underscores between them.
fn py_int(s: &str) -> Option<i64> {
    let t = s.trim();
    let digits = t.strip_prefix(['+', '-']).unwrap_or(t);
    if digits.is_empty()
        || digits.starts_with('_')
        || digits.ends_with('_')
        || digits.contains("__")
    {
        return None;
    }
    if !digits.chars().all(|c| c.is_ascii_digit() || c == '_') {
        return None;
    }
    t.replace('_', "").parse().ok()
}

/// Python `float()` on a CLI string.
fn py_float(s: &str) -> Option<f64> {
    let t = s.trim();
    if t.contains("__") || t.starts_with('_') || t.ends_with('_') {
        return None;
    }
    let lower = t.to_ascii_lowercase();
    match lower.trim_start_matches(['+', '-']) {
        "inf" | "infinity" | "nan" => return None,
        _ => {}
    }
    t.replace('_', "").parse().ok()
}

fn toml_float(x: f64) -> String {
    if x.is_finite() && x.abs() >= 1e6 {
        return format!("{x:e}"); // 5e12, 2.5e10: TOML floats, shortest round trip
    }
    let s = format!("{x:?}");
    if s.contains(['.', 'e', 'E']) || !x.is_finite() {
        s
    } else {
        format!("{s}.0")
    }
}

fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// Translate `pretrain.py` arguments (with the cluster shape, which ArchScale takes from the
/// environment) into experiment TOML.
pub fn archscale_argv_to_toml(
    argv: &[String],
    nodes: usize,
    gpus_per_node: usize,
) -> Result<String, ImportError> {
    let mut args: Vec<(String, String)> = Vec::new();
    let mut unknown: Vec<String> = Vec::new();
    let mut i = 0;
    let argv: Vec<&String> = argv
        .iter()
        .skip_while(|a| a.ends_with(".py") || a.as_str() == "python")
        .collect();
    while i < argv.len() {
        let a = argv[i].as_str();
        let Some(flag) = a.strip_prefix("--") else {
            return Err(ImportError::new(
                format!("unexpected argument `{a}`"),
                "ArchScale arguments are --name value or --name=value",
            ));
        };
        let (key, value) = match flag.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => {
                let Some(v) = argv.get(i + 1) else {
                    return Err(ImportError::new(
                        format!("`--{flag}` has no value"),
                        format!("write --{flag} VALUE or --{flag}=VALUE"),
                    ));
                };
                i += 1;
                (flag.to_string(), v.to_string())
            }
        };
        i += 1;
        let known = SETUP_ARGS.contains(&key.as_str())
            || key
                .strip_prefix("base_hps.")
                .is_some_and(|f| BASE_FIELDS.iter().any(|(n, _, _)| *n == f));
        if !known {
            unknown.push(format!("--{key}"));
            continue;
        }
        if let Some(prev) = args.iter_mut().find(|(k, _)| *k == key) {
            prev.1 = value; // jsonargparse: the last occurrence wins
        } else {
            args.push((key, value));
        }
    }
    if !unknown.is_empty() {
        let base: Vec<&str> = BASE_FIELDS.iter().map(|(n, _, _)| *n).collect();
        return Err(ImportError::new(
            format!(
                "unknown ArchScale argument{}: {}",
                if unknown.len() == 1 { "" } else { "s" },
                unknown.join(", ")
            ),
            format!(
                "pretrain.py at 1a2e505 takes --{} and --base_hps.<{}>",
                SETUP_ARGS.join(", --"),
                base.join("|")
            ),
        ));
    }
    let get = |k: &str| {
        args.iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    };
    if get("load_dir").is_some() {
        return Err(ImportError::new(
            "--load_dir (start from another run's checkpoint) has no experiment-spec equivalent yet",
            "drop --load_dir; `archscale run --resume` continues a run from its own checkpoints",
        ));
    }
    let model = get("train_model").ok_or_else(|| {
        ImportError::new(
            "--train_model is required",
            "e.g. --train_model sambay (ArchScale fails without it)",
        )
    })?;
    let builtin: Vec<&str> = arch::builtin_names()
        .filter(|n| *n != "tiny-transformer")
        .collect();
    if !builtin.contains(&model) {
        return Err(ImportError::new(
            format!("unknown --train_model `{model}`"),
            format!("ArchScale families at 1a2e505: {}", builtin.join(", ")),
        ));
    }
    let depth = match get("depth") {
        Some(d) => py_int(d).filter(|d| *d > 0).ok_or_else(|| {
            ImportError::new(
                format!("--depth `{d}` is not a positive integer"),
                "e.g. --depth 16",
            )
        })?,
        None => 16,
    };
    // ArchScale's config table defines the scaling families only at these depths
    // (`<model>_d<depth>` is a KeyError otherwise); single-depth families are checked by
    // their arch file's `depths`.
    const SCALING_DEPTHS: [u64; 5] = [8, 12, 16, 20, 24];
    let scaling_family = matches!(
        model,
        "transformer" | "transformerls" | "samba" | "sambay" | "sambayda" | "sambayoco"
    );
    if scaling_family && !SCALING_DEPTHS.contains(&(depth as u64)) {
        return Err(ImportError::new(
            format!("ArchScale has no config `{model}_d{depth}` (its pretrain.py raises KeyError)"),
            format!("ArchScale defines {model} at depths 8, 12, 16, 20, 24; for other depths write an experiment TOML directly"),
        ));
    }
    let name = get("train_name").unwrap_or(DEFAULT_TRAIN_NAME);
    let flags: NameFlags = names::decode(name);
    if flags.validation {
        return Err(ImportError::new(
            format!("train_name `{name}` contains `validation` (validate a checkpoint and stop)"),
            "archscale does not import validate-only runs; import the training run instead",
        ));
    }

    let mut out = String::new();
    let shown: Vec<String> = argv.iter().map(|a| a.to_string()).collect();
    let _ = writeln!(out, "#:schema ../schema/experiment.json");
    let _ = writeln!(
        out,
        "# Imported from ArchScale (1a2e505): pretrain.py {}",
        shown.join(" ")
    );
    let _ = writeln!(out, "# on {nodes} node(s) x {gpus_per_node} GPU(s). Settings decoded from train_name; the name is kept.");
    let _ = writeln!(out, "arch = {}", toml_str(model));
    let _ = writeln!(out, "depth = {depth}");
    let _ = writeln!(
        out,
        "parametrization = {}",
        toml_str(names::parametrization_of(&flags))
    );
    if flags.tie {
        let _ = writeln!(out, "tied_embeddings = true");
    }

    let mut base = String::new();
    for (field, key, is_int) in BASE_FIELDS {
        let Some(v) = get(&format!("base_hps.{field}")) else {
            continue;
        };
        let text = if is_int {
            let n = py_int(v).ok_or_else(|| {
                ImportError::new(
                    format!("--base_hps.{field} `{v}` is not an integer"),
                    format!("ArchScale types {field} as int, so jsonargparse rejects it; write e.g. 25_165_824_000, not 2.5e10"),
                )
            })?;
            n.to_string()
        } else {
            toml_float(py_float(v).ok_or_else(|| {
                ImportError::new(
                    format!("--base_hps.{field} `{v}` is not a number"),
                    "e.g. --base_hps.eta0=5e-4",
                )
            })?)
        };
        let _ = writeln!(base, "{key} = {text}");
    }
    if !base.is_empty() {
        let _ = writeln!(out, "\n[base]\n{base}");
    } else {
        out.push('\n');
    }

    let _ = writeln!(out, "[train]");
    let _ = writeln!(out, "name = {}", toml_str(name));
    if let Some(t) = get("max_tokens") {
        let v = py_float(t).ok_or_else(|| {
            ImportError::new(
                format!("--max_tokens `{t}` is not a number"),
                "e.g. --max_tokens 4e10",
            )
        })?;
        let _ = writeln!(out, "tokens = {}", toml_float(v));
    }
    for (arg, key) in [("ctx_len", "seq_len"), ("swa_len", "swa_len")] {
        if let Some(v) = get(arg) {
            let n = py_int(v).filter(|n| *n > 0).ok_or_else(|| {
                ImportError::new(
                    format!("--{arg} `{v}` is not a positive integer"),
                    format!("e.g. --{arg} 8192"),
                )
            })?;
            let _ = writeln!(out, "{key} = {n}");
        }
    }
    let optimizer = names::optimizer_of(&flags);
    if optimizer != "adamw" {
        let _ = writeln!(out, "optimizer = \"{optimizer}\"");
    }
    match (flags.wsd, flags.cosine) {
        (true, true) => out.push_str("schedule = { kind = \"wsd\", decay = \"cosine\" }\n"),
        (true, false) => out.push_str("schedule = { kind = \"wsd\", decay = \"linear\" }\n"),
        (false, true) => out.push_str("schedule = \"cosine\"\n"),
        (false, false) => {}
    }
    if flags.ls {
        let _ = writeln!(
            out,
            "label_smoothing = {}",
            toml_float(names::LABEL_SMOOTHING)
        );
    }
    if flags.varlen {
        let _ = writeln!(out, "varlen = true");
    }
    if flags.rbase {
        let _ = writeln!(out, "rope_base = {}", toml_float(names::RBASE_ROPE_BASE));
    }
    if let Some(r) = get("resume") {
        let _ = writeln!(out, "# --resume {r}: use `archscale run --resume` instead");
    }
    if let Some(f) = get("fsdp_save_mem") {
        let _ = writeln!(
            out,
            "# --fsdp_save_mem {f}: ArchScale's CPU-offload strategy; see cluster.sharding"
        );
    }

    let train_dir = get("train_data_dir");
    let val_dir = get("val_data_dir");
    let mixture = get("data_mixture");
    if train_dir.is_some() || val_dir.is_some() || mixture.is_some() {
        let _ = writeln!(out, "\n[data]");
        let dir = train_dir.unwrap_or(crate::experiment::DEFAULT_TRAIN_DIR);
        let sources: Vec<(String, f64)> = match mixture {
            Some(path) => read_mixture(path)?,
            None => vec![("train".to_string(), 1.0)],
        };
        let items: Vec<String> = sources
            .iter()
            .map(|(prefix, w)| {
                format!(
                    "{{ dir = {}, prefix = {}, weight = {} }}",
                    toml_str(dir),
                    toml_str(prefix),
                    toml_float(*w)
                )
            })
            .collect();
        let _ = writeln!(out, "train = [{}]", items.join(", "));
        if let Some(v) = val_dir {
            let _ = writeln!(
                out,
                "val = [{{ dir = {}, prefix = \"validation\", weight = 1.0 }}]",
                toml_str(v)
            );
        }
    }
    let _ = writeln!(
        out,
        "\n[cluster]\nnodes = {nodes}\ngpus_per_node = {gpus_per_node}"
    );
    Ok(out)
}

/// `--data_mixture FILE`: a JSON object `{prefix: weight}` (pretrain.py:162-168).
fn read_mixture(path: &str) -> Result<Vec<(String, f64)>, ImportError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ImportError::new(
            format!("cannot read --data_mixture {path}: {e}"),
            "give the JSON file of {prefix: weight}",
        )
    })?;
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
        ImportError::new(
            format!("--data_mixture {path} is not JSON: {e}"),
            "expected {\"prefix\": weight, ...}",
        )
    })?;
    let obj = value.as_object().ok_or_else(|| {
        ImportError::new(
            format!("--data_mixture {path} is not a JSON object"),
            "expected {\"prefix\": weight, ...}",
        )
    })?;
    let mut out = Vec::new();
    for (k, v) in obj {
        let w = v
            .as_f64()
            .filter(|w| *w > 0.0 && w.is_finite())
            .ok_or_else(|| {
                ImportError::new(
                    format!("--data_mixture {path}: weight of `{k}` is not a positive number"),
                    "weights are numbers > 0",
                )
            })?;
        out.push((k.clone(), w));
    }
    if out.is_empty() {
        return Err(ImportError::new(
            format!("--data_mixture {path} lists no source"),
            "expected {\"prefix\": weight, ...}",
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::experiment::{parse_experiment, Decay, Optimizer, Parametrization};
    use std::path::Path;

    fn import(args: &[&str], nodes: usize, gpus: usize) -> crate::Experiment {
        let argv: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let text = archscale_argv_to_toml(&argv, nodes, gpus).unwrap();
        match parse_experiment("imported.toml", &text, Path::new("."), &[]) {
            Ok(e) => e,
            Err(e) => panic!("{text}\n{}", e.render()),
        }
    }

    #[test]
    fn phi4_readme_run() {
        let e = import(
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
                "--resume=auto",
            ],
            128,
            8,
        );
        let r = &e.runs[0];
        assert_eq!(r.parametrization, Parametrization::Sp);
        assert_eq!(r.base.eta0, 5e-4);
        assert_eq!(r.base.b0, 8_388_608);
        assert_eq!(r.base.warmup_tokens0, 25_165_824_000);
        assert_eq!(r.tokens, Some(5e12));
        assert_eq!(r.seq_len, Some(8192));
        assert_eq!((r.nodes, r.gpus_per_node), (128, 8));
        assert_eq!(r.name.as_deref(), Some("scaling"));
    }

    #[test]
    fn flags_decode_exactly() {
        let e = import(
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
            1,
            8,
        );
        let r = &e.runs[0];
        assert_eq!(
            (r.varlen, r.rope_base, r.parametrization),
            (true, Some(640000.0), Parametrization::MupPlusPlus)
        );
        let e = import(
            &[
                "--train_model",
                "transformer",
                "--depth",
                "12",
                "--train_name",
                "scaling_mup_rbase",
            ],
            1,
            8,
        );
        assert_eq!(e.runs[0].rope_base, None);
        let e = import(
            &[
                "--train_model",
                "transformer",
                "--depth",
                "12",
                "--train_name",
                "scaling_ori_mup_ls_tie_cosine",
            ],
            1,
            8,
        );
        let r = &e.runs[0];
        assert_eq!(
            (
                r.parametrization,
                r.label_smoothing,
                r.tied_embeddings,
                r.decay
            ),
            (Parametrization::Mup, 0.1, true, Decay::Cosine)
        );
        let e = import(
            &[
                "--train_model",
                "transformer",
                "--depth",
                "12",
                "--train_name",
                "scaling_muon",
            ],
            1,
            8,
        );
        assert_eq!(
            (e.runs[0].optimizer, e.runs[0].parametrization),
            (Optimizer::AdamW, Parametrization::Sp)
        );
        let e = import(
            &[
                "--train_model",
                "transformer",
                "--depth",
                "12",
                "--train_name=scaling_mup_hadam_wsd",
            ],
            1,
            8,
        );
        assert_eq!(
            (e.runs[0].optimizer, e.runs[0].wsd),
            (Optimizer::NAdam, true)
        );
        let e = import(&["pretrain.py", "--train_model", "transformer"], 1, 8);
        assert_eq!(e.runs[0].name.as_deref(), Some(DEFAULT_TRAIN_NAME));
        assert_eq!(e.runs[0].depth, 16);
    }

    #[test]
    fn errors_name_the_problem() {
        let err = |args: &[&str]| {
            let argv: Vec<String> = args.iter().map(|s| s.to_string()).collect();
            archscale_argv_to_toml(&argv, 1, 8).unwrap_err().message
        };
        let m = err(&[
            "--train_model",
            "sambay",
            "--micro_bsz",
            "4",
            "--wandb_project=x",
        ]);
        assert!(
            m.contains("--micro_bsz") && m.contains("--wandb_project"),
            "{m}"
        );
        assert!(err(&["--train_model", "sambay", "--base_hps.t0=2e11"]).contains("not an integer"));
        assert!(err(&["--train_model", "gpt5"]).contains("unknown --train_model"));
        assert!(err(&["--depth", "8"]).contains("required"));
        assert!(err(&["--train_model"]).contains("no value"));
    }

    #[test]
    fn data_dirs() {
        let e = import(
            &[
                "--train_model",
                "samba",
                "--depth",
                "8",
                "--train_name",
                "scaling_mup",
                "--train_data_dir",
                "/d/sp",
                "--val_data_dir",
                "/d/sp",
            ],
            1,
            8,
        );
        let r = &e.runs[0];
        assert_eq!(
            r.train_data,
            vec![crate::DataSourceSpec::Packed {
                dir: "/d/sp".into(),
                prefix: "train".into(),
                weight: 1.0
            }]
        );
        assert_eq!(
            r.val_data,
            vec![crate::DataSourceSpec::Packed {
                dir: "/d/sp".into(),
                prefix: "validation".into(),
                weight: 1.0
            }]
        );
    }

    #[test]
    fn python_number_parsing() {
        assert_eq!(py_int("25_165_824_000"), Some(25_165_824_000));
        assert_eq!(py_int("2e11"), None);
        assert_eq!(py_int("1__0"), None);
        assert_eq!(py_float("5e-4"), Some(5e-4));
        assert_eq!(toml_float(1e11), "1e11");
        assert_eq!(toml_float(0.1), "0.1");
        assert_eq!(toml_float(640000.0), "640000.0");
        assert_eq!(toml_float(1.2288e6), "1.2288e6");
    }

    #[test]
    fn depths_archscale_lacks_are_rejected() {
        let argv: Vec<String> = [
            "--train_model",
            "transformer",
            "--depth",
            "10",
            "--train_name",
            "scaling_mup",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let e = archscale_argv_to_toml(&argv, 1, 8).unwrap_err();
        assert!(e.to_string().contains("transformer_d10"), "{e}");
    }
}
