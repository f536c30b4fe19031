//! The execution plan: everything `archscale run` will do, as data (stable JSON).
//!
//! This is the contract between the compiler and the runtime. The runtime reads nothing
//! from the spec files: a Plan alone determines the model, its init, the optimizer, the
//! schedule, the data order and the parallel layout.

use serde::{Deserialize, Serialize};

/// One run, fully resolved.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Plan {
    /// Run directory name, derived the way ArchScale names runs
    /// (`<train_name>_<model>_ctx<T>[_swa<W>]`).
    pub run_name: String,
    pub model: ModelConfig,
    /// One entry per block, in order.
    pub layers: Vec<LayerPlan>,
    /// Every trainable tensor, in ArchScale state-dict order.
    pub params: Vec<ParamSpec>,
    pub optimizer: OptimizerPlan,
    pub schedule: Schedule,
    pub training: TrainingPlan,
    pub layout: ParallelLayout,
    pub data: DataPlan,
    pub estimates: Estimates,
    /// Exactly the keys and meaning of ArchScale's setup summary
    /// (../shared/reference/archscale-hps.json `summary`).
    pub archscale_summary: serde_json::Value,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parametrization {
    /// Standard parametrization (ArchScale `scaling`).
    #[serde(rename = "sp")]
    Sp,
    /// Original μP, width only (ArchScale `_ori_mup`).
    #[serde(rename = "mup")]
    Mup,
    /// μP++: μP plus depth scaling (ArchScale `mup`).
    #[serde(rename = "mup++")]
    MupPlusPlus,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum NormKind {
    RmsNorm,
    LayerNorm,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum MlpKind {
    /// `w1: n -> 2I` (first half gate, second half up), `silu(g)*u`, `w3: I -> n`.
    Swiglu,
}

/// The resolved model (ArchScale `Config` after overrides and `__post_init__`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ModelConfig {
    /// ArchScale config name, e.g. `transformer_d8`.
    pub name: String,
    pub family: String,
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_query_groups: usize,
    pub head_size: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    pub padded_vocab_size: usize,
    pub norm: NormKind,
    pub norm_eps: f64,
    pub mlp: MlpKind,
    pub tied_embeddings: bool,
    /// Bias on MLP and GMU linears.
    pub bias: bool,
    /// Bias on the fused QKV (or Q-only) projection.
    pub attn_bias: bool,
    /// Bias on the attention output projection.
    pub attn_out_bias: bool,
    /// RoPE base; `None` means NoPE (every YOCO family).
    pub rope_base: Option<f64>,
    /// Training sequence length T.
    pub block_size: usize,
    pub parametrization: Parametrization,
    /// Multiplies the final-normed hidden state before the head (d0/L under μP, else 1).
    pub logit_scale: f64,
    /// Multiplies every mixer and MLP branch before the residual add (1/sqrt(2L) under μP++).
    pub residual_scale: f64,
    /// Softmax scale of every attention layer.
    pub attn_scale: f64,
    /// Document-separated attention and SSM state from `eos_token_id`.
    pub varlen: bool,
    pub eos_token_id: u32,
    /// Present when any layer is a Mamba-1 layer.
    pub mamba: Option<MambaDims>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct MambaDims {
    pub d_inner: usize,
    pub d_state: usize,
    pub d_conv: usize,
    pub dt_rank: usize,
}

/// One block: `x += rs * mixer(norm_1(x)); x += rs * mlp(norm_2(x))`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct LayerPlan {
    pub index: usize,
    pub mixer: Mixer,
    /// `gmu_mlp` families: this layer's MLP up-half is the GMU memory.
    #[serde(default)]
    pub mlp_exports_memory: bool,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Mixer {
    Attention(AttentionPlan),
    Mamba(MambaPlan),
    /// Plan-only: `run` rejects it by name.
    Mamba2 {
        export_memory: bool,
    },
    /// Plan-only: `run` rejects it by name.
    GatedDeltaNet {
        export_memory: bool,
    },
    Gmu(GmuPlan),
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct AttentionPlan {
    /// Sliding window W: query t sees keys `[t-W+1, t]`. `None` is full causal.
    pub window: Option<usize>,
    pub rope: bool,
    /// `None`: own fused QKV projection. `Some(l)`: YOCO cross-attention, Q-only
    /// projection, K/V taken from layer `l`.
    pub kv_from: Option<usize>,
    /// This layer's K/V are reused by later cross-attention layers.
    pub exports_kv: bool,
    /// `gmu_attn`: this layer's pre-`proj` output is the GMU memory.
    pub exports_memory: bool,
    pub differential: Option<DiffAttnPlan>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
pub struct DiffAttnPlan {
    /// `0.8 - 0.6 * exp(-0.3 * layer_index)`.
    pub lambda_init: f64,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct MambaPlan {
    /// This layer's pre-gate scan output `y` is the GMU memory.
    pub export_memory: bool,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct GmuPlan {
    /// Layer whose exported memory this GMU reads.
    pub memory_from: usize,
    pub d_mem: usize,
    /// mamba2 / gdn memory: gated RMSNorm instead of the plain gate.
    pub gated_norm: bool,
}

/// How a tensor is initialised. Values already include `w_init0` and any
/// output-projection rescale, so the runtime applies them verbatim.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(tag = "dist", rename_all = "snake_case")]
pub enum InitRule {
    Normal {
        std: f64,
    },
    Uniform {
        bound: f64,
    },
    Zeros,
    Ones,
    /// Mamba `A_log[c, k] = ln(k + 1)`.
    MambaALog,
    /// Mamba `dt_proj.bias = softplus⁻¹(dt)`, `dt = exp(U(ln dt_min, ln dt_max))` clamped below at `dt_floor`.
    MambaDtBias {
        dt_min: f64,
        dt_max: f64,
        dt_floor: f64,
    },
    /// `ln(U(low, high))` per element: Mamba-2 `A_log` (1, 16) and Gated DeltaNet `A_log` (0, 16).
    LogUniform {
        low: f64,
        high: f64,
    },
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ParamSpec {
    /// ArchScale state-dict name (arch-spec §1.14).
    pub name: String,
    /// Other state-dict names of the same tensor (tied `transformer.wte.weight`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<String>,
    pub shape: Vec<usize>,
    pub init: InitRule,
    /// Index into `OptimizerPlan::groups`.
    pub group: usize,
    /// Block index, `None` for embedding, final norm and head.
    pub layer: Option<usize>,
}

impl ParamSpec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerKind {
    AdamW,
    NAdam,
    Muon,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ParamGroup {
    /// `all`, `vectors` or `weights`.
    pub name: String,
    pub optimizer: OptimizerKind,
    /// `None`: plain optimizer without a multiplier (standard parametrization).
    pub lr_mult: Option<f64>,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Muon momentum (Muon groups only).
    pub muon_beta: Option<f64>,
    /// Peak LR the schedule is applied to, before `lr_mult`
    /// (`learning_rate`, or `learning_rate * weight_lr_scale` for a second optimizer).
    pub peak_lr: f64,
}

impl ParamGroup {
    /// LR of this group at micro-iteration `it`.
    pub fn lr_at(&self, schedule: &Schedule, it: u64) -> f64 {
        schedule.lr_at(it, self.peak_lr) * self.lr_mult.unwrap_or(1.0)
    }

    /// LR of this group at the schedule's peak (`lr_mult` applied).
    pub fn peak_group_lr(&self) -> f64 {
        self.peak_lr * self.lr_mult.unwrap_or(1.0)
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct OptimizerPlan {
    pub groups: Vec<ParamGroup>,
    /// Global L2 gradient-norm clip before each optimizer step.
    pub grad_clip: f64,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DecayShape {
    Linear,
    Cosine,
}

/// ArchScale's `get_lr`, counted in per-device micro-iterations (hp-spec §9).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Schedule {
    pub decay: DecayShape,
    /// Warmup-stable-decay: constant for `floor(5/7 * (max_iters - warmup_iters))` iterations.
    pub wsd: bool,
    pub warmup_iters: u64,
    pub max_iters: u64,
    /// Absolute final LR (not a ratio), applied before `lr_mult`.
    pub min_lr: f64,
}

impl Schedule {
    /// LR at micro-iteration `it` for a group whose peak is `lr`. The LR of optimizer
    /// step `s` (1-based) is the value at `it = s * gas - 1`.
    pub fn lr_at(&self, it: u64, lr: f64) -> f64 {
        let (it_f, warm, max) = (it as f64, self.warmup_iters as f64, self.max_iters as f64);
        if it < self.warmup_iters {
            return (lr * it_f) / warm;
        }
        if it > self.max_iters {
            return self.min_lr;
        }
        let ratio = if self.wsd {
            let stable = ((5.0 / 7.0) * (max - warm)).trunc();
            if it_f < warm + stable {
                return lr;
            }
            (it_f - warm - stable) / (max - warm - stable)
        } else {
            (it_f - warm) / (max - warm)
        };
        match self.decay {
            DecayShape::Cosine => {
                self.min_lr
                    + 0.5 * (1.0 + (std::f64::consts::PI * ratio).cos()) * (lr - self.min_lr)
            }
            DecayShape::Linear => lr + ratio * (self.min_lr - lr),
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct TrainingPlan {
    /// Model init and data order seed (ArchScale: 3407).
    pub seed: u64,
    /// Training tokens across the cluster.
    pub train_tokens: f64,
    /// Per-device micro-iterations; training stops when `iter_num >= max_iters`.
    pub max_iters: u64,
    /// Optimizer steps (`max_iters / gas`).
    pub max_steps: u64,
    pub label_smoothing: f64,
    /// Validate every N optimizer steps (and at step 0 and the last step).
    pub eval_interval: u64,
    /// Checkpoint every N optimizer steps.
    pub save_interval: u64,
    /// Log every N optimizer steps.
    pub log_interval: u64,
    /// Validation batches per rank.
    pub eval_iters: u64,
    /// Validation at 1x..num_extrapol x the training context.
    pub num_extrapol: usize,
    /// Directory under which the run directory is created.
    pub out_dir: String,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Sharding {
    /// Plain data parallel: every rank holds everything.
    DataParallel,
    /// Optimizer state sharded across ranks (llm.c / ZeRO-1).
    Zero1,
    /// Parameters, gradients and optimizer state sharded (FSDP full shard).
    Zero3,
    /// ZeRO-3 within a node, replicated across nodes (ArchScale's HYBRID_SHARD).
    HybridShard,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ParallelLayout {
    pub nodes: usize,
    pub gpus_per_node: usize,
    pub world: usize,
    /// Sequences per device per micro-iteration.
    pub micro_batch: usize,
    pub seq_len: usize,
    pub gas: usize,
    /// Tokens per optimizer step across the cluster (`gas * micro * T * world`).
    pub batch_tokens: u64,
    pub sharding: Sharding,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DataSource {
    /// `dir/{prefix}*.bin` LITPKDS files.
    Packed {
        dir: String,
        prefix: String,
        weight: f64,
    },
    /// The built-in deterministic corpus, generated once into `<data root>/.archscale/synthetic/`.
    Synthetic { seed: u64, tokens: u64, weight: f64 },
    /// The built-in deterministic text corpus (byte tokens), generated like `Synthetic`.
    SyntheticText { seed: u64, tokens: u64, weight: f64 },
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct DataPlan {
    pub train: Vec<DataSource>,
    pub val: Vec<DataSource>,
    /// Training block = T + 1 tokens.
    pub block_size: usize,
    /// Validation block = num_extrapol * T + 1 tokens.
    pub val_block_size: usize,
    /// Validation sequences per batch (ceil(micro / 2)).
    pub val_micro_batch: usize,
    /// Files loaded at a time by the training iterator.
    pub n_chunks: usize,
    /// Base seed of the block shuffle (rank r uses `seed + r`).
    pub seed: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct MemoryEstimate {
    /// fp32 master parameters (this rank's share).
    pub params_bytes: u64,
    pub grads_bytes: u64,
    pub optimizer_bytes: u64,
    /// What a GPU computes with besides its share: the bf16 copy of every parameter, or
    /// under ZeRO-3 / hybrid shard the gather slots (fp32 and bf16 parameters and an fp32
    /// gradient of the largest unit, plus a slot of its own for a tied embedding's unit).
    #[serde(default)]
    pub working_bytes: u64,
    pub activations_bytes: u64,
    pub total_bytes: u64,
    pub gpu_bytes: u64,
    pub fits: bool,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Estimates {
    /// Parameters counted once (tied head once), as ArchScale's `num_parameters`.
    pub params_total: u64,
    pub params_non_embedding: u64,
    /// ArchScale / PaLM basis: `6N + 12 L n T` per token, N = all parameters.
    pub flops_per_token_archscale: f64,
    /// Matmul FLOPs actually executed per token, causal- and window-aware, training (x3).
    pub flops_per_token_exact: f64,
    /// Per-GPU memory under the plan's layout.
    pub memory: MemoryEstimate,
}
