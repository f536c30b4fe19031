//! The CPU reference model: a [`Plan`]'s layer stack executed forward and backward with
//! the ops in [`super::ops`].
//!
//! Block `l` (pre-norm, fp32 residual stream, `rs = model.residual_scale`):
//! `x += rs·mixer(norm_1(x)); x += rs·mlp(norm_2(x))`; then `ln_f`, `× logit_scale`, the
//! (tied or untied) head and the label-smoothed cross-entropy. YOCO: cross-attention layers
//! read the K/V of layer `kv_from`, GMU layers the memory of layer `memory_from`; their
//! gradients are summed into the producer before its own backward runs.
//!
//! Activations live in a workspace allocated once per (batch, sequence, training) shape and
//! reused across steps.

use super::float::{Real, Storage};
use super::ops::attention::{
    attention_backward, attention_forward, heads_to_tokens, merge_qkv, split_qkv, tokens_to_heads,
    AttnShape,
};
use super::ops::conv1d::{causal_conv1d_backward, causal_conv1d_forward};
use super::ops::cross_entropy::{cross_entropy_backward, cross_entropy_forward};
use super::ops::diff_attention::{
    diff_attention_backward, diff_attention_forward, DiffSaved, LambdaGrads, Lambdas,
};
use super::ops::embedding::{embedding_backward, embedding_forward};
use super::ops::layernorm::{layernorm_backward, layernorm_forward};
use super::ops::linear::{linear_backward, linear_forward};
use super::ops::mask::segment_starts;
use super::ops::rmsnorm::{rmsnorm_backward, rmsnorm_forward};
use super::ops::rope::{rope_backward, rope_forward, RopeTable};
use super::ops::scale::{scale_backward, scale_forward, scaled_add_backward, scaled_add_forward};
use super::ops::selective_scan::{
    selective_scan_backward, selective_scan_forward, ScanGrads, ScanInputs, ScanShape,
};
use super::ops::silu::{silu_backward, silu_forward};
use super::ops::silu_gate::{silu_gate_backward, silu_gate_forward};
use super::ops::swiglu::{swiglu_backward, swiglu_forward};
use crate::{Result, RuntimeError};
use archscale_compiler::{LayerPlan, Mixer, ModelConfig, NormKind, ParamSpec, Plan};
use std::collections::HashMap;
use std::sync::Mutex;

/// Workspaces kept per model (one per distinct batch shape; training and evaluation).
const MAX_WORKSPACES: usize = 4;

fn err(msg: impl Into<String>) -> RuntimeError {
    RuntimeError::Message(msg.into())
}

// ---------------------------------------------------------------------------------------
// Resolved structure: parameter indices per layer.

#[derive(Clone, Copy, Debug)]
enum Norm {
    Rms { w: usize },
    Layer { w: usize, b: usize },
}

#[derive(Clone, Copy, Debug)]
struct Lin {
    w: usize,
    b: Option<usize>,
    d_in: usize,
    d_out: usize,
}

#[derive(Clone, Copy, Debug)]
struct DiffParams {
    q1: usize,
    k1: usize,
    q2: usize,
    k2: usize,
    subln: usize,
    lambda_init: f64,
}

#[derive(Clone, Debug)]
struct AttnLayer {
    /// Fused QKV, or Q-only for cross-attention.
    qkv: Lin,
    proj: Lin,
    window: Option<usize>,
    rope: bool,
    /// Position of the layer whose K/V this cross-attention layer reads.
    kv_from: Option<usize>,
    exports_kv: bool,
    exports_memory: bool,
    diff: Option<DiffParams>,
}

#[derive(Clone, Debug)]
struct MambaLayer {
    in_proj: usize,
    conv_w: usize,
    conv_b: usize,
    x_proj: usize,
    dt_w: usize,
    dt_b: usize,
    a_log: usize,
    d_skip: usize,
    out_proj: usize,
    export_memory: bool,
}

#[derive(Clone, Debug)]
struct GmuLayer {
    in_proj: Lin,
    out_proj: Lin,
    memory_from: usize,
}

#[derive(Clone, Debug)]
enum MixerKind {
    Attention(AttnLayer),
    Mamba(MambaLayer),
    Gmu(GmuLayer),
}

#[derive(Clone, Debug)]
struct Block {
    norm_1: Norm,
    mixer: MixerKind,
    norm_2: Norm,
    w1: Lin,
    w3: Lin,
    mlp_exports_memory: bool,
}

/// Which activation a layer exports as GMU memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MemorySource {
    /// Mamba `y` before the z-gate, `[N, d_inner]`.
    Mamba,
    /// Attention output before `proj`, `[N, H·hs]`.
    Attention,
    /// MLP up-half `u` of `w1`'s output, `[N, I]`.
    Mlp,
}

/// A Plan's model, executable on the CPU in `T` (`f32` to train, `f64` for gradient checks).
pub struct CpuModel<T: Real = f32> {
    cfg: ModelConfig,
    specs: Vec<ParamSpec>,
    seed: u64,
    blocks: Vec<Block>,
    wte: usize,
    head: usize,
    ln_f: Norm,
    workspaces: Mutex<Vec<Workspace<T>>>,
    storage: Storage,
    /// Round every mixer's and MLP's branch output to bf16 before its residual add, as a
    /// CUDA backend with `residual_in_norm` does (and ArchScale's autocast Linear).
    bf16_branches: bool,
}

struct Lookup<'a> {
    index: HashMap<&'a str, usize>,
    specs: &'a [ParamSpec],
}

impl Lookup<'_> {
    fn get(&self, name: &str, shape: &[usize]) -> Result<usize> {
        let &i = self
            .index
            .get(name)
            .ok_or_else(|| err(format!("the plan has no parameter `{name}`")))?;
        if self.specs[i].shape != shape {
            return Err(err(format!(
                "parameter `{name}` has shape {:?} in the plan, the model needs {shape:?}",
                self.specs[i].shape
            )));
        }
        Ok(i)
    }

    fn opt(&self, present: bool, name: &str, shape: &[usize]) -> Result<Option<usize>> {
        if present {
            self.get(name, shape).map(Some)
        } else if self.index.contains_key(name) {
            Err(err(format!(
                "the plan has parameter `{name}` but its model config has no such bias"
            )))
        } else {
            Ok(None)
        }
    }

    fn lin(&self, prefix: &str, d_in: usize, d_out: usize, bias: bool) -> Result<Lin> {
        Ok(Lin {
            w: self.get(&format!("{prefix}.weight"), &[d_out, d_in])?,
            b: self.opt(bias, &format!("{prefix}.bias"), &[d_out])?,
            d_in,
            d_out,
        })
    }

    fn norm(&self, prefix: &str, kind: NormKind, n: usize) -> Result<Norm> {
        let w = self.get(&format!("{prefix}.weight"), &[n])?;
        Ok(match kind {
            NormKind::RmsNorm => Norm::Rms { w },
            NormKind::LayerNorm => Norm::Layer {
                w,
                b: self.get(&format!("{prefix}.bias"), &[n])?,
            },
        })
    }
}

impl<T: Real> CpuModel<T> {
    /// Builds the model of `plan`, checking that every parameter it needs is in
    /// `plan.params` with the right shape. Mixers the CPU backend does not run are errors.
    pub fn new(plan: &Plan) -> Result<Self> {
        Self::from_parts(&plan.model, &plan.layers, &plan.params, plan.training.seed)
    }

    /// The same model storing the tensors the GPU keeps in bf16 at the points where a
    /// gradient is ill-conditioned at init: the Mamba scan's inputs (in_proj, conv, x_proj and
    /// dt_proj outputs), its upstream gradient and its dB, dC, dΔ; attention's Q, K, V;
    /// differential attention's O1, O2 and upstream gradient. Only the CUDA self-test uses `Storage::Bf16`, as its
    /// reference for such gradients.
    pub fn with_storage(mut self, storage: Storage) -> Self {
        self.storage = storage;
        self
    }

    /// The same model rounding every mixer's and MLP's branch output to bf16 before the
    /// residual add (`true`), where a CUDA backend does (`CudaBackend::branches_in_bf16`).
    /// Only the CUDA self-test uses it.
    pub fn with_bf16_branches(mut self, on: bool) -> Self {
        self.bf16_branches = on;
        self
    }

    /// As [`CpuModel::new`] from the pieces of a plan.
    pub fn from_parts(
        cfg: &ModelConfig,
        layers: &[LayerPlan],
        specs: &[ParamSpec],
        seed: u64,
    ) -> Result<Self> {
        let (n, v) = (cfg.n_embd, cfg.padded_vocab_size);
        let (h, g, hs) = (cfg.n_head, cfg.n_query_groups, cfg.head_size);
        if n == 0 || v == 0 || h == 0 || g == 0 || hs == 0 || cfg.intermediate_size == 0 {
            return Err(err(
                "model widths, heads, head size and vocabulary must be positive",
            ));
        }
        if h % g != 0 {
            return Err(err(format!(
                "n_head {h} is not a multiple of n_query_groups {g}"
            )));
        }
        let mut index = HashMap::new();
        for (i, s) in specs.iter().enumerate() {
            for name in std::iter::once(&s.name).chain(&s.aliases) {
                if index.insert(name.as_str(), i).is_some() {
                    return Err(err(format!(
                        "parameter name `{name}` appears twice in the plan"
                    )));
                }
            }
        }
        let lk = Lookup { index, specs };
        let wte = lk.get("transformer.wte.weight", &[v, n])?;
        let head = lk.get("lm_head.weight", &[v, n])?;
        if (wte == head) != cfg.tied_embeddings {
            return Err(err(format!(
                "tied_embeddings is {} but `lm_head.weight` and `transformer.wte.weight` are {}",
                cfg.tied_embeddings,
                if wte == head {
                    "one tensor"
                } else {
                    "separate tensors"
                }
            )));
        }
        let ln_f = lk.norm("transformer.ln_f", cfg.norm, n)?;

        let mut blocks: Vec<Block> = Vec::with_capacity(layers.len());
        let mut memory: Vec<Option<(MemorySource, usize)>> = Vec::with_capacity(layers.len());
        for (pos, layer) in layers.iter().enumerate() {
            if layer.index != pos {
                return Err(err(format!(
                    "layer at position {pos} has index {}",
                    layer.index
                )));
            }
            let p = format!("transformer.h.{pos}");
            let a = format!("{p}.attn");
            let mixer = match &layer.mixer {
                Mixer::Attention(at) => {
                    if at.window == Some(0) {
                        return Err(err(format!(
                            "layer {pos}: attention window must be at least 1"
                        )));
                    }
                    if at.rope && cfg.rope_base.is_none() {
                        return Err(err(format!(
                            "layer {pos} uses RoPE but the model has no rope_base"
                        )));
                    }
                    if at.rope && hs % 2 != 0 {
                        return Err(err(format!(
                            "layer {pos}: RoPE needs an even head size, got {hs}"
                        )));
                    }
                    let qkv_out = if at.kv_from.is_some() {
                        h * hs
                    } else {
                        (h + 2 * g) * hs
                    };
                    if let Some(src) = at.kv_from {
                        let ok = src < pos
                            && matches!(&blocks[src].mixer, MixerKind::Attention(s) if s.exports_kv && s.kv_from.is_none());
                        if !ok {
                            return Err(err(format!(
                                "layer {pos} reads K/V from layer {src}, which is not an earlier attention layer exporting its K/V"
                            )));
                        }
                    }
                    let diff = match &at.differential {
                        Some(d) => {
                            if h % 2 != 0 || g % 2 != 0 {
                                return Err(err(format!(
                                    "layer {pos}: differential attention needs even heads and KV groups, got {h} and {g}"
                                )));
                            }
                            Some(DiffParams {
                                q1: lk.get(&format!("{a}.da.lambda_q1"), &[hs])?,
                                k1: lk.get(&format!("{a}.da.lambda_k1"), &[hs])?,
                                q2: lk.get(&format!("{a}.da.lambda_q2"), &[hs])?,
                                k2: lk.get(&format!("{a}.da.lambda_k2"), &[hs])?,
                                subln: lk.get(&format!("{a}.da.subln.weight"), &[2 * hs])?,
                                lambda_init: d.lambda_init,
                            })
                        }
                        None => None,
                    };
                    MixerKind::Attention(AttnLayer {
                        qkv: lk.lin(&format!("{a}.attn"), n, qkv_out, cfg.attn_bias)?,
                        proj: lk.lin(&format!("{a}.proj"), h * hs, n, cfg.attn_out_bias)?,
                        window: at.window,
                        rope: at.rope,
                        kv_from: at.kv_from,
                        exports_kv: at.exports_kv,
                        exports_memory: at.exports_memory,
                        diff,
                    })
                }
                Mixer::Mamba(mp) => {
                    let m = cfg.mamba.ok_or_else(|| {
                        err(format!(
                            "layer {pos} is a Mamba layer but the model has no Mamba sizes"
                        ))
                    })?;
                    let (d, r, ns, k) = (m.d_inner, m.dt_rank, m.d_state, m.d_conv);
                    if d == 0 || r == 0 || ns == 0 || k == 0 {
                        return Err(err("Mamba sizes must be positive"));
                    }
                    MixerKind::Mamba(MambaLayer {
                        in_proj: lk.get(&format!("{a}.in_proj.weight"), &[2 * d, n])?,
                        conv_w: lk.get(&format!("{a}.conv1d.weight"), &[d, 1, k])?,
                        conv_b: lk.get(&format!("{a}.conv1d.bias"), &[d])?,
                        x_proj: lk.get(&format!("{a}.x_proj.weight"), &[r + 2 * ns, d])?,
                        dt_w: lk.get(&format!("{a}.dt_proj.weight"), &[d, r])?,
                        dt_b: lk.get(&format!("{a}.dt_proj.bias"), &[d])?,
                        a_log: lk.get(&format!("{a}.A_log"), &[d, ns])?,
                        d_skip: lk.get(&format!("{a}.D"), &[d])?,
                        out_proj: lk.get(&format!("{a}.out_proj.weight"), &[n, d])?,
                        export_memory: mp.export_memory,
                    })
                }
                Mixer::Gmu(gp) => {
                    if gp.gated_norm {
                        return Err(err(format!(
                            "layer {pos}: the gated-RMSNorm GMU (Mamba-2 / Gated DeltaNet memory) is plan-only; run does not implement it yet"
                        )));
                    }
                    let src = gp.memory_from;
                    let exported = if src < pos { memory[src] } else { None };
                    match exported {
                        Some((_, width)) if width == gp.d_mem => {}
                        Some((_, width)) => {
                            return Err(err(format!(
                                "layer {pos}: GMU memory width {} differs from layer {src}'s exported width {width}",
                                gp.d_mem
                            )))
                        }
                        None => {
                            return Err(err(format!(
                                "layer {pos} reads GMU memory from layer {src}, which is not an earlier layer exporting memory"
                            )))
                        }
                    }
                    MixerKind::Gmu(GmuLayer {
                        in_proj: lk.lin(&format!("{a}.gmu.in_proj"), n, gp.d_mem, cfg.bias)?,
                        out_proj: lk.lin(&format!("{a}.gmu.out_proj"), gp.d_mem, n, cfg.bias)?,
                        memory_from: src,
                    })
                }
                Mixer::Mamba2 { .. } => {
                    return Err(err(format!(
                        "layer {pos}: mamba2 is plan-only; run does not implement it yet"
                    )))
                }
                Mixer::GatedDeltaNet { .. } => {
                    return Err(err(format!(
                        "layer {pos}: gated_delta_net is plan-only; run does not implement it yet"
                    )))
                }
            };
            let inter = cfg.intermediate_size;
            let exported = if layer.mlp_exports_memory {
                Some((MemorySource::Mlp, inter))
            } else {
                match &mixer {
                    MixerKind::Mamba(m) if m.export_memory => {
                        Some((MemorySource::Mamba, cfg.mamba.map_or(0, |d| d.d_inner)))
                    }
                    MixerKind::Attention(at) if at.exports_memory => {
                        Some((MemorySource::Attention, h * hs))
                    }
                    _ => None,
                }
            };
            memory.push(exported);
            blocks.push(Block {
                norm_1: lk.norm(&format!("{p}.norm_1"), cfg.norm, n)?,
                mixer,
                norm_2: lk.norm(&format!("{p}.norm_2"), cfg.norm, n)?,
                w1: lk.lin(&format!("{p}.mlp.w1"), n, 2 * inter, cfg.bias)?,
                w3: lk.lin(&format!("{p}.mlp.w3"), inter, n, cfg.bias)?,
                mlp_exports_memory: layer.mlp_exports_memory,
            });
        }
        Ok(CpuModel {
            cfg: cfg.clone(),
            specs: specs.to_vec(),
            seed,
            blocks,
            wte,
            head,
            ln_f,
            workspaces: Mutex::new(Vec::new()),
            storage: Storage::Exact,
            bf16_branches: false,
        })
    }

    /// The parameters, in plan order.
    pub fn param_specs(&self) -> &[ParamSpec] {
        &self.specs
    }

    /// Fresh parameters per the plan's init rules (see [`super::init`]).
    pub fn init_params(&self) -> Vec<Vec<T>> {
        super::init::init_params(&self.specs, self.seed)
    }

    /// Zeroed gradient buffers matching the parameters.
    pub fn zero_grads(&self) -> Vec<Vec<T>> {
        self.specs
            .iter()
            .map(|s| vec![T::ZERO; s.numel()])
            .collect()
    }

    fn check_params(&self, params: &[Vec<T>]) -> Result<()> {
        if params.len() != self.specs.len() {
            return Err(err(format!(
                "{} parameter tensors given, the plan has {}",
                params.len(),
                self.specs.len()
            )));
        }
        for (p, s) in params.iter().zip(&self.specs) {
            if p.len() != s.numel() {
                return Err(err(format!(
                    "parameter `{}` has {} values, expected {}",
                    s.name,
                    p.len(),
                    s.numel()
                )));
            }
        }
        Ok(())
    }

    fn check_tokens(&self, tokens: &[u32]) -> Result<()> {
        let v = self.cfg.padded_vocab_size;
        match tokens.iter().position(|&t| t as usize >= v) {
            Some(i) => Err(err(format!(
                "token {} at position {i} is outside the vocabulary of {v}",
                tokens[i]
            ))),
            None => Ok(()),
        }
    }

    /// Forward and backward on `micro` rows of `T + 1` tokens (inputs `[0, T)`, targets
    /// `[1, T + 1)`). Adds `grad_scale · ∂(mean loss)/∂θ` into `grads` and returns the mean
    /// (label-smoothed) loss over the `micro·T` predictions.
    pub fn forward_backward(
        &self,
        params: &[Vec<T>],
        grads: &mut [Vec<T>],
        rows: &[u32],
        micro: usize,
        grad_scale: f32,
        label_smoothing: f64,
    ) -> Result<f64> {
        self.check_params(params)?;
        if grads.len() != params.len() || grads.iter().zip(params).any(|(g, p)| g.len() != p.len())
        {
            return Err(err("gradient buffers do not match the parameters"));
        }
        if !(0.0..1.0).contains(&label_smoothing) {
            return Err(err(format!(
                "label smoothing must be in [0, 1), got {label_smoothing}"
            )));
        }
        let seq = row_seq(rows.len(), micro)?;
        self.check_tokens(rows)?;
        let mut cache = self.workspaces.lock().unwrap_or_else(|e| e.into_inner());
        let ws = workspace(&mut cache, self, micro, seq, true);
        let loss = self.forward_mean_loss(ws, params, rows, micro, seq, label_smoothing);
        self.backward(ws, params, grads, grad_scale, label_smoothing);
        Ok(loss)
    }

    /// Loads `rows` into the training workspace, runs the forward pass and returns the mean
    /// (label-smoothed) loss; the activations stay in `ws` for a backward pass.
    fn forward_mean_loss(
        &self,
        ws: &mut Workspace<T>,
        params: &[Vec<T>],
        rows: &[u32],
        micro: usize,
        seq: usize,
        label_smoothing: f64,
    ) -> f64 {
        ws.load_rows(
            rows,
            micro,
            seq,
            self.cfg.varlen.then_some(self.cfg.eos_token_id),
        );
        self.forward(ws, params);
        cross_entropy_forward(
            &mut ws.losses,
            &ws.logits,
            &ws.targets,
            self.cfg.padded_vocab_size,
            label_smoothing,
        );
        ws.losses.iter().map(|l| l.to_f64()).sum::<f64>() / ws.losses.len() as f64
    }

    /// The loss of [`CpuModel::forward_backward`] without the backward pass.
    pub fn loss(
        &self,
        params: &[Vec<T>],
        rows: &[u32],
        micro: usize,
        label_smoothing: f64,
    ) -> Result<f64> {
        self.check_params(params)?;
        let seq = row_seq(rows.len(), micro)?;
        self.check_tokens(rows)?;
        let mut cache = self.workspaces.lock().unwrap_or_else(|e| e.into_inner());
        let ws = workspace(&mut cache, self, micro, seq, true);
        Ok(self.forward_mean_loss(ws, params, rows, micro, seq, label_smoothing))
    }

    /// Mean cross-entropy (no smoothing, no gradients) of `rows` rows of `row_len` tokens,
    /// on the first `p` predictions of each row for every `p` in `prefixes` (all models are
    /// causal, so this equals evaluating each prefix separately).
    pub fn forward_loss(
        &self,
        params: &[Vec<T>],
        tokens: &[u32],
        rows: usize,
        row_len: usize,
        prefixes: &[usize],
    ) -> Result<Vec<f64>> {
        self.check_params(params)?;
        if rows == 0 || tokens.len() != rows * row_len {
            return Err(err(format!(
                "{} tokens do not form {rows} rows of {row_len}",
                tokens.len()
            )));
        }
        let seq = row_seq(tokens.len(), rows)?;
        if let Some(&p) = prefixes.iter().find(|&&p| p == 0 || p > seq) {
            return Err(err(format!(
                "prefix {p} is outside 1..={seq} for rows of {row_len} tokens"
            )));
        }
        self.check_tokens(tokens)?;
        let mut cache = self.workspaces.lock().unwrap_or_else(|e| e.into_inner());
        let ws = workspace(&mut cache, self, rows, seq, false);
        ws.load_rows(
            tokens,
            rows,
            seq,
            self.cfg.varlen.then_some(self.cfg.eos_token_id),
        );
        self.forward(ws, params);
        cross_entropy_forward(
            &mut ws.losses,
            &ws.logits,
            &ws.targets,
            self.cfg.padded_vocab_size,
            0.0,
        );
        Ok(prefixes
            .iter()
            .map(|&p| {
                let sum: f64 = ws
                    .losses
                    .chunks(seq)
                    .map(|r| r[..p].iter().map(|l| l.to_f64()).sum::<f64>())
                    .sum();
                sum / (rows * p) as f64
            })
            .collect())
    }

    /// Logits after the last of `tokens` (one row, a whole forward): the padded vocabulary.
    pub fn last_logits(&self, params: &[Vec<T>], tokens: &[u32]) -> Result<Vec<T>> {
        self.check_params(params)?;
        let seq = tokens.len();
        if seq == 0 {
            return Err(err("last_logits: no tokens".to_string()));
        }
        self.check_tokens(tokens)?;
        // one row of seq inputs and a placeholder target
        let mut row = tokens.to_vec();
        row.push(0);
        let mut cache = self.workspaces.lock().unwrap_or_else(|e| e.into_inner());
        let ws = workspace(&mut cache, self, 1, seq, false);
        ws.load_rows(
            &row,
            1,
            seq,
            self.cfg.varlen.then_some(self.cfg.eos_token_id),
        );
        self.forward(ws, params);
        let v = self.cfg.padded_vocab_size;
        Ok(ws.logits[(seq - 1) * v..seq * v].to_vec())
    }

    // -----------------------------------------------------------------------------------
    // Forward.

    fn forward(&self, ws: &mut Workspace<T>, params: &[Vec<T>]) {
        let n = self.cfg.n_embd;
        let eps = self.cfg.norm_eps;
        let rs = self.cfg.residual_scale;
        let x0 = match ws.layers.first_mut() {
            Some(l) => &mut l.x_in,
            None => &mut ws.x_out,
        };
        embedding_forward(x0, &ws.tokens, &params[self.wte], n);
        let n_layers = self.blocks.len();
        for l in 0..n_layers {
            let block = &self.blocks[l];
            let (before, rest) = ws.layers.split_at_mut(l);
            let (cur, after) = rest.split_first_mut().expect("layer exists");
            norm_forward(block.norm_1, &mut cur.norm_1, &cur.x_in, params, n, eps);
            self.mixer_forward(block, cur, before, &mut ws.branch, params, &ws.shape);
            if self.bf16_branches {
                Storage::Bf16.store(&mut ws.branch);
            }
            cur.x_mid.copy_from_slice(&cur.x_in);
            scaled_add_forward(&mut cur.x_mid, &ws.branch, rs);
            norm_forward(block.norm_2, &mut cur.norm_2, &cur.x_mid, params, n, eps);
            self.mlp_forward(block, cur, &mut ws.branch, params, &ws.shape);
            if self.bf16_branches {
                Storage::Bf16.store(&mut ws.branch);
            }
            let next = match after.first_mut() {
                Some(next) => &mut next.x_in,
                None => &mut ws.x_out,
            };
            next.copy_from_slice(&cur.x_mid);
            scaled_add_forward(next, &ws.branch, rs);
        }
        norm_forward(self.ln_f, &mut ws.ln_f, &ws.x_out, params, n, eps);
        scale_forward(&mut ws.scaled, &ws.ln_f.out, self.cfg.logit_scale);
        let rows = ws.shape.tokens();
        linear_forward(
            &mut ws.logits,
            &ws.scaled,
            &params[self.head],
            None,
            rows,
            n,
            self.cfg.padded_vocab_size,
        );
    }

    fn attn_shape(&self, at: &AttnLayer, s: &Shape) -> AttnShape {
        AttnShape {
            batch: s.batch,
            seq: s.seq,
            n_head: self.cfg.n_head,
            n_kv: self.cfg.n_query_groups,
            head_size: self.cfg.head_size,
            window: at.window,
            scale: self.cfg.attn_scale,
        }
    }

    fn mixer_forward(
        &self,
        block: &Block,
        cur: &mut LayerActs<T>,
        before: &[LayerActs<T>],
        branch: &mut [T],
        params: &[Vec<T>],
        s: &Shape,
    ) {
        let rows = s.tokens();
        let u = &cur.norm_1.out;
        let seg = s.seg();
        match (&block.mixer, &mut cur.mixer) {
            (MixerKind::Attention(at), MixerActs::Attention(a)) => {
                let sh = self.attn_shape(at, s);
                let (h, hs) = (sh.n_head, sh.head_size);
                lin_forward(at.qkv, &mut a.proj_in, u, params, rows);
                match at.kv_from {
                    None => split_qkv(&mut a.q, &mut a.k, &mut a.v, &a.proj_in, &sh),
                    Some(_) => tokens_to_heads(&mut a.q, &a.proj_in, s.batch, s.seq, h, hs),
                }
                if at.rope {
                    let table = s.rope.as_ref().expect("rope table built for rope layers");
                    rope_forward(&mut a.q, table, s.seq, hs);
                    if at.kv_from.is_none() {
                        rope_forward(&mut a.k, table, s.seq, hs);
                    }
                }
                // The flash kernels read bf16 Q, K, V.
                self.storage.store(&mut a.q);
                if at.kv_from.is_none() {
                    self.storage.store(&mut a.k);
                    self.storage.store(&mut a.v);
                }
                let (k, v) = match at.kv_from {
                    None => (&a.k, &a.v),
                    Some(src) => match &before[src].mixer {
                        MixerActs::Attention(p) => (&p.k, &p.v),
                        _ => unreachable!("validated in CpuModel::new"),
                    },
                };
                match at.diff {
                    Some(d) => {
                        let lambdas = Lambdas {
                            q1: &params[d.q1],
                            k1: &params[d.k1],
                            q2: &params[d.q2],
                            k2: &params[d.k2],
                        };
                        let saved = DiffSaved {
                            probs: &mut a.probs,
                            o2: &mut a.o2,
                            diff: &mut a.diff,
                            rstd: &mut a.rstd,
                        };
                        diff_attention_forward(
                            &mut a.o,
                            saved,
                            &a.q,
                            k,
                            v,
                            &lambdas,
                            &params[d.subln],
                            d.lambda_init,
                            &sh,
                            seg,
                            self.storage,
                        );
                        heads_to_tokens(&mut a.y, &a.o, s.batch, s.seq, h / 2, 2 * hs);
                    }
                    None => {
                        attention_forward(&mut a.o, &mut a.probs, &a.q, k, v, &sh, seg);
                        heads_to_tokens(&mut a.y, &a.o, s.batch, s.seq, h, hs);
                    }
                }
                lin_forward(at.proj, branch, &a.y, params, rows);
            }
            (MixerKind::Mamba(mb), MixerActs::Mamba(m)) => {
                let (n, d, r, ns, k) = self.mamba_dims();
                let w_in = &params[mb.in_proj];
                linear_forward(&mut m.x, u, &w_in[..d * n], None, rows, n, d);
                linear_forward(&mut m.z, u, &w_in[d * n..], None, rows, n, d);
                self.storage.store(&mut m.x);
                self.storage.store(&mut m.z);
                causal_conv1d_forward(
                    &mut m.xc_pre,
                    &m.x,
                    &params[mb.conv_w],
                    &params[mb.conv_b],
                    s.seq,
                    d,
                    k,
                    seg,
                );
                silu_forward(&mut m.xc, &m.xc_pre);
                self.storage.store(&mut m.xc);
                let w_x = &params[mb.x_proj];
                linear_forward(&mut m.dtr, &m.xc, &w_x[..r * d], None, rows, d, r);
                linear_forward(
                    &mut m.bm,
                    &m.xc,
                    &w_x[r * d..(r + ns) * d],
                    None,
                    rows,
                    d,
                    ns,
                );
                linear_forward(&mut m.cm, &m.xc, &w_x[(r + ns) * d..], None, rows, d, ns);
                self.storage.store(&mut m.dtr);
                linear_forward(&mut m.delta, &m.dtr, &params[mb.dt_w], None, rows, r, d);
                for t in [&mut m.bm, &mut m.cm, &mut m.delta] {
                    self.storage.store(t);
                }
                let inp = ScanInputs {
                    x: &m.xc,
                    delta: &m.delta,
                    delta_bias: &params[mb.dt_b],
                    a_log: &params[mb.a_log],
                    b_mat: &m.bm,
                    c_mat: &m.cm,
                    d_skip: &params[mb.d_skip],
                    seg_start: seg,
                };
                selective_scan_forward(&mut m.y, &inp, &self.scan_shape(s));
                silu_gate_forward(&mut m.gated, &m.y, &m.z);
                linear_forward(branch, &m.gated, &params[mb.out_proj], None, rows, d, n);
            }
            (MixerKind::Gmu(gm), MixerActs::Gmu(a)) => {
                lin_forward(gm.in_proj, &mut a.g, u, params, rows);
                let mem = memory_of(&before[gm.memory_from]);
                silu_gate_forward(&mut a.h, mem, &a.g);
                lin_forward(gm.out_proj, branch, &a.h, params, rows);
            }
            _ => unreachable!("workspace built from the same blocks"),
        }
    }

    fn mlp_forward(
        &self,
        block: &Block,
        cur: &mut LayerActs<T>,
        branch: &mut [T],
        params: &[Vec<T>],
        s: &Shape,
    ) {
        let rows = s.tokens();
        let inter = self.cfg.intermediate_size;
        lin_forward(block.w1, &mut cur.h1, &cur.norm_2.out, params, rows);
        swiglu_forward(&mut cur.act, &cur.h1, inter);
        if block.mlp_exports_memory {
            for (m, h) in cur.mlp_mem.chunks_mut(inter).zip(cur.h1.chunks(2 * inter)) {
                m.copy_from_slice(&h[inter..]);
            }
        }
        lin_forward(block.w3, branch, &cur.act, params, rows);
    }

    fn mamba_dims(&self) -> (usize, usize, usize, usize, usize) {
        let m = self.cfg.mamba.expect("validated: Mamba layers have sizes");
        (self.cfg.n_embd, m.d_inner, m.dt_rank, m.d_state, m.d_conv)
    }

    fn scan_shape(&self, s: &Shape) -> ScanShape {
        let m = self.cfg.mamba.expect("validated: Mamba layers have sizes");
        ScanShape {
            batch: s.batch,
            seq: s.seq,
            d_inner: m.d_inner,
            d_state: m.d_state,
        }
    }

    // -----------------------------------------------------------------------------------
    // Backward.

    fn backward(
        &self,
        ws: &mut Workspace<T>,
        params: &[Vec<T>],
        grads: &mut [Vec<T>],
        grad_scale: f32,
        smoothing: f64,
    ) {
        let n = self.cfg.n_embd;
        let v = self.cfg.padded_vocab_size;
        let rows = ws.shape.tokens();
        let rs = self.cfg.residual_scale;
        let sc = &mut ws.scratch;

        // Loss → logits → head → logit scale → ln_f.
        let dloss = T::from_f64(grad_scale as f64 / rows as f64);
        let mut dlogits = sc.take("dlogits", rows * v);
        cross_entropy_backward(&mut dlogits, &ws.logits, &ws.targets, v, smoothing, dloss);
        let mut dscaled = sc.take("dscaled", rows * n);
        linear_backward(
            Some(&mut dscaled),
            &mut grads[self.head],
            None,
            &dlogits,
            &ws.scaled,
            &params[self.head],
            rows,
            n,
            v,
        );
        sc.give("dlogits", dlogits);
        let mut dlnf = sc.take("dlnf", rows * n);
        scale_backward(&mut dlnf, &dscaled, self.cfg.logit_scale);
        sc.give("dscaled", dscaled);
        let mut dx = sc.take("dx", rows * n);
        norm_backward(
            self.ln_f, &mut dx, &dlnf, &ws.ln_f, &ws.x_out, params, grads, n,
        );
        sc.give("dlnf", dlnf);

        for layer in &mut ws.layers {
            layer.zero_cross_grads();
        }
        let mut dbranch = sc.take("dbranch", rows * n);
        for l in (0..self.blocks.len()).rev() {
            let block = &self.blocks[l];
            let (before, rest) = ws.layers.split_at_mut(l);
            let cur = &mut rest[0];
            // MLP branch: x_out = x_mid + rs·mlp(norm_2(x_mid)).
            dbranch.fill(T::ZERO);
            scaled_add_backward(&mut dbranch, &dx, rs);
            let mut dnorm = sc.take("dnorm", rows * n);
            self.mlp_backward(
                block, cur, &dbranch, &mut dnorm, params, grads, sc, &ws.shape,
            );
            norm_backward(
                block.norm_2,
                &mut dx,
                &dnorm,
                &cur.norm_2,
                &cur.x_mid,
                params,
                grads,
                n,
            );
            // Mixer branch: x_mid = x_in + rs·mixer(norm_1(x_in)).
            dbranch.fill(T::ZERO);
            scaled_add_backward(&mut dbranch, &dx, rs);
            dnorm.fill(T::ZERO);
            self.mixer_backward(
                block, cur, before, &dbranch, &mut dnorm, params, grads, sc, &ws.shape,
            );
            norm_backward(
                block.norm_1,
                &mut dx,
                &dnorm,
                &cur.norm_1,
                &cur.x_in,
                params,
                grads,
                n,
            );
            sc.give("dnorm", dnorm);
        }
        sc.give("dbranch", dbranch);
        embedding_backward(&mut grads[self.wte], &ws.tokens, &dx, n);
        sc.give("dx", dx);
    }

    #[allow(clippy::too_many_arguments)]
    fn mlp_backward(
        &self,
        block: &Block,
        cur: &mut LayerActs<T>,
        dbranch: &[T],
        dnorm: &mut [T],
        params: &[Vec<T>],
        grads: &mut [Vec<T>],
        sc: &mut Scratch<T>,
        s: &Shape,
    ) {
        let rows = s.tokens();
        let inter = self.cfg.intermediate_size;
        let mut dact = sc.take("mlp.dact", rows * inter);
        lin_backward(
            block.w3,
            Some(&mut dact),
            dbranch,
            &cur.act,
            params,
            grads,
            rows,
        );
        let mut dh1 = sc.take("mlp.dh1", rows * 2 * inter);
        swiglu_backward(&mut dh1, &dact, &cur.h1, inter);
        sc.give("mlp.dact", dact);
        if block.mlp_exports_memory {
            for (d, m) in dh1.chunks_mut(2 * inter).zip(cur.dmem.chunks(inter)) {
                for (a, &b) in d[inter..].iter_mut().zip(m) {
                    *a += b;
                }
            }
        }
        lin_backward(
            block.w1,
            Some(dnorm),
            &dh1,
            &cur.norm_2.out,
            params,
            grads,
            rows,
        );
        sc.give("mlp.dh1", dh1);
    }

    #[allow(clippy::too_many_arguments)]
    fn mixer_backward(
        &self,
        block: &Block,
        cur: &mut LayerActs<T>,
        before: &mut [LayerActs<T>],
        dbranch: &[T],
        dnorm: &mut [T],
        params: &[Vec<T>],
        grads: &mut [Vec<T>],
        sc: &mut Scratch<T>,
        s: &Shape,
    ) {
        let rows = s.tokens();
        let u = &cur.norm_1.out;
        let mixer_memory_grad = !block.mlp_exports_memory;
        match (&block.mixer, &mut cur.mixer) {
            (MixerKind::Attention(at), MixerActs::Attention(a)) => {
                let sh = self.attn_shape(at, s);
                let (h, g, hs) = (sh.n_head, sh.n_kv, sh.head_size);
                let mut dy = sc.take("attn.dy", rows * h * hs);
                lin_backward(at.proj, Some(&mut dy), dbranch, &a.y, params, grads, rows);
                if at.exports_memory && mixer_memory_grad {
                    for (d, &m) in dy.iter_mut().zip(&cur.dmem) {
                        *d += m;
                    }
                }
                let mut dyh = sc.take("attn.dyh", rows * h * hs);
                let mut dq = sc.take("attn.dq", rows * h * hs);
                let mut dk_own = sc.take("attn.dk", rows * g * hs);
                let mut dv_own = sc.take("attn.dv", rows * g * hs);
                {
                    // K/V gradients go to this layer's accumulators (exporters) or to its
                    // producer's (cross-attention).
                    let (k, v, dk, dv): (&[T], &[T], &mut [T], &mut [T]) = match at.kv_from {
                        Some(src) => match &mut before[src].mixer {
                            MixerActs::Attention(p) => (
                                p.k.as_slice(),
                                p.v.as_slice(),
                                p.dk.as_mut_slice(),
                                p.dv.as_mut_slice(),
                            ),
                            _ => unreachable!("validated in CpuModel::new"),
                        },
                        None if at.exports_kv => (
                            a.k.as_slice(),
                            a.v.as_slice(),
                            a.dk.as_mut_slice(),
                            a.dv.as_mut_slice(),
                        ),
                        None => (
                            a.k.as_slice(),
                            a.v.as_slice(),
                            dk_own.as_mut_slice(),
                            dv_own.as_mut_slice(),
                        ),
                    };
                    match at.diff {
                        Some(dp) => {
                            tokens_to_heads(&mut dyh, &dy, s.batch, s.seq, h / 2, 2 * hs);
                            self.storage.store(&mut dyh);
                            let lambdas = Lambdas {
                                q1: &params[dp.q1],
                                k1: &params[dp.k1],
                                q2: &params[dp.q2],
                                k2: &params[dp.k2],
                            };
                            let [gq1, gk1, gq2, gk2, gsub] = grads
                                .get_disjoint_mut([dp.q1, dp.k1, dp.q2, dp.k2, dp.subln])
                                .expect("distinct DA params");
                            let dl = LambdaGrads {
                                q1: gq1,
                                k1: gk1,
                                q2: gq2,
                                k2: gk2,
                            };
                            diff_attention_backward(
                                &mut dq,
                                dk,
                                dv,
                                dl,
                                gsub,
                                &dyh,
                                &a.probs,
                                &a.o2,
                                &a.diff,
                                &a.rstd,
                                &a.q,
                                k,
                                v,
                                &lambdas,
                                &params[dp.subln],
                                dp.lambda_init,
                                &sh,
                                s.seg(),
                            );
                        }
                        None => {
                            tokens_to_heads(&mut dyh, &dy, s.batch, s.seq, h, hs);
                            attention_backward(
                                &mut dq,
                                dk,
                                dv,
                                &dyh,
                                &a.probs,
                                &a.q,
                                k,
                                v,
                                &sh,
                                s.seg(),
                            );
                        }
                    }
                }
                sc.give("attn.dy", dy);
                sc.give("attn.dyh", dyh);
                let table = if at.rope { s.rope.as_ref() } else { None };
                if let Some(table) = table {
                    rope_backward(&mut dq, table, s.seq, hs);
                }
                let mut dproj_in = sc.take("attn.dproj_in", rows * at.qkv.d_out);
                match at.kv_from {
                    None => {
                        let (dk, dv) = if at.exports_kv {
                            (&mut a.dk, &mut a.dv)
                        } else {
                            (&mut dk_own, &mut dv_own)
                        };
                        if let Some(table) = table {
                            rope_backward(dk, table, s.seq, hs);
                        }
                        merge_qkv(&mut dproj_in, &dq, dk, dv, &sh);
                    }
                    Some(_) => heads_to_tokens(&mut dproj_in, &dq, s.batch, s.seq, h, hs),
                }
                sc.give("attn.dq", dq);
                sc.give("attn.dk", dk_own);
                sc.give("attn.dv", dv_own);
                lin_backward(at.qkv, Some(dnorm), &dproj_in, u, params, grads, rows);
                sc.give("attn.dproj_in", dproj_in);
            }
            (MixerKind::Mamba(mb), MixerActs::Mamba(m)) => {
                let (n, d, r, ns, k) = self.mamba_dims();
                let seg = s.seg();
                let mut dgated = sc.take("mamba.dgated", rows * d);
                linear_backward(
                    Some(&mut dgated),
                    &mut grads[mb.out_proj],
                    None,
                    dbranch,
                    &m.gated,
                    &params[mb.out_proj],
                    rows,
                    d,
                    n,
                );
                self.storage.store(&mut dgated);
                let mut dy = sc.take("mamba.dy", rows * d);
                if mb.export_memory && mixer_memory_grad {
                    dy.copy_from_slice(&cur.dmem);
                }
                let mut dz = sc.take("mamba.dz", rows * d);
                silu_gate_backward(&mut dy, &mut dz, &dgated, &m.y, &m.z);
                sc.give("mamba.dgated", dgated);
                let mut dxc = sc.take("mamba.dxc", rows * d);
                let mut ddelta = sc.take("mamba.ddelta", rows * d);
                let mut dbm = sc.take("mamba.dbm", rows * ns);
                let mut dcm = sc.take("mamba.dcm", rows * ns);
                {
                    let inp = ScanInputs {
                        x: &m.xc,
                        delta: &m.delta,
                        delta_bias: &params[mb.dt_b],
                        a_log: &params[mb.a_log],
                        b_mat: &m.bm,
                        c_mat: &m.cm,
                        d_skip: &params[mb.d_skip],
                        seg_start: seg,
                    };
                    let [g_dtb, g_alog, g_d] = grads
                        .get_disjoint_mut([mb.dt_b, mb.a_log, mb.d_skip])
                        .expect("distinct Mamba params");
                    let sg = ScanGrads {
                        x: &mut dxc,
                        delta: &mut ddelta,
                        delta_bias: g_dtb,
                        a_log: g_alog,
                        b_mat: &mut dbm,
                        c_mat: &mut dcm,
                        d_skip: g_d,
                    };
                    selective_scan_backward(sg, &dy, &inp, &self.scan_shape(s));
                }
                for t in [&mut dbm, &mut dcm, &mut ddelta] {
                    self.storage.store(t);
                }
                sc.give("mamba.dy", dy);
                let mut ddtr = sc.take("mamba.ddtr", rows * r);
                linear_backward(
                    Some(&mut ddtr),
                    &mut grads[mb.dt_w],
                    None,
                    &ddelta,
                    &m.dtr,
                    &params[mb.dt_w],
                    rows,
                    r,
                    d,
                );
                sc.give("mamba.ddelta", ddelta);
                {
                    let (w_x, g_x) = (&params[mb.x_proj], &mut grads[mb.x_proj]);
                    let (g_dt, g_rest) = g_x.split_at_mut(r * d);
                    let (g_b, g_c) = g_rest.split_at_mut(ns * d);
                    linear_backward(
                        Some(&mut dxc),
                        g_dt,
                        None,
                        &ddtr,
                        &m.xc,
                        &w_x[..r * d],
                        rows,
                        d,
                        r,
                    );
                    linear_backward(
                        Some(&mut dxc),
                        g_b,
                        None,
                        &dbm,
                        &m.xc,
                        &w_x[r * d..(r + ns) * d],
                        rows,
                        d,
                        ns,
                    );
                    linear_backward(
                        Some(&mut dxc),
                        g_c,
                        None,
                        &dcm,
                        &m.xc,
                        &w_x[(r + ns) * d..],
                        rows,
                        d,
                        ns,
                    );
                }
                sc.give("mamba.ddtr", ddtr);
                sc.give("mamba.dbm", dbm);
                sc.give("mamba.dcm", dcm);
                let mut dxc_pre = sc.take("mamba.dxc_pre", rows * d);
                silu_backward(&mut dxc_pre, &dxc, &m.xc_pre);
                sc.give("mamba.dxc", dxc);
                let mut dx = sc.take("mamba.dx", rows * d);
                {
                    let [g_cw, g_cb] = grads
                        .get_disjoint_mut([mb.conv_w, mb.conv_b])
                        .expect("distinct conv params");
                    causal_conv1d_backward(
                        &mut dx,
                        g_cw,
                        g_cb,
                        &dxc_pre,
                        &m.x,
                        &params[mb.conv_w],
                        s.seq,
                        d,
                        k,
                        seg,
                    );
                }
                sc.give("mamba.dxc_pre", dxc_pre);
                let (w_in, g_in) = (&params[mb.in_proj], &mut grads[mb.in_proj]);
                let (g_inx, g_inz) = g_in.split_at_mut(d * n);
                linear_backward(
                    Some(&mut *dnorm),
                    g_inx,
                    None,
                    &dx,
                    u,
                    &w_in[..d * n],
                    rows,
                    n,
                    d,
                );
                linear_backward(Some(dnorm), g_inz, None, &dz, u, &w_in[d * n..], rows, n, d);
                sc.give("mamba.dx", dx);
                sc.give("mamba.dz", dz);
            }
            (MixerKind::Gmu(gm), MixerActs::Gmu(a)) => {
                let d_mem = gm.in_proj.d_out;
                let mut dh = sc.take("gmu.dh", rows * d_mem);
                lin_backward(
                    gm.out_proj,
                    Some(&mut dh),
                    dbranch,
                    &a.h,
                    params,
                    grads,
                    rows,
                );
                let mut dg = sc.take("gmu.dg", rows * d_mem);
                let src = &mut before[gm.memory_from];
                // The source's memory gradient accumulates over every GMU reading it.
                let mut dmem = std::mem::take(&mut src.dmem);
                let mem = memory_of(src);
                silu_gate_backward(&mut dmem, &mut dg, &dh, mem, &a.g);
                src.dmem = dmem;
                sc.give("gmu.dh", dh);
                lin_backward(gm.in_proj, Some(dnorm), &dg, u, params, grads, rows);
                sc.give("gmu.dg", dg);
            }
            _ => unreachable!("workspace built from the same blocks"),
        }
    }
}

/// Sequence length of `rows` rows holding `len` tokens in all (`T + 1` per row).
fn row_seq(len: usize, rows: usize) -> Result<usize> {
    if rows == 0 || !len.is_multiple_of(rows) || len / rows < 2 {
        return Err(err(format!(
            "{len} tokens do not form {rows} rows of at least 2 tokens"
        )));
    }
    Ok(len / rows - 1)
}

fn lin_forward<T: Real>(l: Lin, y: &mut [T], x: &[T], params: &[Vec<T>], rows: usize) {
    linear_forward(
        y,
        x,
        &params[l.w],
        l.b.map(|b| params[b].as_slice()),
        rows,
        l.d_in,
        l.d_out,
    );
}

fn lin_backward<T: Real>(
    l: Lin,
    dx: Option<&mut [T]>,
    dy: &[T],
    x: &[T],
    params: &[Vec<T>],
    grads: &mut [Vec<T>],
    rows: usize,
) {
    match l.b {
        Some(b) => {
            let [gw, gb] = grads
                .get_disjoint_mut([l.w, b])
                .expect("distinct weight and bias");
            linear_backward(dx, gw, Some(gb), dy, x, &params[l.w], rows, l.d_in, l.d_out);
        }
        None => linear_backward(
            dx,
            &mut grads[l.w],
            None,
            dy,
            x,
            &params[l.w],
            rows,
            l.d_in,
            l.d_out,
        ),
    }
}

fn norm_forward<T: Real>(
    norm: Norm,
    acts: &mut NormActs<T>,
    x: &[T],
    params: &[Vec<T>],
    n: usize,
    eps: f64,
) {
    match norm {
        Norm::Rms { w } => rmsnorm_forward(&mut acts.out, &mut acts.rstd, x, &params[w], n, eps),
        Norm::Layer { w, b } => layernorm_forward(
            &mut acts.out,
            &mut acts.mean,
            &mut acts.rstd,
            x,
            &params[w],
            &params[b],
            n,
            eps,
        ),
    }
}

#[allow(clippy::too_many_arguments)]
fn norm_backward<T: Real>(
    norm: Norm,
    dx: &mut [T],
    dy: &[T],
    acts: &NormActs<T>,
    x: &[T],
    params: &[Vec<T>],
    grads: &mut [Vec<T>],
    n: usize,
) {
    match norm {
        Norm::Rms { w } => rmsnorm_backward(dx, &mut grads[w], dy, x, &params[w], &acts.rstd, n),
        Norm::Layer { w, b } => {
            let [gw, gb] = grads
                .get_disjoint_mut([w, b])
                .expect("distinct norm params");
            layernorm_backward(dx, gw, gb, dy, x, &params[w], &acts.mean, &acts.rstd, n)
        }
    }
}

/// The memory tensor a layer exports (MLP export wins: it is computed later in the block).
fn memory_of<T: Real>(layer: &LayerActs<T>) -> &[T] {
    if !layer.mlp_mem.is_empty() {
        return &layer.mlp_mem;
    }
    match &layer.mixer {
        MixerActs::Mamba(m) => &m.y,
        MixerActs::Attention(a) => &a.y,
        MixerActs::Gmu(_) => unreachable!("validated: GMU layers export no memory"),
    }
}

// ---------------------------------------------------------------------------------------
// Workspace: activations of one batch shape, allocated once and reused.

struct Shape {
    batch: usize,
    seq: usize,
    varlen: bool,
    /// `[B, T]` document starts of the current batch (varlen only).
    seg_start: Vec<u32>,
    rope: Option<RopeTable>,
}

impl Shape {
    fn tokens(&self) -> usize {
        self.batch * self.seq
    }

    fn seg(&self) -> Option<&[u32]> {
        self.varlen.then_some(self.seg_start.as_slice())
    }
}

#[derive(Default)]
struct NormActs<T> {
    out: Vec<T>,
    rstd: Vec<T>,
    mean: Vec<T>,
}

impl<T: Real> NormActs<T> {
    fn new(rows: usize, n: usize, layer_norm: bool) -> Self {
        NormActs {
            out: vec![T::ZERO; rows * n],
            rstd: vec![T::ZERO; rows],
            mean: if layer_norm {
                vec![T::ZERO; rows]
            } else {
                Vec::new()
            },
        }
    }
}

#[derive(Default)]
struct AttnActs<T> {
    /// Output of the QKV (or Q-only) projection, `[N, qkv_out]`.
    proj_in: Vec<T>,
    /// Head-major q `[B, H, T, hs]`, k and v `[B, G, T, hs]` (post-RoPE; k, v empty for cross-attention).
    q: Vec<T>,
    k: Vec<T>,
    v: Vec<T>,
    probs: Vec<T>,
    /// Head-major attention output (`[B, H/2, T, 2hs]` for differential attention).
    o: Vec<T>,
    o2: Vec<T>,
    diff: Vec<T>,
    rstd: Vec<T>,
    /// Output in token layout `[N, H·hs]`, the input of `proj` (and the `gmu_attn` memory).
    y: Vec<T>,
    /// K/V gradient accumulators of a layer whose K/V later layers read.
    dk: Vec<T>,
    dv: Vec<T>,
}

#[derive(Default)]
struct MambaActs<T> {
    x: Vec<T>,
    z: Vec<T>,
    xc_pre: Vec<T>,
    xc: Vec<T>,
    dtr: Vec<T>,
    bm: Vec<T>,
    cm: Vec<T>,
    delta: Vec<T>,
    /// Scan output before the z-gate (the GMU memory).
    y: Vec<T>,
    gated: Vec<T>,
}

#[derive(Default)]
struct GmuActs<T> {
    g: Vec<T>,
    h: Vec<T>,
}

enum MixerActs<T> {
    Attention(AttnActs<T>),
    Mamba(MambaActs<T>),
    Gmu(GmuActs<T>),
}

struct LayerActs<T> {
    x_in: Vec<T>,
    norm_1: NormActs<T>,
    mixer: MixerActs<T>,
    x_mid: Vec<T>,
    norm_2: NormActs<T>,
    h1: Vec<T>,
    act: Vec<T>,
    mlp_mem: Vec<T>,
    /// Gradient of the exported memory (summed over the GMU layers reading it).
    dmem: Vec<T>,
}

impl<T: Real> LayerActs<T> {
    fn zero_cross_grads(&mut self) {
        self.dmem.fill(T::ZERO);
        if let MixerActs::Attention(a) = &mut self.mixer {
            a.dk.fill(T::ZERO);
            a.dv.fill(T::ZERO);
        }
    }
}

/// Backward scratch buffers by name, allocated on first use and reused.
struct Scratch<T> {
    bufs: HashMap<&'static str, Vec<T>>,
}

impl<T: Real> Scratch<T> {
    /// A zeroed buffer of `len` (reusing the allocation kept under `key`).
    fn take(&mut self, key: &'static str, len: usize) -> Vec<T> {
        let mut v = self.bufs.remove(key).unwrap_or_default();
        v.clear();
        v.resize(len, T::ZERO);
        v
    }

    fn give(&mut self, key: &'static str, v: Vec<T>) {
        self.bufs.insert(key, v);
    }
}

struct Workspace<T> {
    train: bool,
    shape: Shape,
    tokens: Vec<u32>,
    targets: Vec<u32>,
    layers: Vec<LayerActs<T>>,
    /// Residual stream after the last block (the embedding output when there are none).
    x_out: Vec<T>,
    /// Mixer / MLP output before the residual add.
    branch: Vec<T>,
    ln_f: NormActs<T>,
    scaled: Vec<T>,
    logits: Vec<T>,
    losses: Vec<T>,
    scratch: Scratch<T>,
}

fn workspace<'a, T: Real>(
    cache: &'a mut Vec<Workspace<T>>,
    model: &CpuModel<T>,
    batch: usize,
    seq: usize,
    train: bool,
) -> &'a mut Workspace<T> {
    let pos = cache
        .iter()
        .position(|w| w.shape.batch == batch && w.shape.seq == seq && w.train == train);
    let pos = match pos {
        Some(p) => p,
        None => {
            if cache.len() >= MAX_WORKSPACES {
                cache.remove(0);
            }
            cache.push(Workspace::new(model, batch, seq, train));
            cache.len() - 1
        }
    };
    &mut cache[pos]
}

impl<T: Real> Workspace<T> {
    fn new(model: &CpuModel<T>, batch: usize, seq: usize, train: bool) -> Self {
        let cfg = &model.cfg;
        let rows = batch * seq;
        let (n, v, inter) = (cfg.n_embd, cfg.padded_vocab_size, cfg.intermediate_size);
        let (h, g, hs) = (cfg.n_head, cfg.n_query_groups, cfg.head_size);
        let ln = cfg.norm == NormKind::LayerNorm;
        let z = |len: usize| vec![T::ZERO; len];
        let needs_rope = model
            .blocks
            .iter()
            .any(|b| matches!(&b.mixer, MixerKind::Attention(a) if a.rope));
        let layers = model
            .blocks
            .iter()
            .map(|block| {
                let mixer = match &block.mixer {
                    MixerKind::Attention(at) => {
                        let own_kv = at.kv_from.is_none();
                        let diff = at.diff.is_some();
                        MixerActs::Attention(AttnActs {
                            proj_in: z(rows * at.qkv.d_out),
                            q: z(rows * h * hs),
                            k: if own_kv { z(rows * g * hs) } else { Vec::new() },
                            v: if own_kv { z(rows * g * hs) } else { Vec::new() },
                            probs: z(batch * h * seq * seq),
                            o: z(rows * h * hs),
                            o2: if diff { z(rows * h * hs) } else { Vec::new() },
                            diff: if diff { z(rows * h * hs) } else { Vec::new() },
                            rstd: if diff { z(rows * h / 2) } else { Vec::new() },
                            y: z(rows * h * hs),
                            dk: if train && at.exports_kv {
                                z(rows * g * hs)
                            } else {
                                Vec::new()
                            },
                            dv: if train && at.exports_kv {
                                z(rows * g * hs)
                            } else {
                                Vec::new()
                            },
                        })
                    }
                    MixerKind::Mamba(_) => {
                        let m = cfg.mamba.expect("validated");
                        let (d, r, ns) = (m.d_inner, m.dt_rank, m.d_state);
                        MixerActs::Mamba(MambaActs {
                            x: z(rows * d),
                            z: z(rows * d),
                            xc_pre: z(rows * d),
                            xc: z(rows * d),
                            dtr: z(rows * r),
                            bm: z(rows * ns),
                            cm: z(rows * ns),
                            delta: z(rows * d),
                            y: z(rows * d),
                            gated: z(rows * d),
                        })
                    }
                    MixerKind::Gmu(gm) => MixerActs::Gmu(GmuActs {
                        g: z(rows * gm.in_proj.d_out),
                        h: z(rows * gm.in_proj.d_out),
                    }),
                };
                let mem_width = if block.mlp_exports_memory {
                    inter
                } else {
                    match &block.mixer {
                        MixerKind::Mamba(m) if m.export_memory => {
                            cfg.mamba.map_or(0, |d| d.d_inner)
                        }
                        MixerKind::Attention(a) if a.exports_memory => h * hs,
                        _ => 0,
                    }
                };
                LayerActs {
                    x_in: z(rows * n),
                    norm_1: NormActs::new(rows, n, ln),
                    mixer,
                    x_mid: z(rows * n),
                    norm_2: NormActs::new(rows, n, ln),
                    h1: z(rows * 2 * inter),
                    act: z(rows * inter),
                    mlp_mem: if block.mlp_exports_memory {
                        z(rows * inter)
                    } else {
                        Vec::new()
                    },
                    dmem: if train {
                        z(rows * mem_width)
                    } else {
                        Vec::new()
                    },
                }
            })
            .collect();
        Workspace {
            train,
            shape: Shape {
                batch,
                seq,
                varlen: cfg.varlen,
                seg_start: if cfg.varlen {
                    vec![0; rows]
                } else {
                    Vec::new()
                },
                rope: match (needs_rope, cfg.rope_base) {
                    (true, Some(base)) => Some(RopeTable::new(seq, hs, base)),
                    _ => None,
                },
            },
            tokens: vec![0; rows],
            targets: vec![0; rows],
            layers,
            x_out: z(rows * n),
            branch: z(rows * n),
            ln_f: NormActs::new(rows, n, ln),
            scaled: z(rows * n),
            logits: z(rows * v),
            losses: z(rows),
            scratch: Scratch {
                bufs: HashMap::new(),
            },
        }
    }

    /// Splits `rows` (each `seq + 1` tokens) into inputs and targets, and computes the
    /// document starts when `eos` is given (varlen).
    fn load_rows(&mut self, rows: &[u32], batch: usize, seq: usize, eos: Option<u32>) {
        for (b, row) in rows.chunks(seq + 1).take(batch).enumerate() {
            self.tokens[b * seq..(b + 1) * seq].copy_from_slice(&row[..seq]);
            self.targets[b * seq..(b + 1) * seq].copy_from_slice(&row[1..]);
        }
        if let Some(eos) = eos {
            segment_starts(&self.tokens, seq, eos, &mut self.shape.seg_start);
        }
    }
}
