//! Experiment specs: which family, which depths, base hyperparameters, training settings,
//! data, cluster, and sweeps. Parsing reports every error of the file at once, each with a
//! span; a sweep is expanded into one validated `RunSpec` per member.

use crate::arch::{self, ArchSpec, Blame, ResolvedArch};
use crate::diag::{did_you_mean, SourceFile, SpecError, SpecErrors};
use crate::names::{self, NameFlags};
use crate::tree::{self, IntRange, Kind, Node, Reader, NON_NEGATIVE, POSITIVE};
use miette::{NamedSource, SourceSpan};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub const TOP_KEYS: &[&str] = &[
    "arch",
    "depth",
    "parametrization",
    "tied_embeddings",
    "base",
    "train",
    "data",
    "cluster",
    "sweep",
];
pub const BASE_KEYS: &[&str] = &[
    "depth",
    "lr",
    "batch_tokens",
    "tokens",
    "head_dim",
    "w_init",
    "n0_mult",
    "weight_decay",
    "eps",
    "min_lr",
    "warmup_tokens",
    "beta1",
    "beta2",
    "muon_beta",
    "weight_lr_scale",
];
pub const TRAIN_KEYS: &[&str] = &[
    "name",
    "tokens",
    "seq_len",
    "micro_batch",
    "optimizer",
    "schedule",
    "label_smoothing",
    "varlen",
    "rope_base",
    "swa_len",
    "seed",
    "eval_interval",
    "save_interval",
    "log_interval",
    "out_dir",
];
pub const SCHEDULE_KEYS: &[&str] = &["kind", "decay"];
pub const DATA_KEYS: &[&str] = &["train", "val"];
pub const SOURCE_KEYS: &[&str] = &["dir", "prefix", "weight", "synthetic"];
pub const SYNTHETIC_KEYS: &[&str] = &["seed", "tokens", "corpus"];
pub const CLUSTER_KEYS: &[&str] = &["nodes", "gpus_per_node", "gpu_memory_gib", "sharding"];

pub const PARAMETRIZATIONS: &[&str] = &["mup++", "mup", "sp"];
pub const OPTIMIZERS: &[&str] = &["adamw", "muon", "nadam"];
pub const SCHEDULES: &[&str] = &["linear", "cosine", "wsd"];
pub const DECAYS: &[&str] = &["linear", "cosine"];
pub const SHARDINGS: &[&str] = &["data_parallel", "zero1", "zero3", "hybrid_shard"];

/// ArchScale's defaults for data directories (pretrain.py `setup`).
pub const DEFAULT_TRAIN_DIR: &str = "data/redpajama_sample";
/// Most sweep members one experiment may expand to.
pub const MAX_RUNS: usize = 4096;

/// Every key path a `[sweep]` or `--set` may name.
pub fn known_paths() -> Vec<String> {
    let mut out: Vec<String> = TOP_KEYS
        .iter()
        .filter(|k| **k != "sweep")
        .map(|k| k.to_string())
        .collect();
    for (table, keys) in [
        ("base", BASE_KEYS),
        ("train", TRAIN_KEYS),
        ("data", DATA_KEYS),
        ("cluster", CLUSTER_KEYS),
    ] {
        out.extend(keys.iter().map(|k| format!("{table}.{k}")));
    }
    out.extend(SCHEDULE_KEYS.iter().map(|k| format!("train.schedule.{k}")));
    out
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parametrization {
    Sp,
    Mup,
    MupPlusPlus,
}

impl Parametrization {
    pub fn as_str(&self) -> &'static str {
        match self {
            Parametrization::Sp => "sp",
            Parametrization::Mup => "mup",
            Parametrization::MupPlusPlus => "mup++",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Optimizer {
    AdamW,
    Muon,
    NAdam,
}

impl Optimizer {
    pub fn as_str(&self) -> &'static str {
        match self {
            Optimizer::AdamW => "adamw",
            Optimizer::Muon => "muon",
            Optimizer::NAdam => "nadam",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decay {
    Linear,
    Cosine,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sharding {
    DataParallel,
    Zero1,
    Zero3,
    HybridShard,
}

#[derive(Clone, Debug, PartialEq)]
pub enum DataSourceSpec {
    /// `dir/{prefix}*.bin` packed shards.
    Packed {
        dir: String,
        prefix: String,
        weight: f64,
    },
    /// The built-in deterministic corpus of token ids (`corpus = "ids"`, the default).
    Synthetic { seed: u64, tokens: u64, weight: f64 },
    /// The built-in deterministic English-like text corpus, byte tokens (`corpus = "text"`).
    SyntheticText { seed: u64, tokens: u64, weight: f64 },
}

/// ArchScale `BaseHyperparameters` (hp-spec §2), under readable names in the file.
#[derive(Clone, Debug, PartialEq)]
pub struct BaseSpec {
    pub d0: u64,
    pub eta0: f64,
    pub b0: u64,
    pub t0: u64,
    pub hd0: u64,
    pub w_init0: f64,
    pub n0_mult: f64,
    pub weight_decay0: f64,
    pub eps0: f64,
    pub min_lr0: f64,
    pub warmup_tokens0: u64,
    pub beta1_0: f64,
    pub beta2_0: f64,
    pub muon_beta_0: f64,
    pub weight_lr_scale_0: f64,
    /// ArchScale computes `n0` as a float once any `--base_hps.*` flag is given (jsonargparse
    /// rebuilds the dataclass with float fields, hp-spec §1.1). Mirrored: true when `[base]`
    /// sets any key.
    pub n0_mult_is_float: bool,
}

impl Default for BaseSpec {
    fn default() -> Self {
        Self {
            d0: 16,
            eta0: 4e-4,
            b0: 1 << 21,
            t0: 100_000_000_000,
            hd0: 128,
            w_init0: 1.0,
            n0_mult: 237_568.0,
            weight_decay0: 0.1,
            eps0: 1e-8,
            min_lr0: 0.0,
            warmup_tokens0: 1_000_000_000,
            beta1_0: 0.9,
            beta2_0: 0.95,
            muon_beta_0: 0.95,
            weight_lr_scale_0: 1.0,
            n0_mult_is_float: false,
        }
    }
}

/// One run of an experiment: every setting resolved, defaults applied, validated.
#[derive(Clone, Debug)]
pub struct RunSpec {
    /// Position in sweep order (0-based).
    pub index: usize,
    /// `key=value` for each swept key, e.g. `depth=12, base.lr=1e-3`; empty without a sweep.
    pub label: String,
    pub arch: Arc<ArchSpec>,
    /// The family at this run's depth, with `swa_len` applied.
    pub resolved: ResolvedArch,
    pub depth: u64,
    pub parametrization: Parametrization,
    /// ArchScale `_tie` (a family tied in its arch spec stays tied regardless).
    pub tied_embeddings: bool,
    pub base: BaseSpec,
    /// ArchScale `train_name`, verbatim (after `{key}` interpolation).
    pub name: Option<String>,
    /// Explicit token budget; `None` is the Chinchilla rule.
    pub tokens: Option<f64>,
    /// ArchScale `ctx_len`; `None` is 4096.
    pub seq_len: Option<u64>,
    /// `None` applies ArchScale's rule (hp-spec §4.1).
    pub micro_batch: Option<u64>,
    pub optimizer: Optimizer,
    pub decay: Decay,
    pub wsd: bool,
    pub label_smoothing: f64,
    pub varlen: bool,
    pub rope_base: Option<f64>,
    pub swa_len: Option<u64>,
    pub seed: u64,
    pub eval_interval: u64,
    pub save_interval: u64,
    pub log_interval: u64,
    pub out_dir: String,
    pub train_data: Vec<DataSourceSpec>,
    pub val_data: Vec<DataSourceSpec>,
    pub nodes: u64,
    pub gpus_per_node: u64,
    pub gpu_memory_gib: f64,
    pub sharding: Option<Sharding>,
    /// This member's document (sweep values substituted), for spans.
    pub tree: Node,
}

impl RunSpec {
    /// Training sequence length as ArchScale picks it: `ctx_len` or 4096, and 8192 for
    /// `_varlen` at 4096 (hp-spec §4.1).
    pub fn effective_seq_len(&self) -> u64 {
        effective_seq_micro(self.seq_len, self.micro_batch, self.varlen).0
    }

    /// Micro-batch: the spec's, else ArchScale's rule (2 at 4096, 1 with varlen or other lengths).
    pub fn effective_micro_batch(&self) -> u64 {
        effective_seq_micro(self.seq_len, self.micro_batch, self.varlen).1
    }

    /// The node at a dotted key path in this member's document.
    pub fn node(&self, path: &str) -> Option<&Node> {
        self.tree.at_path(path)
    }

    /// Span (in its own source) of the value at `path`, if the file sets it.
    pub fn span_of(&self, path: &str) -> Option<SourceSpan> {
        self.node(path).map(|n| to_span(&n.label_span()))
    }

    /// An error about this run labelled at `path` (or the nearest enclosing key the file
    /// sets), prefixed with the sweep member when there is a sweep.
    pub fn error_at(&self, path: &str, message: impl Into<String>) -> SpecError {
        let node = self.tree.nearest(path);
        let message = message.into();
        let message = if self.label.is_empty() {
            message
        } else {
            format!("sweep member {}: {message}", self.label)
        };
        node.error(message)
    }
}

pub fn effective_seq_micro(seq_len: Option<u64>, micro: Option<u64>, varlen: bool) -> (u64, u64) {
    let seq = seq_len.unwrap_or(4096);
    let (seq, rule) = if seq == 4096 {
        if varlen {
            (8192, 1)
        } else {
            (4096, 2)
        }
    } else {
        (seq, 1)
    };
    (seq, micro.unwrap_or(rule))
}

/// A parsed, validated experiment: one `RunSpec` per sweep member, in sweep order.
#[derive(Clone, Debug)]
pub struct Experiment {
    pub src: Arc<SourceFile>,
    /// The document after `--set` overrides (sweep lists still in place).
    pub tree: Node,
    pub runs: Vec<RunSpec>,
    /// The swept key paths, in expansion order (outermost first).
    pub sweep_keys: Vec<String>,
}

impl Experiment {
    /// The experiment file as miette renders it.
    pub fn source(&self) -> &NamedSource<Arc<String>> {
        self.src.named_source()
    }

    pub fn name(&self) -> &str {
        &self.src.name
    }

    /// Span of the value at a dotted key path (`base.lr`), if the file sets it.
    pub fn span_of(&self, path: &str) -> Option<SourceSpan> {
        self.tree
            .at_path(path)
            .filter(|n| Arc::ptr_eq(&n.src, &self.src))
            .map(|n| to_span(&n.label_span()))
    }

    /// An error labelled at `path`, or at the nearest enclosing key the file sets.
    pub fn error_at(&self, path: &str, message: impl Into<String>) -> SpecError {
        self.tree.nearest(path).error(message)
    }
}

fn to_span(r: &std::ops::Range<usize>) -> SourceSpan {
    SourceSpan::new(r.start.into(), r.end - r.start)
}

/// Read, parse and validate an experiment file. `overrides` are `dotted.key=value`.
pub fn load_experiment(path: &Path, overrides: &[String]) -> Result<Experiment, SpecErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        let src = SourceFile::new(path.display().to_string(), "");
        SpecErrors::from(
            SpecError::new(&src, 0..0, format!("cannot read {}: {e}", path.display()))
                .label("file")
                .help(
                    "check the path; experiment files are TOML, e.g. experiments/quickstart.toml",
                ),
        )
    })?;
    let base_dir = path
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    parse_experiment(&path.display().to_string(), &text, &base_dir, overrides)
}

/// Parse and validate experiment text. `base_dir` resolves relative arch paths.
pub fn parse_experiment(
    name: &str,
    source: &str,
    base_dir: &Path,
    overrides: &[String],
) -> Result<Experiment, SpecErrors> {
    let src = SourceFile::new(name, source);
    let mut root = tree::parse(&src).map_err(SpecErrors::from)?;
    let mut errors = Vec::new();
    if root.entries().is_none() {
        return Err(SpecError::new(&src, 0..0, "an experiment must be a TOML table").into());
    }
    apply_overrides(&mut root, overrides, &mut errors);
    // Bad overrides and sweep keys are reported, and the rest of the file is still checked.
    let sweep = collect_sweep(&mut root, &mut errors);
    let n_runs = sweep
        .iter()
        .map(|a| a.values.len())
        .try_fold(1usize, |acc, n| acc.checked_mul(n));
    match n_runs {
        Some(n) if n <= MAX_RUNS => {}
        _ => {
            let span = sweep.first().map_or(0..0, |a| a.key_node_span.clone());
            let src0 = sweep.first().map_or(src.clone(), |a| a.src.clone());
            errors.push(
                SpecError::new(
                    &src0,
                    span,
                    format!("the sweep expands to more than {MAX_RUNS} runs"),
                )
                .label("sweep")
                .help("split the experiment, or sweep fewer values"),
            );
            return Err(SpecErrors::new(errors));
        }
    }
    let n_runs = n_runs.unwrap_or(1);
    let mut archs = ArchCache {
        base_dir: base_dir.to_path_buf(),
        loaded: HashMap::new(),
    };
    let mut runs = Vec::new();
    // (error, members that hit it)
    let mut run_errors: Vec<(SpecError, Vec<usize>)> = Vec::new();
    let mut labels = Vec::new();
    for index in 0..n_runs {
        let mut member = root.clone();
        let mut rem = index;
        let mut choice = vec![0; sweep.len()];
        for (ai, axis) in sweep.iter().enumerate().rev() {
            choice[ai] = rem % axis.values.len();
            rem /= axis.values.len();
        }
        let mut label_parts = Vec::new();
        for (ai, axis) in sweep.iter().enumerate() {
            let mut v = axis.values[choice[ai]].clone();
            v.key_span =
                Some(axis.key_node_span.clone()).filter(|_| Arc::ptr_eq(&axis.src, &v.src));
            label_parts.push(format!("{}={}", axis.path, display_value(&v)));
            let parts: Vec<&str> = axis.path.split('.').collect();
            if let Err(span) = member.set_path(&parts, v) {
                errors.push(
                    SpecError::new(
                        &axis.src,
                        axis.key_node_span.clone(),
                        format!("cannot sweep `{}`", axis.path),
                    )
                    .label("sweep key")
                    .also(span, "not a table")
                    .help("a swept key must sit inside tables"),
                );
            }
        }
        let label = label_parts.join(", ");
        labels.push(label.clone());
        let mut r = Reader::default();
        let run = read_run(&mut r, &member, index, label, &mut archs);
        for e in r.errors {
            match run_errors.iter_mut().find(|(x, _)| same_error(x, &e)) {
                Some((_, members)) => members.push(index),
                None => run_errors.push((e, vec![index])),
            }
        }
        if let Some(run) = run {
            runs.push(run);
        }
    }
    for (mut e, members) in run_errors {
        if members.len() < n_runs {
            let which: Vec<&str> = members.iter().map(|&m| labels[m].as_str()).collect();
            let s = if which.len() == 1 { "" } else { "s" };
            e.message = format!("sweep member{s} {}: {}", which.join("; "), e.message);
        }
        errors.push(e);
    }
    if errors.is_empty() {
        check_run_names(&runs, &sweep, &mut errors);
    }
    if !errors.is_empty() {
        let mut e = SpecErrors::new(errors);
        e.dedup();
        return Err(e);
    }
    Ok(Experiment {
        src,
        tree: root,
        runs,
        sweep_keys: sweep.iter().map(|a| a.path.clone()).collect(),
    })
}

fn same_error(a: &SpecError, b: &SpecError) -> bool {
    Arc::ptr_eq(&a.src, &b.src) && a.span == b.span && a.message == b.message
}

fn display_value(n: &Node) -> String {
    match &n.kind {
        Kind::Str(s) => s.clone(),
        _ => {
            let raw = n.raw().trim();
            if raw.is_empty() {
                format!("{:?}", n.kind)
            } else {
                raw.to_string()
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Overrides and sweeps

fn apply_overrides(root: &mut Node, overrides: &[String], errors: &mut Vec<SpecError>) {
    let known = known_paths();
    for arg in overrides {
        let src = SourceFile::new(format!("--set {arg}"), arg.as_str());
        let Some(eq) = arg.find('=') else {
            errors.push(
                SpecError::new(&src, 0..arg.len(), format!("`--set {arg}` has no `=`"))
                    .label("expected key=value")
                    .help("write --set dotted.key=value, e.g. --set base.lr=1e-3"),
            );
            continue;
        };
        let key = arg[..eq].trim();
        let parts: Vec<&str> = key.split('.').collect();
        if key.is_empty() || parts.iter().any(|p| p.is_empty()) {
            errors.push(
                SpecError::new(&src, 0..eq, format!("`{key}` is not a dotted key path"))
                    .label("bad key")
                    .help("write --set dotted.key=value, e.g. --set train.seq_len=8192"),
            );
            continue;
        }
        let is_sweep = parts[0] == "sweep" && parts.len() > 1;
        let target = if is_sweep {
            parts[1..].join(".")
        } else {
            key.to_string()
        };
        if !known.contains(&target) {
            let help = match did_you_mean(&target, known.iter().map(String::as_str)) {
                Some(s) => format!("did you mean `{s}`?"),
                None => "keys: arch, depth, parametrization, tied_embeddings, base.*, train.*, data.*, cluster.*".into(),
            };
            errors.push(
                SpecError::new(&src, 0..eq, format!("unknown key `{target}`"))
                    .label("unknown key")
                    .help(help),
            );
            continue;
        }
        let mut value = tree::parse_value(&src, eq + 1);
        value.key_span = Some(0..eq);
        if let Err(span) = root.set_path(&parts, value) {
            errors.push(
                SpecError::new(&src, 0..eq, format!("cannot set `{key}`"))
                    .label("key")
                    .help(format!(
                        "the file has a non-table value on this path (at bytes {}..{})",
                        span.start, span.end
                    )),
            );
        }
    }
}

struct Axis {
    path: String,
    values: Vec<Node>,
    key_node_span: std::ops::Range<usize>,
    src: Arc<SourceFile>,
}

fn collect_sweep(root: &mut Node, errors: &mut Vec<SpecError>) -> Vec<Axis> {
    let known = known_paths();
    let mut axes = Vec::new();
    if let Some(depth) = root.get("depth") {
        if let Kind::Array(items) = &depth.kind {
            if items.is_empty() {
                errors.push(
                    depth
                        .error("`depth` is an empty list")
                        .label("empty")
                        .help("give a depth, or a list of depths to sweep"),
                );
            } else {
                axes.push(Axis {
                    path: "depth".into(),
                    values: items.clone(),
                    key_node_span: depth.key_or_value_span(),
                    src: depth.src.clone(),
                });
            }
        }
    }
    let Some(sweep) = root.remove("sweep") else {
        return axes;
    };
    let Some(entries) = sweep.entries() else {
        errors.push(
            sweep
                .error("`sweep` must be a table of key = [values]")
                .label("not a table")
                .help("[sweep]\n\"base.lr\" = [4e-4, 1e-3]"),
        );
        return axes;
    };
    let mut leaves = Vec::new();
    flatten(entries, "", &mut leaves);
    for (path, node) in leaves {
        if !known.contains(&path) {
            let help = match did_you_mean(&path, known.iter().map(String::as_str)) {
                Some(s) => format!("did you mean `{s}`?"),
                None => "sweep keys are dotted paths such as depth, base.lr, train.tokens".into(),
            };
            errors.push(
                SpecError::new(
                    &node.src,
                    node.key_or_value_span(),
                    format!("unknown sweep key `{path}`"),
                )
                .label("unknown key")
                .help(help),
            );
            continue;
        }
        let items = match &node.kind {
            Kind::Array(items) if !items.is_empty() => items.clone(),
            Kind::Array(_) => {
                errors.push(
                    node.error(format!("sweep of `{path}` is an empty list"))
                        .label("empty")
                        .help("list at least one value"),
                );
                continue;
            }
            _ => {
                errors.push(
                    node.error(format!(
                        "sweep values of `{path}` must be a list, found {}",
                        node.type_name()
                    ))
                    .label("expected [v1, v2, ...]")
                    .help(format!(
                        "\"{path}\" = [a, b, c]; to set a single value, set it in its own table"
                    )),
                );
                continue;
            }
        };
        if let Some(prev) = axes.iter().find(|a: &&Axis| a.path == path) {
            errors.push(
                SpecError::new(
                    &node.src,
                    node.key_or_value_span(),
                    format!("`{path}` is swept twice"),
                )
                .label("second sweep")
                .help(format!(
                    "the first is at bytes {}..{}; keep one list",
                    prev.key_node_span.start, prev.key_node_span.end
                )),
            );
            continue;
        }
        axes.push(Axis {
            path,
            values: items,
            key_node_span: node.key_or_value_span(),
            src: node.src.clone(),
        });
    }
    axes
}

/// `[sweep]` keys may be nested tables, dotted keys, or quoted `"base.lr"` keys.
fn flatten(entries: &[(String, Node)], prefix: &str, out: &mut Vec<(String, Node)>) {
    for (k, n) in entries {
        let path = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match &n.kind {
            Kind::Table(inner) => flatten(inner, &path, out),
            _ => out.push((path, n.clone())),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Arch loading

struct ArchCache {
    base_dir: PathBuf,
    loaded: HashMap<String, Option<Arc<ArchSpec>>>,
}

impl ArchCache {
    /// The family named by `node`; its errors are reported once (the first time).
    fn get(&mut self, r: &mut Reader, node: &Node, reference: &str) -> Option<Arc<ArchSpec>> {
        if let Some(hit) = self.loaded.get(reference) {
            return hit.clone();
        }
        let result = self.load(r, node, reference);
        self.loaded.insert(reference.to_string(), result.clone());
        result
    }

    fn load(&self, r: &mut Reader, node: &Node, reference: &str) -> Option<Arc<ArchSpec>> {
        if let Some(parsed) = arch::builtin(reference) {
            return match parsed {
                Ok(spec) => Some(Arc::new(spec)),
                Err(errs) => {
                    errs.into_iter().for_each(|e| r.push(e));
                    None
                }
            };
        }
        let looks_like_path =
            reference.ends_with(".toml") || reference.contains('/') || reference.contains('\\');
        if !looks_like_path {
            let names: Vec<&str> = arch::builtin_names().collect();
            let help = match did_you_mean(reference, names.iter().copied()) {
                Some(s) => format!(
                    "did you mean \"{s}\"? Builtin families: {}; or give a path ending in .toml",
                    names.join(", ")
                ),
                None => format!(
                    "builtin families: {}; or give a path ending in .toml",
                    names.join(", ")
                ),
            };
            r.push(
                node.error(format!("unknown arch `{reference}`"))
                    .label("not a builtin family")
                    .help(help),
            );
            return None;
        }
        let path = self.base_dir.join(reference);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) => {
                r.push(
                    node.error(format!("cannot read arch file {}: {e}", path.display()))
                        .label("arch file")
                        .help("arch paths are relative to the experiment file's directory"),
                );
                return None;
            }
        };
        let src = SourceFile::new(path.display().to_string(), text);
        match arch::parse_arch(&src) {
            Ok(spec) => Some(Arc::new(spec)),
            Err(errs) => {
                errs.into_iter().for_each(|e| r.push(e));
                None
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// One member

fn missing(r: &mut Reader, root: &Node, key: &str, help: &str) {
    r.push(
        SpecError::new(&root.src, 0..0, format!("missing required key `{key}`"))
            .label("required at the top level")
            .help(help.to_string()),
    );
}

fn opt<T>(node: Option<&Node>, mut f: impl FnMut(&Node) -> Option<T>) -> Option<Option<T>> {
    match node {
        None => Some(None),
        Some(n) => f(n).map(Some),
    }
}

const COUNT: IntRange = POSITIVE;

fn read_run(
    r: &mut Reader,
    root: &Node,
    index: usize,
    label: String,
    archs: &mut ArchCache,
) -> Option<RunSpec> {
    r.table(root, "", TOP_KEYS);
    let start_errors = r.errors.len();

    // arch
    let arch_node = root.get("arch");
    let arch = match arch_node {
        Some(n) => r.string(n, "arch").and_then(|s| archs.get(r, n, &s)),
        None => {
            missing(
                r,
                root,
                "arch",
                "arch = \"sambay\" (a builtin family) or arch = \"archs/my.toml\" (a file)",
            );
            None
        }
    };
    let depth_node = root.get("depth");
    let depth = match depth_node {
        Some(n) => r.int(n, "depth", POSITIVE, false),
        None => {
            missing(
                r,
                root,
                "depth",
                "depth = 16, or a list to sweep: depth = [8, 12, 16]",
            );
            None
        }
    };
    let parametrization = match root.get("parametrization") {
        Some(n) => r
            .choice(n, "parametrization", PARAMETRIZATIONS)
            .map(|s| match s.as_str() {
                "sp" => Parametrization::Sp,
                "mup" => Parametrization::Mup,
                _ => Parametrization::MupPlusPlus,
            }),
        None => {
            missing(
                r,
                root,
                "parametrization",
                "parametrization = \"mup++\" (μP++), \"mup\" (width-only μP) or \"sp\" (standard)",
            );
            None
        }
    };
    let tied_node = root.get("tied_embeddings");
    let tied = opt(tied_node, |n| r.boolean(n, "tied_embeddings"));

    let base = read_base(r, root.get("base"));
    let train = read_train(r, root.get("train"));
    let data = read_data(r, root.get("data"));
    let cluster = read_cluster(r, root.get("cluster"));

    let (arch, depth, parametrization, tied, base, train, (train_data, val_data), cluster) = (
        arch?,
        depth?,
        parametrization?,
        tied?,
        base?,
        train?,
        data?,
        cluster?,
    );
    if r.errors.len() > start_errors {
        return None;
    }
    let depth_node = depth_node?;

    // The family at this depth.
    let swa = train.swa_len.map(|w| w as usize);
    let resolved = match arch::resolve(&arch, depth, swa) {
        Ok(a) => a,
        Err(issues) => {
            for issue in issues {
                let e = issue.error;
                match issue.blame {
                    Blame::Depth => {
                        let rule_at = e.location();
                        let mut err = depth_node
                            .error(e.message.clone())
                            .label(format!("{} at depth {depth}", arch.name));
                        let help = e.help.clone().map_or(String::new(), |h| format!("{h}; "));
                        err = err.help(format!("{help}rule at {rule_at}"));
                        r.push(err);
                    }
                    Blame::Arch => {
                        let mut e = e;
                        if !e.message.contains("depth") {
                            e.message = format!("at depth {depth}: {}", e.message);
                        }
                        r.push(e);
                    }
                }
            }
            return None;
        }
    };

    let run = RunSpec {
        index,
        label,
        arch: arch.clone(),
        resolved,
        depth: depth as u64,
        parametrization,
        tied_embeddings: tied.unwrap_or(false),
        base,
        name: train.name,
        tokens: train.tokens,
        seq_len: train.seq_len,
        micro_batch: train.micro_batch,
        optimizer: train.optimizer,
        decay: train.decay,
        wsd: train.wsd,
        label_smoothing: train.label_smoothing,
        varlen: train.varlen,
        rope_base: train.rope_base,
        swa_len: train.swa_len,
        seed: train.seed,
        eval_interval: train.eval_interval,
        save_interval: train.save_interval,
        log_interval: train.log_interval,
        out_dir: train.out_dir,
        train_data,
        val_data,
        nodes: cluster.nodes,
        gpus_per_node: cluster.gpus_per_node,
        gpu_memory_gib: cluster.gpu_memory_gib,
        sharding: cluster.sharding,
        tree: root.clone(),
    };
    let mut run = run;
    cross_checks(r, &mut run, tied_node);
    if r.errors.len() > start_errors {
        return None;
    }
    Some(run)
}

fn read_base(r: &mut Reader, node: Option<&Node>) -> Option<BaseSpec> {
    let mut b = BaseSpec::default();
    let Some(node) = node else { return Some(b) };
    r.table(node, "base", BASE_KEYS)?;
    let before = r.errors.len();
    b.n0_mult_is_float = node.entries().is_some_and(|e| !e.is_empty());
    let int = |r: &mut Reader, key: &str, range: IntRange, slot: &mut u64| {
        if let Some(n) = node.get(key) {
            if let Some(v) = r.int(n, &format!("base.{key}"), range, true) {
                *slot = v as u64;
            }
        }
    };
    int(r, "depth", POSITIVE, &mut b.d0);
    int(r, "batch_tokens", COUNT, &mut b.b0);
    int(r, "tokens", COUNT, &mut b.t0);
    int(r, "head_dim", POSITIVE, &mut b.hd0);
    int(r, "warmup_tokens", NON_NEGATIVE, &mut b.warmup_tokens0);
    let float = |r: &mut Reader, key: &str, min: Option<f64>, max: Option<f64>, slot: &mut f64| {
        if let Some(n) = node.get(key) {
            if let Some(v) = r.float(n, &format!("base.{key}"), min, max) {
                *slot = v;
            }
        }
    };
    float(r, "lr", Some(0.0), None, &mut b.eta0);
    float(r, "w_init", Some(0.0), None, &mut b.w_init0);
    float(r, "n0_mult", Some(0.0), None, &mut b.n0_mult);
    float(r, "weight_decay", Some(0.0), None, &mut b.weight_decay0);
    float(r, "eps", Some(0.0), None, &mut b.eps0);
    float(r, "min_lr", Some(0.0), None, &mut b.min_lr0);
    float(r, "beta1", Some(0.0), Some(1.0), &mut b.beta1_0);
    float(r, "beta2", Some(0.0), Some(1.0), &mut b.beta2_0);
    float(r, "muon_beta", Some(0.0), Some(1.0), &mut b.muon_beta_0);
    float(
        r,
        "weight_lr_scale",
        Some(0.0),
        None,
        &mut b.weight_lr_scale_0,
    );
    for (key, v) in [
        ("lr", b.eta0),
        ("n0_mult", b.n0_mult),
        ("eps", b.eps0),
        ("weight_lr_scale", b.weight_lr_scale_0),
    ] {
        if v == 0.0 {
            if let Some(n) = node.get(key) {
                r.push(
                    n.error(format!("`base.{key}` must be greater than 0"))
                        .label("zero"),
                );
            }
        }
    }
    (r.errors.len() == before).then_some(b)
}

struct TrainSettings {
    name: Option<String>,
    tokens: Option<f64>,
    seq_len: Option<u64>,
    micro_batch: Option<u64>,
    optimizer: Optimizer,
    decay: Decay,
    wsd: bool,
    label_smoothing: f64,
    varlen: bool,
    rope_base: Option<f64>,
    swa_len: Option<u64>,
    seed: u64,
    eval_interval: u64,
    save_interval: u64,
    log_interval: u64,
    out_dir: String,
}

fn read_train(r: &mut Reader, node: Option<&Node>) -> Option<TrainSettings> {
    let mut t = TrainSettings {
        name: None,
        tokens: None,
        seq_len: None,
        micro_batch: None,
        optimizer: Optimizer::AdamW,
        decay: Decay::Linear,
        wsd: false,
        label_smoothing: 0.0,
        varlen: false,
        rope_base: None,
        swa_len: None,
        seed: 3407,
        eval_interval: 1000,
        save_interval: 1000,
        log_interval: 10,
        out_dir: "runs".into(),
    };
    let Some(node) = node else { return Some(t) };
    r.table(node, "train", TRAIN_KEYS)?;
    let before = r.errors.len();
    if let Some(n) = node.get("name") {
        t.name = r.string(n, "train.name");
        if t.name.as_deref() == Some("") {
            r.push(n.error("`train.name` must not be empty").label("empty"));
        }
    }
    if let Some(n) = node.get("tokens") {
        match &n.kind {
            Kind::Str(s) if s == "chinchilla" => t.tokens = None,
            Kind::Str(_) => {
                r.choice(n, "train.tokens", &["chinchilla"]);
            }
            _ => {
                if let Some(v) = r.float(n, "train.tokens", Some(1.0), None) {
                    t.tokens = Some(v);
                }
            }
        }
    }
    let uint = |r: &mut Reader, key: &str, range: IntRange| -> Option<u64> {
        node.get(key)
            .and_then(|n| r.int(n, &format!("train.{key}"), range, false))
            .map(|v| v as u64)
    };
    t.seq_len = uint(r, "seq_len", POSITIVE);
    t.micro_batch = uint(r, "micro_batch", POSITIVE);
    t.swa_len = uint(r, "swa_len", POSITIVE);
    if let Some(v) = uint(r, "seed", NON_NEGATIVE) {
        t.seed = v;
    }
    if let Some(v) = uint(r, "eval_interval", POSITIVE) {
        t.eval_interval = v;
    }
    if let Some(v) = uint(r, "save_interval", POSITIVE) {
        t.save_interval = v;
    }
    if let Some(v) = uint(r, "log_interval", POSITIVE) {
        t.log_interval = v;
    }
    if let Some(n) = node.get("optimizer") {
        t.optimizer = match r.choice(n, "train.optimizer", OPTIMIZERS).as_deref() {
            Some("muon") => Optimizer::Muon,
            Some("nadam") => Optimizer::NAdam,
            _ => Optimizer::AdamW,
        };
    }
    if let Some(n) = node.get("schedule") {
        let (kind, decay) = match &n.kind {
            Kind::Str(_) => (r.choice(n, "train.schedule", SCHEDULES), None),
            Kind::Table(_) => {
                if r.table(n, "train.schedule", SCHEDULE_KEYS).is_some() {
                    let kind = match n.get("kind") {
                        Some(k) => r.choice(k, "train.schedule.kind", SCHEDULES),
                        None => {
                            r.push(n.error("`train.schedule` needs `kind`").label("no kind").help(
                                "kind = \"linear\", \"cosine\" or \"wsd\" (wsd takes decay = \"linear\" or \"cosine\")",
                            ));
                            None
                        }
                    };
                    let decay = n
                        .get("decay")
                        .map(|d| (r.choice(d, "train.schedule.decay", DECAYS), d));
                    (kind, decay)
                } else {
                    (None, None)
                }
            }
            _ => {
                r.push(
                    n.error(format!("`train.schedule` must be a string or a table, found {}", n.type_name()))
                        .label("bad schedule")
                        .help("schedule = \"cosine\", or schedule = { kind = \"wsd\", decay = \"cosine\" }"),
                );
                (None, None)
            }
        };
        match kind.as_deref() {
            Some("cosine") => t.decay = Decay::Cosine,
            Some("wsd") => t.wsd = true,
            _ => {}
        }
        if let Some((d, dnode)) = decay {
            if kind.as_deref() == Some("wsd") {
                if d.as_deref() == Some("cosine") {
                    t.decay = Decay::Cosine;
                }
            } else if kind.is_some() {
                r.push(
                    SpecError::new(
                        &dnode.src,
                        dnode.key_or_value_span(),
                        "`decay` only applies to kind = \"wsd\"",
                    )
                    .label("not used")
                    .help("the kind itself is the decay shape for linear and cosine schedules"),
                );
            }
        }
    }
    if let Some(n) = node.get("label_smoothing") {
        if let Some(v) = r.float(n, "train.label_smoothing", Some(0.0), Some(1.0)) {
            if v >= 1.0 {
                r.push(
                    n.error("`train.label_smoothing` must be below 1")
                        .label("too large"),
                );
            }
            t.label_smoothing = v;
        }
    }
    if let Some(n) = node.get("varlen") {
        t.varlen = r.boolean(n, "train.varlen").unwrap_or(false);
    }
    if let Some(n) = node.get("rope_base") {
        t.rope_base = r.float(n, "train.rope_base", Some(1.0), None);
    }
    if let Some(n) = node.get("out_dir") {
        if let Some(s) = r.string(n, "train.out_dir") {
            if s.is_empty() {
                r.push(n.error("`train.out_dir` must not be empty").label("empty"));
            }
            t.out_dir = s;
        }
    }
    (r.errors.len() == before).then_some(t)
}

fn read_sources(r: &mut Reader, node: &Node, what: &str) -> Option<Vec<DataSourceSpec>> {
    let items = r.array(node, what)?;
    let before = r.errors.len();
    let mut out = Vec::new();
    for item in items {
        if r.table(item, what, SOURCE_KEYS).is_none() {
            continue;
        }
        let weight = match item.get("weight") {
            Some(w) => match r.float(w, &format!("{what}.weight"), Some(0.0), None) {
                Some(0.0) => {
                    r.push(
                        w.error("a data weight must be greater than 0")
                            .label("zero"),
                    );
                    continue;
                }
                Some(v) => v,
                None => continue,
            },
            None => 1.0,
        };
        match item.get("synthetic") {
            Some(s) => {
                for key in ["dir", "prefix"] {
                    if let Some(n) = item.get(key) {
                        r.push(
                            SpecError::new(&n.src, n.key_or_value_span(), format!("`{key}` does not apply to a synthetic source"))
                                .label("not used")
                                .help("a source is either { dir, prefix, weight } or { synthetic = { seed, tokens, corpus }, weight }"),
                        );
                    }
                }
                if r.table(s, &format!("{what}.synthetic"), SYNTHETIC_KEYS)
                    .is_none()
                {
                    continue;
                }
                let seed = s
                    .get("seed")
                    .map_or(Some(0), |n| r.int(n, "synthetic.seed", NON_NEGATIVE, false));
                let tokens = match s.get("tokens") {
                    Some(n) => r.int(n, "synthetic.tokens", POSITIVE, true),
                    None => {
                        r.push(
                            s.error("synthetic source needs `tokens`")
                                .label("no tokens")
                                .help("synthetic = { seed = 1234, tokens = 2_000_000 }"),
                        );
                        None
                    }
                };
                let text = match s.get("corpus") {
                    None => Some(false),
                    Some(n) => match r.string(n, "synthetic.corpus").as_deref() {
                        Some("ids") => Some(false),
                        Some("text") => Some(true),
                        Some(other) => {
                            r.push(
                                n.error(format!("unknown synthetic corpus `{other}`"))
                                    .label("not a corpus")
                                    .help("corpus = \"ids\" (token ids, vocabulary 512) or \"text\" (English-like text, byte tokens)"),
                            );
                            None
                        }
                        None => None,
                    },
                };
                if let (Some(seed), Some(tokens), Some(text)) = (seed, tokens, text) {
                    let (seed, tokens) = (seed as u64, tokens as u64);
                    out.push(if text {
                        DataSourceSpec::SyntheticText {
                            seed,
                            tokens,
                            weight,
                        }
                    } else {
                        DataSourceSpec::Synthetic {
                            seed,
                            tokens,
                            weight,
                        }
                    });
                }
            }
            None => {
                let dir = match item.get("dir") {
                    Some(n) => r.string(n, "dir"),
                    None => {
                        r.push(item.error("data source needs `dir` (or `synthetic`)").label("no dir").help(
                            "{ dir = \"data/slimpajama\", prefix = \"train\", weight = 1.0 }",
                        ));
                        None
                    }
                };
                let default_prefix = if what.ends_with("val") {
                    "validation"
                } else {
                    "train"
                };
                let prefix = item
                    .get("prefix")
                    .map_or(Some(default_prefix.to_string()), |n| r.string(n, "prefix"));
                if let (Some(dir), Some(prefix)) = (dir, prefix) {
                    if dir.is_empty() {
                        if let Some(n) = item.get("dir") {
                            r.push(n.error("`dir` must not be empty").label("empty"));
                        }
                    }
                    out.push(DataSourceSpec::Packed {
                        dir,
                        prefix,
                        weight,
                    });
                }
            }
        }
    }
    (r.errors.len() == before).then_some(out)
}

fn read_data(
    r: &mut Reader,
    node: Option<&Node>,
) -> Option<(Vec<DataSourceSpec>, Vec<DataSourceSpec>)> {
    let default_train = || {
        vec![DataSourceSpec::Packed {
            dir: DEFAULT_TRAIN_DIR.into(),
            prefix: "train".into(),
            weight: 1.0,
        }]
    };
    let Some(node) = node else {
        return Some((default_train(), vec![]));
    };
    r.table(node, "data", DATA_KEYS)?;
    let train = match node.get("train") {
        Some(n) => {
            let v = read_sources(r, n, "data.train")?;
            if v.is_empty() {
                r.push(
                    n.error("`data.train` lists no source")
                        .label("empty")
                        .help("give at least one training source"),
                );
                return None;
            }
            v
        }
        None => default_train(),
    };
    let val = match node.get("val") {
        Some(n) => read_sources(r, n, "data.val")?,
        None => vec![],
    };
    Some((train, val))
}

struct ClusterSettings {
    nodes: u64,
    gpus_per_node: u64,
    gpu_memory_gib: f64,
    sharding: Option<Sharding>,
}

fn read_cluster(r: &mut Reader, node: Option<&Node>) -> Option<ClusterSettings> {
    let mut c = ClusterSettings {
        nodes: 1,
        gpus_per_node: 1,
        gpu_memory_gib: 80.0,
        sharding: None,
    };
    let Some(node) = node else { return Some(c) };
    r.table(node, "cluster", CLUSTER_KEYS)?;
    let before = r.errors.len();
    if let Some(v) = node
        .get("nodes")
        .and_then(|n| r.int(n, "cluster.nodes", POSITIVE, false))
    {
        c.nodes = v as u64;
    }
    if let Some(v) = node
        .get("gpus_per_node")
        .and_then(|n| r.int(n, "cluster.gpus_per_node", POSITIVE, false))
    {
        c.gpus_per_node = v as u64;
    }
    if let Some(n) = node.get("gpu_memory_gib") {
        match r.float(n, "cluster.gpu_memory_gib", Some(0.0), None) {
            Some(v) if v > 0.0 => c.gpu_memory_gib = v,
            Some(_) => r.push(
                n.error("`cluster.gpu_memory_gib` must be greater than 0")
                    .label("zero"),
            ),
            None => {}
        }
    }
    if let Some(n) = node.get("sharding") {
        c.sharding = r
            .choice(n, "cluster.sharding", SHARDINGS)
            .map(|s| match s.as_str() {
                "data_parallel" => Sharding::DataParallel,
                "zero1" => Sharding::Zero1,
                "zero3" => Sharding::Zero3,
                _ => Sharding::HybridShard,
            });
    }
    (r.errors.len() == before).then_some(c)
}

// ---------------------------------------------------------------------------------------
// Cross-field rules

fn label_node<'a>(root: &'a Node, paths: &[&str]) -> &'a Node {
    for p in paths {
        if let Some(n) = root.at_path(p) {
            return n;
        }
    }
    root.nearest(paths.first().copied().unwrap_or(""))
}

fn cross_checks(r: &mut Reader, run: &mut RunSpec, tied_node: Option<&Node>) {
    let root = run.tree.clone();
    // Hybrid optimizers need μP's vector/weight split.
    if run.parametrization == Parametrization::Sp && run.optimizer != Optimizer::AdamW {
        let n = label_node(&root, &["train.optimizer"]);
        r.push(
            n.error(format!("optimizer \"{}\" needs a μP parametrization", run.optimizer.as_str()))
                .label("needs mup or mup++")
                .help("Muon and NAdam take the weight matrices of μP's two parameter groups (ArchScale uses them only with `mup`); set parametrization = \"mup++\", or use optimizer = \"adamw\""),
        );
    }
    // A family tied in its arch file cannot be untied by the run.
    if run.arch.tied_embeddings {
        if let Some(n) = tied_node {
            if matches!(n.kind, Kind::Bool(false)) {
                r.push(
                    n.error(format!("`{}` ties its embeddings in its arch spec; `tied_embeddings = false` cannot untie them", run.arch.name))
                        .label("cannot untie")
                        .help("remove the key (ArchScale's `_tie` can only tie), or use an arch file with tied_embeddings = false"),
                );
            }
        }
    }
    let (seq, micro) = effective_seq_micro(run.seq_len, run.micro_batch, run.varlen);
    // The window must fit the sequence.
    if let Some(w) = run.resolved.max_window() {
        if w as u64 > seq {
            let n = label_node(&root, &["train.swa_len", "train.seq_len", "depth"]);
            r.push(
                n.error(format!("sliding window {w} of `{}` is longer than the sequence length {seq}", run.arch.name))
                    .label("window > seq_len")
                    .help("a window longer than the sequence is full attention in disguise; raise train.seq_len or set train.swa_len <= seq_len"),
            );
        }
    }
    if run.varlen && micro != 1 {
        let n = label_node(&root, &["train.micro_batch", "train.varlen"]);
        r.push(
            n.error(format!("varlen training needs micro_batch = 1, found {micro}"))
                .label("micro-batch")
                .help("varlen packs one document stream per rank (ArchScale forces micro-batch 1); remove micro_batch or set it to 1"),
        );
    }
    // At least one micro-batch per rank per optimizer step (hp-spec §4.5-4.6).
    let world = run.nodes.saturating_mul(run.gpus_per_node);
    let multiple = world.saturating_mul(micro).saturating_mul(seq);
    if run.base.b0 < multiple {
        let n = label_node(
            &root,
            &[
                "base.batch_tokens",
                "train.micro_batch",
                "train.seq_len",
                "cluster.gpus_per_node",
                "cluster",
            ],
        );
        r.push(
            n.error(format!(
                "a batch of {} tokens holds no micro-batch on every rank: {} nodes x {} GPUs x micro-batch {micro} x seq_len {seq} = {multiple} tokens",
                run.base.b0, run.nodes, run.gpus_per_node
            ))
            .label("batch too small")
            .help(format!(
                "ArchScale rounds the batch down to a multiple of {multiple} and asserts gradient_accumulation_steps > 0; raise base.batch_tokens to at least {multiple}, or use fewer GPUs, a smaller micro_batch or seq_len"
            )),
        );
    }
    if let Some(tokens) = run.tokens {
        if tokens < seq as f64 * world as f64 * micro as f64 {
            let n = label_node(&root, &["train.tokens"]);
            r.push(
                n.error(format!(
                    "{tokens} training tokens are fewer than one micro-batch on every rank ({})",
                    seq * world * micro
                ))
                .label("too few tokens")
                .help("raise train.tokens"),
            );
        }
    }
    // train.name: interpolate {key}s, then check its ArchScale flags against the settings.
    if let Some(name) = run.name.clone() {
        let name_node = label_node(&root, &["train.name"]).clone();
        match interpolate(&name, &root) {
            Ok(expanded) => {
                check_name_flags(r, run, &expanded, &name_node);
                run.name = Some(expanded);
            }
            Err(msg) => r.push(name_node.error(msg.0).label("in train.name").help(msg.1)),
        }
    }
}

/// `{base.lr}` in a name becomes that key's value as written.
fn interpolate(name: &str, root: &Node) -> Result<String, (String, String)> {
    let mut out = String::new();
    let mut rest = name;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let Some(close) = rest[open..].find('}') else {
            return Err((
                "unclosed `{` in train.name".into(),
                "write {key.path}, e.g. \"scaling_mup_lr{base.lr}\"".into(),
            ));
        };
        let key = &rest[open + 1..open + close];
        match root.at_path(key) {
            Some(n) if !matches!(n.kind, Kind::Table(_) | Kind::Array(_)) => {
                let v = display_value(n);
                if v.chars().any(|c| c.is_whitespace() || c == '/') {
                    return Err((format!("`{{{key}}}` expands to \"{v}\", which cannot be part of a run name"), "use keys with plain values".into()));
                }
                out.push_str(&v);
            }
            _ => {
                return Err((
                    format!("train.name refers to `{{{key}}}`, which this run does not set to a plain value"),
                    "refer to a key the file sets, e.g. {base.lr} or {train.tokens}".into(),
                ))
            }
        }
        rest = &rest[open + close + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

fn check_name_flags(r: &mut Reader, run: &RunSpec, name: &str, node: &Node) {
    let f: NameFlags = names::decode(name);
    let mut problems: Vec<String> = Vec::new();
    if f.validation {
        problems.push(
            "contains `validation` (ArchScale's validate-only mode), which archscale does not run"
                .into(),
        );
    }
    let p = names::parametrization_of(&f);
    if p != run.parametrization.as_str() {
        problems.push(format!(
            "says parametrization \"{p}\" but parametrization = \"{}\"",
            run.parametrization.as_str()
        ));
    }
    let o = names::optimizer_of(&f);
    if o != run.optimizer.as_str() {
        problems.push(format!(
            "says optimizer \"{o}\" but optimizer = \"{}\"",
            run.optimizer.as_str()
        ));
    }
    if f.tie != run.tied_embeddings {
        problems.push(format!(
            "{} `_tie` but tied_embeddings = {}",
            if f.tie { "has" } else { "lacks" },
            run.tied_embeddings
        ));
    }
    if f.varlen != run.varlen {
        problems.push(format!(
            "{} `_varlen` but varlen = {}",
            if f.varlen { "has" } else { "lacks" },
            run.varlen
        ));
    }
    let ls = if f.ls { names::LABEL_SMOOTHING } else { 0.0 };
    if ls != run.label_smoothing {
        problems.push(format!(
            "implies label_smoothing = {ls} (`_ls_`) but label_smoothing = {}",
            run.label_smoothing
        ));
    }
    let rope_ok = if f.rbase {
        run.rope_base == Some(names::RBASE_ROPE_BASE)
    } else {
        run.rope_base.is_none_or(|b| b == 10000.0)
    };
    if !rope_ok {
        let want = if f.rbase {
            "640000 (`_rbase_`)"
        } else {
            "10000 (no `_rbase_`)"
        };
        problems.push(format!(
            "implies rope_base = {want} but rope_base = {:?}",
            run.rope_base
        ));
    }
    if f.wsd != run.wsd || f.cosine != (run.decay == Decay::Cosine) {
        let said = match (f.wsd, f.cosine) {
            (true, true) => "wsd with cosine decay",
            (true, false) => "wsd with linear decay",
            (false, true) => "cosine",
            (false, false) => "linear",
        };
        problems.push(format!(
            "implies schedule {said} (`wsd`/`cosine` substrings)"
        ));
    }
    if !problems.is_empty() {
        r.push(
            node.error(format!("train.name \"{name}\" disagrees with the settings: it {}", problems.join("; it ")))
                .label("ArchScale reads flags from this name")
                .help("ArchScale derives settings from substrings of train_name (hp-spec §3); make the settings agree, or drop train.name to have the name derived"),
        );
    }
}

/// Two sweep members that would write to the same run directory are an error.
fn check_run_names(runs: &[RunSpec], sweep: &[Axis], errors: &mut Vec<SpecError>) {
    if runs.len() < 2 {
        return;
    }
    let key = |r: &RunSpec| {
        let flags = match &r.name {
            Some(_) => String::new(),
            None => format!(
                "{}|{}|{}|{}|{:?}|{}|{:?}|{}",
                r.parametrization.as_str(),
                r.tied_embeddings,
                r.varlen,
                r.label_smoothing,
                r.rope_base,
                r.wsd,
                r.decay,
                r.optimizer.as_str()
            ),
        };
        format!(
            "{:?}|{}|{}|{}|{:?}|{}|{}",
            r.name,
            r.arch.name,
            r.depth,
            r.effective_seq_len(),
            r.swa_len,
            r.out_dir,
            flags
        )
    };
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (i, run) in runs.iter().enumerate() {
        if let Some(&j) = seen.get(&key(run)) {
            let first = &runs[j];
            let differing: Vec<&Axis> = sweep
                .iter()
                .filter(|a| {
                    let (x, y) = (first.node(&a.path), run.node(&a.path));
                    x.map(|n| n.span.clone()) != y.map(|n| n.span.clone())
                })
                .collect();
            let axis = differing.first().copied().or(sweep.first());
            let (src, span, path) = match axis {
                Some(a) => (a.src.clone(), a.key_node_span.clone(), a.path.clone()),
                None => continue,
            };
            errors.push(
                SpecError::new(&src, span, format!(
                    "sweep members {} and {} would get the same run name and directory",
                    first.label, run.label
                ))
                .label("swept here")
                .help(format!(
                    "ArchScale names runs <train_name>_<model>_ctx<T>; put the swept value into train.name, e.g. name = \"scaling_mup_{}{{{path}}}\"",
                    path.rsplit('.').next().unwrap_or("x")
                )),
            );
            return;
        }
        seen.insert(key(run), i);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
arch = "transformer"
depth = 8
parametrization = "mup++"
[cluster]
nodes = 1
gpus_per_node = 8
"#;

    fn parse(text: &str) -> Result<Experiment, SpecErrors> {
        parse_experiment("exp.toml", text, Path::new("."), &[])
    }

    fn errors(text: &str) -> SpecErrors {
        match parse(text) {
            Ok(_) => panic!("expected errors for:\n{text}"),
            Err(e) => e,
        }
    }

    #[test]
    fn minimal_file_gets_archscale_defaults() {
        let e = parse(MINIMAL).unwrap();
        assert_eq!(e.runs.len(), 1);
        let r = &e.runs[0];
        assert_eq!(r.base, BaseSpec::default());
        assert_eq!(
            (r.seed, r.eval_interval, r.save_interval, r.log_interval),
            (3407, 1000, 1000, 10)
        );
        assert_eq!(
            (r.effective_seq_len(), r.effective_micro_batch()),
            (4096, 2)
        );
        assert_eq!(r.resolved.n_embd, 1024);
        assert_eq!(r.out_dir, "runs");
        assert!(r.tokens.is_none());
    }

    #[test]
    fn depth_sweep_and_sweep_table_expand_in_order() {
        let text = MINIMAL.replace("depth = 8", "depth = [8, 16]")
            + "[sweep]\n\"base.lr\" = [1e-3, 4e-4]\n[train]\nname = \"scaling_mup_lr{base.lr}\"\n";
        let e = parse(&text).unwrap();
        let got: Vec<(u64, f64, String)> = e
            .runs
            .iter()
            .map(|r| (r.depth, r.base.eta0, r.name.clone().unwrap()))
            .collect();
        assert_eq!(
            got,
            vec![
                (8, 1e-3, "scaling_mup_lr1e-3".into()),
                (8, 4e-4, "scaling_mup_lr4e-4".into()),
                (16, 1e-3, "scaling_mup_lr1e-3".into()),
                (16, 4e-4, "scaling_mup_lr4e-4".into()),
            ]
        );
        assert_eq!(e.sweep_keys, vec!["depth", "base.lr"]);
        assert_eq!(e.runs[1].label, "depth=8, base.lr=4e-4");
    }

    #[test]
    fn colliding_sweep_members_are_rejected() {
        let text = MINIMAL.to_string() + "[sweep]\nbase.lr = [1e-3, 4e-4]\n";
        let e = errors(&text);
        assert!(
            e.errors[0].message.contains("same run name"),
            "{}",
            e.render()
        );
        assert!(e.errors[0].help.as_ref().unwrap().contains("{base.lr}"));
    }

    #[test]
    fn all_errors_are_collected() {
        let text = r#"
arch = "transformer"
depth = 8
parametrization = "mup+"
tied_embedings = true
[base]
lr = "high"
batch_tokens = 1.5
[train]
seq_lem = 4096
optimizer = "sgd"
[cluster]
gpus_per_node = 0
"#;
        let e = errors(text);
        let msgs: Vec<&str> = e.errors.iter().map(|x| x.message.as_str()).collect();
        assert_eq!(e.len(), 7, "{msgs:#?}");
        let typo = e
            .errors
            .iter()
            .find(|x| x.message.contains("tied_embedings"))
            .unwrap();
        assert_eq!(
            typo.help.as_deref(),
            Some("did you mean `tied_embeddings`?")
        );
        for err in &e.errors {
            assert!(
                err.span.end <= text.len() && !err.span.is_empty(),
                "{err:?}"
            );
        }
    }

    #[test]
    fn sambayda_odd_kv_groups_name_the_member() {
        let text = r#"
arch = "sambayda"
depth = [8, 12, 16, 20]
parametrization = "mup++"
[cluster]
gpus_per_node = 8
"#;
        let e = errors(text);
        assert_eq!(e.len(), 2, "{}", e.render());
        assert!(
            e.errors[0].message.starts_with("sweep member depth=12:"),
            "{}",
            e.errors[0].message
        );
        assert!(e.errors[0].message.contains("even"));
        assert_eq!(&text[e.errors[0].span.clone()], "12");
        assert_eq!(&text[e.errors[1].span.clone()], "20");
    }

    #[test]
    fn cross_field_rules() {
        let e = errors(
            &MINIMAL
                .replace("mup++", "sp")
                .replace("[cluster]", "[train]\noptimizer = \"muon\"\n[cluster]"),
        );
        assert!(e.errors[0].message.contains("needs a μP"), "{}", e.render());

        let e = errors(
            &MINIMAL
                .replace("gpus_per_node = 8", "gpus_per_node = 8\nnodes = 128")
                .replace("nodes = 1\n", ""),
        );
        assert!(
            e.errors[0].message.contains("holds no micro-batch"),
            "{}",
            e.render()
        );

        let e = errors(
            &MINIMAL
                .replace("transformer", "samba")
                .replace("[cluster]", "[train]\nseq_len = 1024\n[cluster]"),
        );
        assert!(
            e.errors[0].message.contains("longer than the sequence"),
            "{}",
            e.render()
        );

        let e = errors(
            &MINIMAL
                .replace("depth = 8", "depth = 10")
                .replace("transformer", "sambay"),
        );
        assert!(
            e.errors[0].message.contains("depth % 4 == 0"),
            "{}",
            e.render()
        );

        let e = errors(&MINIMAL.replace("transformer", "phi4miniflash"));
        assert!(
            e.errors[0]
                .help
                .as_ref()
                .unwrap()
                .contains("only at depth 32"),
            "{}",
            e.render()
        );

        let e = errors(&MINIMAL.replace(
            "[cluster]",
            "[train]\nname = \"scaling_mup_tie\"\n[cluster]",
        ));
        assert!(e.errors[0].message.contains("`_tie`"), "{}", e.render());

        let text = "arch = \"phi4miniflash\"\ndepth = 32\nparametrization = \"sp\"\ntied_embeddings = false\n";
        assert!(errors(text).errors[0].message.contains("cannot untie"));
    }

    #[test]
    fn overrides_apply_and_bad_keys_are_diagnosed() {
        let ok = parse_experiment(
            "e.toml",
            MINIMAL,
            Path::new("."),
            &["base.lr=1e-3".into(), "depth=[8,12]".into()],
        )
        .unwrap();
        assert_eq!(ok.runs.len(), 2);
        assert_eq!(ok.runs[1].base.eta0, 1e-3);
        assert_eq!(ok.runs[1].depth, 12);
        let arch =
            parse_experiment("e.toml", MINIMAL, Path::new("."), &["arch=samba".into()]).unwrap();
        assert_eq!(arch.runs[0].arch.name, "samba");
        let err = parse_experiment(
            "e.toml",
            MINIMAL,
            Path::new("."),
            &["base.lrr=1".into(), "nokey".into()],
        )
        .unwrap_err();
        assert_eq!(err.len(), 2);
        assert_eq!(
            err.errors[0].help.as_deref(),
            Some("did you mean `base.lr`?")
        );
        assert_eq!(err.errors[0].src.name, "--set base.lrr=1");
        let bad_value =
            parse_experiment("e.toml", MINIMAL, Path::new("."), &["base.lr=fast".into()])
                .unwrap_err();
        assert!(bad_value.errors[0].message.contains("must be a number"));
    }

    #[test]
    fn spans_for_later_compile_errors() {
        let e = parse(&(MINIMAL.to_string() + "[base]\nlr = 5e-4\n")).unwrap();
        let span = e.span_of("base.lr").unwrap();
        assert_eq!(
            &e.src.text[span.offset()..span.offset() + span.len()],
            "5e-4"
        );
        assert!(e.span_of("train.seq_len").is_none());
        let err = e.runs[0].error_at("train.seq_len", "too long");
        assert!(err.span.end <= e.src.text.len());
    }

    #[test]
    fn schedules_and_sources() {
        let text = MINIMAL.to_string()
            + "[train]\nschedule = { kind = \"wsd\", decay = \"cosine\" }\ntokens = 1e9\n[data]\ntrain = [{ synthetic = { seed = 1, tokens = 1000 } }, { dir = \"d\", weight = 2 }]\nval = [{ dir = \"d\" }]\n";
        let e = parse(&text).unwrap();
        let r = &e.runs[0];
        assert!(r.wsd);
        assert_eq!(r.decay, Decay::Cosine);
        assert_eq!(r.tokens, Some(1e9));
        assert_eq!(
            r.train_data[0],
            DataSourceSpec::Synthetic {
                seed: 1,
                tokens: 1000,
                weight: 1.0
            }
        );
        assert_eq!(
            r.train_data[1],
            DataSourceSpec::Packed {
                dir: "d".into(),
                prefix: "train".into(),
                weight: 2.0
            }
        );
        assert_eq!(
            r.val_data[0],
            DataSourceSpec::Packed {
                dir: "d".into(),
                prefix: "validation".into(),
                weight: 1.0
            }
        );
        let bad = errors(
            &(MINIMAL.to_string()
                + "[train]\nschedule = { kind = \"linear\", decay = \"cosine\" }\n"),
        );
        assert!(bad.errors[0].message.contains("only applies"));
    }

    #[test]
    fn synthetic_text_corpus() {
        let text = MINIMAL.to_string()
            + "[data]\ntrain = [{ synthetic = { corpus = \"text\", seed = 3, tokens = 1000 } }]\n";
        let e = parse(&text).unwrap();
        assert_eq!(
            e.runs[0].train_data[0],
            DataSourceSpec::SyntheticText {
                seed: 3,
                tokens: 1000,
                weight: 1.0
            }
        );
        let bad = errors(
            &(MINIMAL.to_string()
                + "[data]\ntrain = [{ synthetic = { corpus = \"txt\", tokens = 1000 } }]\n"),
        );
        assert!(bad.errors[0]
            .message
            .contains("unknown synthetic corpus `txt`"));
    }

    #[test]
    fn varlen_at_4096_trains_at_8192() {
        let e = parse(&(MINIMAL.to_string() + "[train]\nvarlen = true\n")).unwrap();
        assert_eq!(
            (
                e.runs[0].effective_seq_len(),
                e.runs[0].effective_micro_batch()
            ),
            (8192, 1)
        );
        let e = parse(&(MINIMAL.to_string() + "[train]\nseq_len = 32768\n")).unwrap();
        assert_eq!(
            (
                e.runs[0].effective_seq_len(),
                e.runs[0].effective_micro_batch()
            ),
            (32768, 1)
        );
    }

    #[test]
    fn relative_arch_paths() {
        let dir = std::env::temp_dir().join(format!("archscale-spec-test-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("archs")).unwrap();
        let arch = arch::BUILTIN_ARCHS
            .iter()
            .find(|(n, _)| *n == "tiny-transformer")
            .unwrap()
            .1;
        std::fs::write(
            dir.join("archs/mine.toml"),
            arch.replace("tiny-transformer", "mine"),
        )
        .unwrap();
        let text = MINIMAL.replace("\"transformer\"", "\"archs/mine.toml\"");
        let e = parse_experiment("e.toml", &text, &dir, &[]).unwrap();
        assert_eq!(e.runs[0].arch.name, "mine");
        let missing =
            parse_experiment("e.toml", &text, Path::new("/nonexistent"), &[]).unwrap_err();
        assert!(missing.errors[0].message.contains("cannot read arch file"));
        let _ = std::fs::remove_dir_all(dir);
    }
}
