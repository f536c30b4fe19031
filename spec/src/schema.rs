//! JSON Schema of both spec kinds, for editors (taplo / Even Better TOML).
//!
//! These types describe the file format only; the parser in `experiment` / `arch` reads
//! the same keys (a test keeps the two in step) and adds spans, defaults and cross-field
//! rules that a schema cannot express.

#![allow(dead_code)]

use schemars::JsonSchema;
use serde::Serialize;
use std::collections::BTreeMap;

/// An integer, or an expression string (`"depth // 4"`, `"14.5*ar^2"`) over `depth`, `ar`,
/// `n_embd` with `+ - * / // % ^`, parentheses, comparisons and `ceil floor int float min max`.
#[derive(JsonSchema, Serialize)]
#[serde(untagged)]
enum IntOrExpr {
    Int(i64),
    Float(f64),
    Expr(String),
}

/// A number, or a list of them to sweep.
#[derive(JsonSchema, Serialize)]
#[serde(untagged)]
enum DepthOrSweep {
    One(#[schemars(range(min = 1))] u32),
    Sweep(Vec<u32>),
}

/// An experiment: a family, depths, base hyperparameters and how to train.
#[derive(JsonSchema, Serialize)]
#[serde(deny_unknown_fields)]
#[schemars(title = "archscale experiment")]
pub struct ExperimentFile {
    /// Builtin family name (`transformer`, `sambay`, ...) or a path to an arch TOML,
    /// relative to this file.
    arch: String,
    /// Number of layers; a list is a sweep.
    depth: DepthOrSweep,
    /// `mup++` (μP++: width and depth), `mup` (width-only μP), `sp` (standard).
    parametrization: ParametrizationName,
    /// Tie input and output embeddings (ArchScale `_tie`). A family tied in its arch spec
    /// stays tied.
    tied_embeddings: Option<bool>,
    base: Option<BaseFile>,
    train: Option<TrainFile>,
    data: Option<DataFile>,
    cluster: Option<ClusterFile>,
    /// Keys to sweep: dotted key paths (`"base.lr"`, `train.tokens`) mapped to lists. The
    /// cartesian product of all lists (and a `depth` list) is expanded into runs.
    sweep: Option<BTreeMap<String, serde_json::Value>>,
}

#[derive(JsonSchema, Serialize)]
enum ParametrizationName {
    #[serde(rename = "mup++")]
    MupPlusPlus,
    #[serde(rename = "mup")]
    Mup,
    #[serde(rename = "sp")]
    Sp,
}

/// ArchScale `BaseHyperparameters`: tuned at the base depth, transferred by the scaling rules.
#[derive(JsonSchema, Serialize)]
#[serde(deny_unknown_fields)]
struct BaseFile {
    /// Base depth d0 (default 16).
    depth: Option<u32>,
    /// Base peak learning rate eta0 at batch `batch_tokens` (default 4e-4).
    lr: Option<f64>,
    /// Base batch b0 in tokens per optimizer step (default 2097152).
    batch_tokens: Option<f64>,
    /// Base training tokens t0 of the Chinchilla rule (default 1e11).
    tokens: Option<f64>,
    /// Base head dimension hd0 for the μP attention scale (default 128).
    head_dim: Option<u32>,
    /// Multiplier on every linear weight at init, w_init0 (default 1.0).
    w_init: Option<f64>,
    /// Base parameter multiplier: n0 = n0_mult * d0^3 (default 237568).
    n0_mult: Option<f64>,
    /// Weight decay (default 0.1).
    weight_decay: Option<f64>,
    /// Adam epsilon (default 1e-8; ignored by ArchScale under sp).
    eps: Option<f64>,
    /// Final learning rate, absolute (default 0.0).
    min_lr: Option<f64>,
    /// Warmup length in tokens (default 1e9).
    warmup_tokens: Option<f64>,
    /// Adam beta1 (default 0.9).
    beta1: Option<f64>,
    /// Adam beta2 (default 0.95).
    beta2: Option<f64>,
    /// Muon momentum (default 0.95).
    muon_beta: Option<f64>,
    /// Extra LR factor of the weight optimizer in muon/nadam hybrids (default 1.0).
    weight_lr_scale: Option<f64>,
}

#[derive(JsonSchema, Serialize)]
#[serde(untagged)]
enum Tokens {
    /// Explicit budget (ArchScale `--max_tokens`).
    Count(f64),
    /// `"chinchilla"`: t0 * n_target / n0 with n_target = mult * depth^3 (the default).
    Rule(TokensRule),
}

#[derive(JsonSchema, Serialize)]
#[serde(rename_all = "snake_case")]
enum TokensRule {
    Chinchilla,
}

#[derive(JsonSchema, Serialize)]
#[serde(rename_all = "snake_case")]
enum OptimizerName {
    Adamw,
    Muon,
    Nadam,
}

#[derive(JsonSchema, Serialize)]
#[serde(rename_all = "snake_case")]
enum ScheduleKind {
    Linear,
    Cosine,
    Wsd,
}

#[derive(JsonSchema, Serialize)]
#[serde(rename_all = "snake_case")]
enum DecayName {
    Linear,
    Cosine,
}

#[derive(JsonSchema, Serialize)]
#[serde(deny_unknown_fields)]
struct ScheduleTable {
    kind: ScheduleKind,
    /// Decay shape after the stable phase (wsd only; default linear).
    decay: Option<DecayName>,
}

#[derive(JsonSchema, Serialize)]
#[serde(untagged)]
enum Schedule {
    Kind(ScheduleKind),
    Table(ScheduleTable),
}

/// How to train.
#[derive(JsonSchema, Serialize)]
#[serde(deny_unknown_fields)]
struct TrainFile {
    /// ArchScale `train_name`, kept verbatim in the run name. Its flags must agree with the
    /// settings. `{key.path}` inserts a value, e.g. "scaling_mup_lr{base.lr}".
    name: Option<String>,
    /// Token budget: a number, or "chinchilla" (default).
    tokens: Option<Tokens>,
    /// Sequence length (ArchScale `ctx_len`, default 4096; varlen at 4096 trains at 8192).
    seq_len: Option<u32>,
    /// Sequences per GPU per micro-step (default: ArchScale's rule, 2 at 4096 else 1).
    micro_batch: Option<u32>,
    /// `adamw` (default), or the μP hybrids `muon` / `nadam` (AdamW for vectors).
    optimizer: Option<OptimizerName>,
    /// LR decay after linear warmup: "linear" (default), "cosine", or "wsd" / { kind, decay }.
    schedule: Option<Schedule>,
    /// Label smoothing (ArchScale `_ls_` is 0.1).
    label_smoothing: Option<f64>,
    /// Document-separated attention and SSM state at EOS (ArchScale `_varlen`).
    varlen: Option<bool>,
    /// RoPE base override (ArchScale `_rbase_` is 640000).
    rope_base: Option<f64>,
    /// Sliding-window override for the family's local attention layers (ArchScale `--swa_len`).
    swa_len: Option<u32>,
    /// Init and data-order seed (default 3407).
    seed: Option<u64>,
    /// Validate every N optimizer steps (default 1000).
    eval_interval: Option<u32>,
    /// Checkpoint every N optimizer steps (default 1000).
    save_interval: Option<u32>,
    /// Log every N optimizer steps (default 10).
    log_interval: Option<u32>,
    /// Directory that holds run directories (default "runs").
    out_dir: Option<String>,
}

#[derive(JsonSchema, Serialize)]
#[serde(deny_unknown_fields)]
struct SyntheticFile {
    /// Generator seed (default 0).
    seed: Option<u64>,
    /// Tokens to generate.
    tokens: f64,
    /// Which corpus (default "ids").
    corpus: Option<SyntheticCorpus>,
}

#[derive(JsonSchema, Serialize)]
#[serde(rename_all = "snake_case")]
enum SyntheticCorpus {
    /// Token ids, vocabulary 512 (BOS 1, EOS 2).
    Ids,
    /// English-like text with phonebook and key-value records, byte tokens (id = byte + 3).
    Text,
}

/// `{ dir, prefix, weight }` packed shards `dir/prefix*.bin`, or `{ synthetic = {...}, weight }`.
#[derive(JsonSchema, Serialize)]
#[serde(deny_unknown_fields)]
struct SourceFile {
    /// Directory of LITPKDS `.bin` shards.
    dir: Option<String>,
    /// Shard file prefix (default "train" / "validation").
    prefix: Option<String>,
    /// Mixture weight (default 1.0).
    weight: Option<f64>,
    /// The built-in deterministic corpus instead of files.
    synthetic: Option<SyntheticFile>,
}

#[derive(JsonSchema, Serialize)]
#[serde(deny_unknown_fields)]
struct DataFile {
    /// Training sources (default: data/redpajama_sample, prefix "train").
    train: Option<Vec<SourceFile>>,
    /// Validation sources (default: none).
    val: Option<Vec<SourceFile>>,
}

#[derive(JsonSchema, Serialize)]
#[serde(rename_all = "snake_case")]
enum ShardingName {
    DataParallel,
    Zero1,
    Zero3,
    HybridShard,
}

#[derive(JsonSchema, Serialize)]
#[serde(deny_unknown_fields)]
struct ClusterFile {
    /// Nodes (default 1).
    nodes: Option<u32>,
    /// GPUs per node (default 1).
    gpus_per_node: Option<u32>,
    /// Memory of one GPU in GiB, for the fits/does-not-fit estimate (default 80).
    gpu_memory_gib: Option<f64>,
    /// Parallel layout; default: the compiler picks and shows one.
    sharding: Option<ShardingName>,
}

// ---------------------------------------------------------------------------------------

/// A model family as a function of depth.
#[derive(JsonSchema, Serialize)]
#[serde(deny_unknown_fields)]
#[schemars(title = "archscale architecture")]
pub struct ArchFile {
    /// Family name (ArchScale `train_model`); the model is named `<name>_d<depth>`.
    name: String,
    description: Option<String>,
    /// The only depths the family exists at (others are rejected); omit for any depth.
    depths: Option<Vec<u32>>,
    width: Width,
    /// Attention heads: integer or expression.
    heads: IntOrExpr,
    /// KV groups (GQA); default = heads.
    kv_groups: Option<IntOrExpr>,
    /// Head size; default n_embd / heads.
    head_dim: Option<IntOrExpr>,
    mlp: Option<Mlp>,
    vocab_size: u32,
    /// Vocabulary padded up to a multiple of this (default 64).
    padding_multiple: Option<u32>,
    norm: Option<Norm>,
    position: Position,
    /// Tie input and output embeddings (default false).
    tied_embeddings: Option<bool>,
    bias: Option<Bias>,
    /// Window of `"local"` attention layers (absent: full unless the run sets swa_len).
    local_window: Option<IntOrExpr>,
    mamba: Option<Mamba>,
    token_rule: TokenRule,
    /// Conditions every depth must meet.
    require: Option<Vec<Require>>,
    /// Layer sections; together they cover 0 .. depth exactly.
    section: Vec<Section>,
}

/// `aspect_ratio` (n_embd = ar * depth) or an explicit `n_embd`.
#[derive(JsonSchema, Serialize)]
#[serde(deny_unknown_fields)]
struct Width {
    aspect_ratio: Option<u32>,
    n_embd: Option<IntOrExpr>,
}

#[derive(JsonSchema, Serialize)]
#[serde(rename_all = "snake_case")]
enum MlpKind {
    Swiglu,
}

#[derive(JsonSchema, Serialize)]
#[serde(deny_unknown_fields)]
struct Mlp {
    kind: Option<MlpKind>,
    /// intermediate size = expand * n_embd (default 4).
    expand: Option<u32>,
}

#[derive(JsonSchema, Serialize)]
#[serde(rename_all = "snake_case")]
enum NormKind {
    Rmsnorm,
    Layernorm,
}

#[derive(JsonSchema, Serialize)]
#[serde(deny_unknown_fields)]
struct Norm {
    kind: Option<NormKind>,
    /// Default 1e-5.
    eps: Option<f64>,
}

#[derive(JsonSchema, Serialize)]
#[serde(rename_all = "snake_case")]
enum PositionKind {
    Rope,
    None,
}

#[derive(JsonSchema, Serialize)]
#[serde(deny_unknown_fields)]
struct Position {
    kind: PositionKind,
    /// RoPE base (default 10000).
    base: Option<f64>,
}

#[derive(JsonSchema, Serialize)]
#[serde(deny_unknown_fields)]
struct Bias {
    /// Bias on MLP and GMU linears.
    mlp: Option<bool>,
    /// Bias on the fused QKV (or Q-only) projection.
    attn_qkv: Option<bool>,
    /// Bias on the attention output projection.
    attn_out: Option<bool>,
}

#[derive(JsonSchema, Serialize)]
#[serde(deny_unknown_fields)]
struct Mamba {
    /// Default 16.
    d_state: Option<u32>,
    /// Default 4.
    d_conv: Option<u32>,
    /// d_inner = expand * n_embd (default 2).
    expand: Option<u32>,
}

#[derive(JsonSchema, Serialize)]
#[serde(deny_unknown_fields)]
struct TokenRule {
    /// ArchScale's `mult`: n_target = mult * depth^3. Its int/float type matters.
    mult: IntOrExpr,
}

#[derive(JsonSchema, Serialize)]
#[serde(deny_unknown_fields)]
struct Require {
    /// Boolean expression, e.g. "depth % 4 == 0".
    check: String,
    /// Shown when the check fails.
    help: Option<String>,
}

#[derive(JsonSchema, Serialize)]
#[serde(untagged)]
enum Layers {
    Index(u32),
    /// "start .. end" (half-open) or a single index expression.
    Expr(String),
}

#[derive(JsonSchema, Serialize)]
#[serde(deny_unknown_fields)]
struct Section {
    comment: Option<String>,
    layers: Layers,
    /// Layer i of the section gets pattern[i % len(pattern)] (absolute index).
    pattern: Vec<LayerElement>,
}

#[derive(JsonSchema, Serialize)]
#[serde(rename_all = "snake_case")]
enum MixerName {
    Attention,
    CrossAttention,
    Mamba,
    Mamba2,
    #[serde(rename = "gated_deltanet")]
    GatedDeltaNet,
    Gmu,
}

#[derive(JsonSchema, Serialize)]
#[serde(untagged)]
enum LayerElement {
    /// A mixer with its defaults.
    Name(MixerName),
    Table(LayerTable),
}

#[derive(JsonSchema, Serialize)]
#[serde(deny_unknown_fields)]
struct LayerTable {
    mixer: MixerName,
    /// attention: "local" (default), "full", or a fixed window size.
    window: Option<IntOrExpr>,
    /// attention / cross_attention: differential attention.
    differential: Option<bool>,
    /// attention: name under which later cross-attention layers find this layer's K/V.
    export_kv: Option<String>,
    /// attention / mamba / mamba2 / gated_deltanet: export this layer's output as GMU memory.
    export_memory: Option<String>,
    /// cross_attention: the K/V export to read (default "kv").
    kv: Option<String>,
    /// gmu: the memory export to read (default "memory").
    memory: Option<String>,
    /// Export this layer's MLP up-projection as GMU memory.
    mlp_export_memory: Option<String>,
}

/// Which schema.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Experiment,
    Arch,
}

/// The JSON Schema, pretty-printed with a trailing newline (the committed files' format).
pub fn schema_json(kind: Kind) -> String {
    let schema = match kind {
        Kind::Experiment => schemars::schema_for!(ExperimentFile),
        Kind::Arch => schemars::schema_for!(ArchFile),
    };
    let mut s = serde_json::to_string_pretty(&schema).unwrap_or_default();
    s.push('\n');
    s
}
