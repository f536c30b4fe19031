//! `RunInputs -> Plan`: one run, every field resolved.

use crate::estimates;
use crate::hparams::{self, SetupError, SetupValues};
use crate::inputs::{OptimizerChoice, RunInputs};
use crate::params;
use crate::plan::*;
use crate::pynum::PyNum;
use crate::train_name::{self, EffectiveOptimizer, NameSettings, TrainNameFlags};
use serde_json::{json, Value};

/// Dotted spec keys a compile error can point at (rendered with the span of that key).
pub mod keys {
    pub const DEPTH: &str = "depth";
    pub const TRAIN_NAME: &str = "train.name";
    pub const PARAMETRIZATION: &str = "parametrization";
    pub const TIED: &str = "tied_embeddings";
    pub const OPTIMIZER: &str = "train.optimizer";
    pub const SCHEDULE: &str = "train.schedule";
    pub const MICRO_BATCH: &str = "train.micro_batch";
    pub const SEQ_LEN: &str = "train.seq_len";
    pub const TOKENS: &str = "train.tokens";
    pub const VARLEN: &str = "train.varlen";
    pub const LABEL_SMOOTHING: &str = "train.label_smoothing";
    pub const ROPE_BASE: &str = "train.rope_base";
    pub const BATCH_TOKENS: &str = "base.batch_tokens";
    pub const WEIGHT_DECAY: &str = "base.weight_decay";
    pub const NODES: &str = "cluster.nodes";
    pub const ARCH: &str = "arch";
}

/// A run that cannot be compiled. `key` is the dotted spec key it concerns.
#[derive(Debug, Clone, PartialEq)]
pub struct CompileError {
    pub key: String,
    pub message: String,
    pub help: Option<String>,
}

impl CompileError {
    fn new(key: &str, message: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            message: message.into(),
            help: None,
        }
    }
    fn help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }
}

impl std::fmt::Display for CompileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (at `{}`)", self.message, self.key)
    }
}

impl std::error::Error for CompileError {}

impl miette::Diagnostic for CompileError {
    fn code<'a>(&'a self) -> Option<Box<dyn std::fmt::Display + 'a>> {
        Some(Box::new("archscale::compile"))
    }
    fn help<'a>(&'a self) -> Option<Box<dyn std::fmt::Display + 'a>> {
        self.help
            .as_ref()
            .map(|h| Box::new(h) as Box<dyn std::fmt::Display>)
    }
}

fn setup_error(e: SetupError) -> CompileError {
    let key = match &e {
        SetupError::BatchTooSmall { .. } => keys::BATCH_TOKENS,
        SetupError::VarlenMicroBatch { .. } => keys::MICRO_BATCH,
        SetupError::ZeroSize { what } if what.starts_with("cluster") => keys::NODES,
        SetupError::ZeroSize {
            what: "micro_batch",
        } => keys::MICRO_BATCH,
        SetupError::ZeroSize { what: "seq_len" } => keys::SEQ_LEN,
        SetupError::ZeroSize { what: "depth" } => keys::DEPTH,
        SetupError::ZeroSize { .. } => keys::BATCH_TOKENS,
        SetupError::Arithmetic { .. } => keys::TOKENS,
    };
    let err = CompileError::new(key, e.to_string());
    match e {
        SetupError::BatchTooSmall { multiple, .. } => err.help(format!(
            "raise base.batch_tokens to at least {multiple}, or use fewer GPUs or a shorter sequence"
        )),
        _ => err,
    }
}

fn effective_optimizer(inputs: &RunInputs) -> EffectiveOptimizer {
    match inputs.optimizer {
        OptimizerChoice::Adamw => EffectiveOptimizer::AdamW,
        OptimizerChoice::Nadam => EffectiveOptimizer::AdamWNAdam,
        OptimizerChoice::Muon => EffectiveOptimizer::AdamWMuon,
    }
}

fn rope_base_of(inputs: &RunInputs) -> f64 {
    inputs.rope_base.unwrap_or(train_name::DEFAULT_ROPE_BASE)
}

/// A given train_name must say what the run does (WYSIWYG): ArchScale would decode it.
fn check_train_name(name: &str, inputs: &RunInputs, tied: bool) -> Result<(), CompileError> {
    let f = TrainNameFlags::decode(name);
    let mismatch = |key: &str, what: String| {
        Err(
            CompileError::new(key, format!("train name `{name}` disagrees with the spec: {what}"))
                .help("fix the setting, or drop train.name and let archscale derive the name from the settings"),
        )
    };
    if f.validation {
        return Err(CompileError::new(
            keys::TRAIN_NAME,
            format!("train name `{name}` contains `validation`: ArchScale would run one validation pass and stop"),
        )
        .help("plan describes training runs; remove `validation` from the name"));
    }
    if f.parametrization() != inputs.parametrization {
        return mismatch(
            keys::PARAMETRIZATION,
            format!(
                "the name means {:?}, the spec says {:?}",
                f.parametrization(),
                inputs.parametrization
            ),
        );
    }
    // `_tie` can only tie; a family tied in its table stays tied (hp-spec §4.7).
    if (inputs.arch.tied_embeddings || f.tie) != tied {
        return mismatch(
            keys::TIED,
            format!(
                "`_tie` in the name is {}, tied embeddings are {}",
                f.tie, tied
            ),
        );
    }
    let want_rope = if f.rbase {
        train_name::RBASE_ROPE_BASE
    } else {
        train_name::DEFAULT_ROPE_BASE
    };
    if rope_base_of(inputs) != want_rope {
        return mismatch(
            keys::ROPE_BASE,
            format!(
                "the name means RoPE base {want_rope}, the spec says {}",
                rope_base_of(inputs)
            ),
        );
    }
    if f.varlen != inputs.varlen {
        return mismatch(
            keys::VARLEN,
            format!(
                "`_varlen` in the name is {}, varlen is {}",
                f.varlen, inputs.varlen
            ),
        );
    }
    let want_ls = if f.label_smoothing {
        train_name::LS_LABEL_SMOOTHING
    } else {
        0.0
    };
    if inputs.label_smoothing != want_ls {
        return mismatch(
            keys::LABEL_SMOOTHING,
            format!(
                "the name means label smoothing {want_ls}, the spec says {}",
                inputs.label_smoothing
            ),
        );
    }
    if f.optimizer() != effective_optimizer(inputs) {
        return mismatch(
            keys::OPTIMIZER,
            format!(
                "the name means {:?}, the spec says {:?}",
                f.optimizer(),
                effective_optimizer(inputs)
            ),
        );
    }
    if f.decay() != inputs.decay || f.wsd != inputs.wsd {
        return mismatch(
            keys::SCHEDULE,
            format!(
                "the name means {:?} decay (wsd {}), the spec says {:?} (wsd {})",
                f.decay(),
                f.wsd,
                inputs.decay,
                inputs.wsd
            ),
        );
    }
    Ok(())
}

fn model_config(
    inputs: &RunInputs,
    sv: &SetupValues,
    tied: bool,
) -> Result<ModelConfig, CompileError> {
    let a = &inputs.arch;
    if a.padding_multiple == 0 {
        return Err(CompileError::new(
            keys::ARCH,
            "padding_multiple must be positive",
        ));
    }
    if a.head_size == 0 || a.n_head == 0 || a.n_query_groups == 0 {
        return Err(CompileError::new(
            keys::ARCH,
            "heads, KV groups and head size must be positive",
        ));
    }
    let mup = inputs.parametrization != Parametrization::Sp;
    let d0 = inputs.base.d0 as i128;
    let depth = a.depth as i128;
    let logit_scale = if mup {
        crate::pynum::int_truediv(d0, depth)
    } else {
        1.0
    };
    let residual_scale = if inputs.parametrization == Parametrization::MupPlusPlus {
        1.0 / (2.0 * a.depth as f64).sqrt()
    } else {
        1.0
    };
    // attention.py: scale = 1/sqrt(hs); under μP scale *= sqrt(hd0)/sqrt(hs).
    let mut attn_scale = 1.0 / (a.head_size as f64).sqrt();
    if mup {
        attn_scale *= (inputs.base.hd0 as f64).sqrt() / (a.head_size as f64).sqrt();
    }
    Ok(ModelConfig {
        name: format!("{}_d{}", a.family, a.depth),
        family: a.family.clone(),
        n_layer: a.depth,
        n_embd: a.n_embd,
        n_head: a.n_head,
        n_query_groups: a.n_query_groups,
        head_size: a.head_size,
        intermediate_size: a.intermediate_size,
        vocab_size: a.vocab_size,
        padded_vocab_size: a.vocab_size.div_ceil(a.padding_multiple) * a.padding_multiple,
        norm: a.norm,
        norm_eps: a.norm_eps,
        mlp: a.mlp,
        tied_embeddings: tied,
        bias: a.bias,
        attn_bias: a.attn_bias,
        attn_out_bias: a.attn_out_bias,
        rope_base: a.rope_base.map(|b| inputs.rope_base.unwrap_or(b)),
        block_size: sv.seq_len,
        parametrization: inputs.parametrization,
        logit_scale,
        residual_scale,
        attn_scale,
        varlen: inputs.varlen,
        eos_token_id: 2,
        mamba: a.mamba,
    })
}

fn optimizer_plan(inputs: &RunInputs, lr: f64, opt: EffectiveOptimizer) -> OptimizerPlan {
    let b = &inputs.base;
    let wd = b.weight_decay0;
    let groups = match inputs.parametrization {
        // One AdamW over everything: wd on everything, PyTorch's default eps (eps0 ignored).
        Parametrization::Sp => vec![ParamGroup {
            name: "all".into(),
            optimizer: OptimizerKind::AdamW,
            lr_mult: None,
            weight_decay: wd,
            beta1: b.beta1_0,
            beta2: b.beta2_0,
            eps: 1e-8,
            muon_beta: None,
            peak_lr: lr,
        }],
        p => {
            let vector_wd = if p == Parametrization::Mup { wd } else { 0.0 };
            let lr_mult = crate::pynum::int_truediv(b.d0 as i128, inputs.arch.depth as i128);
            let weight_lr = lr * b.weight_lr_scale_0;
            match opt {
                EffectiveOptimizer::AdamW => vec![
                    group(
                        "vectors",
                        OptimizerKind::AdamW,
                        1.0,
                        vector_wd,
                        (b.beta1_0, b.beta2_0),
                        b.eps0,
                        None,
                        lr,
                    ),
                    group(
                        "weights",
                        OptimizerKind::AdamW,
                        lr_mult,
                        wd,
                        (b.beta1_0, b.beta2_0),
                        b.eps0,
                        None,
                        lr,
                    ),
                ],
                // Betas and eps hard-coded in pretrain.py:409-417.
                EffectiveOptimizer::AdamWNAdam => vec![
                    group(
                        "vectors",
                        OptimizerKind::AdamW,
                        1.0,
                        vector_wd,
                        (0.8, 0.95),
                        1e-10,
                        None,
                        lr,
                    ),
                    group(
                        "weights",
                        OptimizerKind::NAdam,
                        lr_mult,
                        wd,
                        (0.9, 0.95),
                        1e-10,
                        None,
                        weight_lr,
                    ),
                ],
                // Muon keeps only momentum: its betas are unused (beta1 = momentum, beta2 = 0)
                // and eps is Newton-Schulz's Frobenius-norm guard.
                EffectiveOptimizer::AdamWMuon => vec![
                    group(
                        "vectors",
                        OptimizerKind::AdamW,
                        1.0,
                        vector_wd,
                        (0.9, 0.95),
                        1e-8,
                        None,
                        lr,
                    ),
                    group(
                        "weights",
                        OptimizerKind::Muon,
                        lr_mult,
                        wd,
                        (b.muon_beta_0, 0.0),
                        1e-7,
                        Some(b.muon_beta_0),
                        weight_lr,
                    ),
                ],
            }
        }
    };
    OptimizerPlan {
        groups,
        grad_clip: 1.0,
    }
}

#[allow(clippy::too_many_arguments)]
fn group(
    name: &str,
    optimizer: OptimizerKind,
    lr_mult: f64,
    weight_decay: f64,
    betas: (f64, f64),
    eps: f64,
    muon_beta: Option<f64>,
    peak_lr: f64,
) -> ParamGroup {
    ParamGroup {
        name: name.into(),
        optimizer,
        lr_mult: Some(lr_mult),
        weight_decay,
        beta1: betas.0,
        beta2: betas.1,
        eps,
        muon_beta,
        peak_lr,
    }
}

fn as_u64(what: &str, v: PyNum) -> Result<u64, CompileError> {
    v.to_i128()
        .and_then(|i| u64::try_from(i).ok())
        .ok_or_else(|| {
            CompileError::new(
                keys::TOKENS,
                format!("{what} = {v} is not a non-negative integer"),
            )
        })
}

fn py_json(x: f64) -> Value {
    PyNum::Float(x).to_json()
}

/// A float that Python holds as an int when integral (`rope_base = 10000`).
fn int_if_integral(x: f64) -> Value {
    if x.fract() == 0.0 && x.abs() < 9e15 {
        json!(x as i64)
    } else {
        py_json(x)
    }
}

/// The `summary` object of archscale-hps.json: exactly its keys, Python int/float kinds.
fn archscale_summary(
    inputs: &RunInputs,
    train_name: &str,
    sv: &SetupValues,
    model: &ModelConfig,
    opt: &OptimizerPlan,
    opt_kind: EffectiveOptimizer,
    params_total: u64,
) -> Value {
    let groups: Vec<Value> = opt
        .groups
        .iter()
        .map(|g| json!([g.lr_mult.map(py_json), py_json(g.weight_decay)]))
        .collect();
    let optimizers = match (inputs.parametrization, opt_kind) {
        (Parametrization::Sp, _) | (_, EffectiveOptimizer::AdamW) => json!(["AdamW"]),
        (_, EffectiveOptimizer::AdamWNAdam) => json!(["AdamW", "NAdam"]),
        (_, EffectiveOptimizer::AdamWMuon) => json!(["AdamW", "Muon"]),
    };
    json!({
        "model": model.name,
        "train_name": train_name,
        "world": sv.world,
        "seq_len": sv.seq_len,
        "micro_bsz": sv.micro_batch,
        "gas": sv.gas,
        "batch_tokens": sv.batch_tokens,
        "train_tokens": sv.train_tokens.to_json(),
        "lr": py_json(sv.learning_rate),
        "min_lr": py_json(inputs.base.min_lr0),
        "warmup_tokens": inputs.base.warmup_tokens0,
        "warmup_iters": sv.warmup_iters.to_json(),
        "max_iters": sv.max_iters.to_json(),
        "max_steps": sv.max_steps.to_json(),
        "n_embd": model.n_embd,
        "n_head": model.n_head,
        "n_query_groups": model.n_query_groups,
        "head_size": model.head_size,
        "intermediate_size": model.intermediate_size,
        "vocab": model.padded_vocab_size,
        "rope_base": int_if_integral(rope_base_of(inputs)),
        "tied": model.tied_embeddings,
        "params": params_total,
        "logit_scale": py_json(model.logit_scale),
        "n_target": sv.n_target.to_json(),
        "groups(lr_mult,wd)": groups,
        "optimizers": optimizers,
    })
}

/// The resolved model and its parameter inventory (all in optimizer group 0), without
/// the run-level checks of `compile`: what ArchScale would instantiate.
pub fn model_and_params(
    inputs: &RunInputs,
    sv: &SetupValues,
) -> Result<(ModelConfig, Vec<ParamSpec>), CompileError> {
    let tied = inputs.arch.tied_embeddings || inputs.tied_embeddings;
    let model = model_config(inputs, sv, tied)?;
    let params = params::build_params(&model, &inputs.arch.layers, inputs.base.w_init0)
        .map_err(|m| CompileError::new(keys::ARCH, m))?;
    Ok((model, params))
}

/// Largest model dimension accepted (keeps every tensor size and count far inside u64).
const MAX_DIM: usize = 1 << 24;
/// Largest total parameter count accepted.
const MAX_PARAMS: u128 = 1 << 53;

/// Sizes beyond anything trainable are rejected before any arithmetic can overflow.
fn check_sizes(inputs: &RunInputs) -> Result<(), CompileError> {
    let a = &inputs.arch;
    let mut dims = vec![
        ("depth", a.depth),
        ("n_embd", a.n_embd),
        ("n_head", a.n_head),
        ("n_query_groups", a.n_query_groups),
        ("head_size", a.head_size),
        ("intermediate_size", a.intermediate_size),
        ("vocab_size", a.vocab_size),
        ("padding_multiple", a.padding_multiple),
    ];
    if let Some(m) = a.mamba {
        dims.extend([
            ("mamba d_inner", m.d_inner),
            ("mamba d_state", m.d_state),
            ("mamba d_conv", m.d_conv),
        ]);
        dims.push(("mamba dt_rank", m.dt_rank));
    }
    for l in &a.layers {
        if let Mixer::Gmu(g) = &l.mixer {
            dims.push(("GMU d_mem", g.d_mem));
        }
    }
    for (what, v) in dims {
        if v > MAX_DIM {
            let key = if what == "depth" {
                keys::DEPTH
            } else {
                keys::ARCH
            };
            return Err(CompileError::new(
                key,
                format!("{what} = {v} is larger than the supported {MAX_DIM}"),
            ));
        }
    }
    Ok(())
}

/// Compiles one run.
pub fn compile(inputs: &RunInputs) -> Result<Plan, CompileError> {
    check_sizes(inputs)?;
    let arch = &inputs.arch;
    if arch.layers.len() != arch.depth {
        return Err(CompileError::new(
            keys::DEPTH,
            format!(
                "architecture at depth {} has {} layers",
                arch.depth,
                arch.layers.len()
            ),
        ));
    }
    let has_da = arch
        .layers
        .iter()
        .any(|l| matches!(&l.mixer, Mixer::Attention(a) if a.differential.is_some()));
    if has_da && (!arch.n_query_groups.is_multiple_of(2) || !arch.n_head.is_multiple_of(2)) {
        return Err(CompileError::new(
            keys::DEPTH,
            format!(
                "differential attention splits heads and KV groups into pairs; {}_d{} has {} heads and {} KV groups",
                arch.family, arch.depth, arch.n_head, arch.n_query_groups
            ),
        )
        .help("choose a depth whose KV-group count is even (ArchScale builds this config but crashes in the forward pass)"));
    }
    if inputs.parametrization == Parametrization::Sp && inputs.optimizer != OptimizerChoice::Adamw {
        return Err(CompileError::new(
            keys::OPTIMIZER,
            format!(
                "optimizer {:?} needs μP parameter groups; under standard parametrization ArchScale uses one AdamW",
                inputs.optimizer
            ),
        )
        .help("use parametrization = \"mup++\" or \"mup\", or optimizer = \"adamw\""));
    }
    let opt_kind = effective_optimizer(inputs);
    if opt_kind == EffectiveOptimizer::AdamWMuon && inputs.base.weight_decay0 <= 0.0 {
        return Err(CompileError::new(
            keys::WEIGHT_DECAY,
            "Muon needs a positive weight decay (ArchScale asserts wd > 0)",
        ));
    }

    let sv = hparams::setup(inputs).map_err(setup_error)?;
    let tied = arch.tied_embeddings || inputs.tied_embeddings;

    let train_name = match &inputs.train_name {
        Some(name) => {
            check_train_name(name, inputs, tied)?;
            name.clone()
        }
        None => train_name::derive(&NameSettings {
            parametrization: inputs.parametrization,
            tie: tied && !arch.tied_embeddings,
            rope_base: inputs.rope_base,
            label_smoothing: inputs.label_smoothing,
            varlen: inputs.varlen,
            optimizer: opt_kind,
            decay: inputs.decay,
            wsd: inputs.wsd,
            fsdp2: false,
        }),
    };
    let (model, mut params) = model_and_params(inputs, &sv)?;
    let total: u128 = params
        .iter()
        .map(|p| p.shape.iter().map(|&d| d as u128).product::<u128>())
        .sum();
    if total > MAX_PARAMS {
        return Err(CompileError::new(
            keys::ARCH,
            format!("{total} parameters is more than the supported {MAX_PARAMS}"),
        ));
    }
    let mut run_name = format!("{train_name}_{}_ctx{}", model.name, sv.seq_len);
    if let Some(w) = inputs.swa_len {
        run_name.push_str(&format!("_swa{w}"));
    }

    let optimizer = optimizer_plan(inputs, sv.learning_rate, opt_kind);
    if inputs.parametrization != Parametrization::Sp {
        for p in &mut params {
            p.group = if params::is_vector(&p.name) { 0 } else { 1 };
        }
    }

    let max_iters = as_u64("max_iters", sv.max_iters)?;
    let max_steps = as_u64("max_steps", sv.max_steps)?;
    let warmup_iters = as_u64("warmup_iters", sv.warmup_iters)?;
    if max_steps == 0 {
        return Err(CompileError::new(
            keys::TOKENS,
            format!(
                "{} training tokens are less than one optimizer step of {} tokens",
                sv.train_tokens.to_f64(),
                sv.batch_tokens
            ),
        )
        .help(format!(
            "raise train.tokens to at least {} (one optimizer step)",
            sv.batch_tokens
        )));
    }
    let train_tokens = sv.train_tokens.to_f64();
    if !(train_tokens.is_finite() && train_tokens > 0.0) {
        return Err(CompileError::new(
            keys::TOKENS,
            "training tokens must be a positive number",
        ));
    }

    let schedule = Schedule {
        decay: inputs.decay,
        wsd: inputs.wsd,
        warmup_iters,
        max_iters,
        min_lr: inputs.base.min_lr0,
    };
    let training = TrainingPlan {
        seed: inputs.seed,
        train_tokens,
        max_iters,
        max_steps,
        label_smoothing: inputs.label_smoothing,
        eval_interval: inputs.eval_interval,
        save_interval: inputs.save_interval,
        log_interval: inputs.log_interval,
        eval_iters: sv.eval_iters,
        num_extrapol: sv.num_extrapol,
        out_dir: inputs.out_dir.clone(),
    };

    let params_total = params::count_total(&params);
    let activation_bytes = estimates::activation_bytes(
        &model,
        &arch.layers,
        sv.micro_batch,
        sv.seq_len,
        sv.num_extrapol * sv.seq_len,
    );
    let cl = &inputs.cluster;
    let sharding = inputs.sharding.unwrap_or_else(|| {
        estimates::choose_sharding(
            sv.world,
            cl.nodes,
            cl.gpus_per_node,
            &params,
            &optimizer,
            activation_bytes,
            cl.gpu_memory_gib,
        )
    });
    let memory = estimates::memory(
        sharding,
        sv.world,
        cl.gpus_per_node,
        &params,
        &optimizer,
        activation_bytes,
        cl.gpu_memory_gib,
    );
    let layout = ParallelLayout {
        nodes: cl.nodes,
        gpus_per_node: cl.gpus_per_node,
        world: sv.world,
        micro_batch: sv.micro_batch,
        seq_len: sv.seq_len,
        gas: sv.gas as usize,
        batch_tokens: sv.batch_tokens,
        sharding,
    };
    let data = DataPlan {
        train: inputs.train_data.clone(),
        val: inputs.val_data.clone(),
        block_size: sv.seq_len + 1,
        val_block_size: sv.num_extrapol * sv.seq_len + 1,
        val_micro_batch: sv.micro_batch.div_ceil(2),
        n_chunks: if model.name.contains("phi4miniflash") {
            128
        } else {
            8
        },
        seed: inputs.seed,
    };
    let estimates = Estimates {
        params_total,
        params_non_embedding: params::count_non_embedding(&params),
        flops_per_token_archscale: estimates::flops_archscale(params_total, &model),
        flops_per_token_exact: estimates::flops_exact(&model, &arch.layers, &params),
        memory,
    };
    let archscale_summary = archscale_summary(
        inputs,
        &train_name,
        &sv,
        &model,
        &optimizer,
        opt_kind,
        params_total,
    );

    Ok(Plan {
        run_name,
        model,
        layers: arch.layers.clone(),
        params,
        optimizer,
        schedule,
        training,
        layout,
        data,
        estimates,
        archscale_summary,
    })
}
