//! What the compiler needs to build one run's Plan, after the spec is parsed, validated,
//! swept and expanded at one depth. `expand` builds these from spec types; everything
//! downstream (hyperparameters, parameters, estimates) reads only these.

use crate::plan::{
    DataSource, DecayShape, LayerPlan, MambaDims, MlpKind, NormKind, Parametrization, Sharding,
};
use serde::{Deserialize, Serialize};

/// An architecture family evaluated at one depth (ArchScale `Config` before run overrides).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ArchAtDepth {
    pub family: String,
    pub depth: usize,
    /// Aspect ratio when width is `ar * depth` (enters the token rule).
    pub aspect_ratio: Option<usize>,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_query_groups: usize,
    pub head_size: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    pub padding_multiple: usize,
    pub norm: NormKind,
    pub norm_eps: f64,
    pub mlp: MlpKind,
    /// The family's own default (phi4miniflash is tied); the run may also tie.
    pub tied_embeddings: bool,
    pub bias: bool,
    pub attn_bias: bool,
    pub attn_out_bias: bool,
    /// `None`: NoPE.
    pub rope_base: Option<f64>,
    /// Layers with windows already resolved (including a run's sliding-window override).
    pub layers: Vec<LayerPlan>,
    pub mamba: Option<MambaDims>,
    /// ArchScale's `mult` for the token rule: `n_target = mult * depth^3`.
    pub token_mult: TokenMult,
}

/// ArchScale computes `mult` as an int for some families and a float for others;
/// the int path makes the token rule exact integer arithmetic.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
pub struct TokenMult {
    pub value: f64,
    pub is_int: bool,
}

/// ArchScale `BaseHyperparameters` (hp-spec §2): tuned at the base depth, transferred by the rule.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct BaseHyperparameters {
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
    /// `n0_mult` is a Python float. ArchScale's default is the int 237568, but any
    /// `--base_hps.*` flag makes jsonargparse rebuild the dataclass with float-annotated
    /// fields as floats (hp-spec §1.1). A float `n0` turns the token rule's exact
    /// `int / int` into a float division, which can move `train_tokens` by one.
    #[serde(default)]
    pub n0_mult_is_float: bool,
}

impl Default for BaseHyperparameters {
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

impl BaseHyperparameters {
    /// `n0 = n0_mult * d0^3`: the base model's token-rule parameter count.
    pub fn n0(&self) -> f64 {
        self.n0_mult * (self.d0 as f64).powi(3)
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerChoice {
    /// One AdamW (two groups under μP).
    Adamw,
    /// AdamW for vectors, Muon for weight matrices (needs μP).
    Muon,
    /// AdamW for vectors, NAdam for weight matrices (ArchScale `hadam`, needs μP).
    Nadam,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Cluster {
    pub nodes: usize,
    pub gpus_per_node: usize,
    pub gpu_memory_gib: f64,
}

/// Everything about one run besides the architecture.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct RunInputs {
    pub arch: ArchAtDepth,
    /// ArchScale `train_name` if the spec gives one (import-archscale keeps it verbatim);
    /// otherwise the compiler derives it from the settings.
    pub train_name: Option<String>,
    pub base: BaseHyperparameters,
    pub parametrization: Parametrization,
    pub tied_embeddings: bool,
    /// Explicit token budget; `None` applies the Chinchilla rule relative to the base depth.
    pub max_tokens: Option<f64>,
    /// ArchScale `ctx_len`; `None` means 4096.
    pub ctx_len: Option<usize>,
    /// `None` applies ArchScale's hard-coded rule (hp-spec §4.1).
    pub micro_batch: Option<usize>,
    pub optimizer: OptimizerChoice,
    pub decay: DecayShape,
    pub wsd: bool,
    pub label_smoothing: f64,
    pub varlen: bool,
    /// RoPE base override (ArchScale `_rbase_` gives 640000).
    pub rope_base: Option<f64>,
    /// Sliding-window override (ArchScale `--swa_len`); already applied to `arch.layers`,
    /// kept here for the run name.
    pub swa_len: Option<usize>,
    pub cluster: Cluster,
    /// `None`: the compiler picks (and shows) a layout.
    pub sharding: Option<Sharding>,
    pub seed: u64,
    pub out_dir: String,
    pub eval_interval: u64,
    pub save_interval: u64,
    pub log_interval: u64,
    pub train_data: Vec<DataSource>,
    pub val_data: Vec<DataSource>,
}
