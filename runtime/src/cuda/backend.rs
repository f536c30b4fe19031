//! `CudaBackend`: a Plan's pre-norm blocks (RMSNorm; an attention mixer — full or
//! sliding-window GQA with optional RoPE, `attention.rs` — or, experimental, a Mamba-1
//! mixer, `mamba.rs`; SwiGLU MLP) on one GPU, or one rank of several (`sharding.rs`: data
//! parallel, ZeRO-1, ZeRO-3, hybrid shard).
//!
//! Precision as ArchScale's bf16 autocast: fp32 master weights, gradients and AdamW state;
//! fp32 embedding and residual stream; norm outputs, matmul operands and outputs, attention
//! and logits in bf16; fp32 accumulation everywhere. All memory is allocated once.
//!
//! Saved for backward per layer: the fp32 residual at the layer input and mid-point, the
//! mixer's activations (attention: fused QKV after RoPE, output and log-sum-exp; Mamba: see
//! `mamba.rs`), the MLP up-projection `gu`. Norm outputs and `silu(g)·u` are recomputed in
//! the backward pass.

use crate::backend::OptimizerShard;
use crate::distributed::flat_layout::{CompactState, FlatLayout};
use crate::distributed::nccl::NcclComm;
use crate::optim::adamw::AdamWHyper;
use crate::{Backend, OptimizerState, Result, RuntimeError};
use archscale_compiler::plan::Sharding;
use archscale_compiler::plan::{Mixer, MlpKind, NormKind, OptimizerKind, Plan};
use archscale_kernels::cublaslt::{Lt, OutType, WeightGrad};
use archscale_kernels::ops::{
    AttnLayout, HybridOps, KvGradMode, Ops, OptChunkTables, Rows, ScanGrads, ScanShape, ScanTensors,
};
use archscale_kernels::{DeviceBuffer, Gpu};
use cudarc::driver::CudaStream;
use std::cell::Cell;
use std::rc::Rc;
use std::sync::Arc;

mod attention;
mod diff_attention;
mod gmu;
mod mamba;
mod muon;
mod sharding;

use diff_attention::{DiffParams, DiffSaved, DiffScratch};
use gmu::GmuParams;
use mamba::{MambaParams, MambaSaved, MambaScratch};
use muon::MuonState;
use sharding::Zero3Slots;

fn err(msg: impl Into<String>) -> RuntimeError {
    RuntimeError::Message(msg.into())
}

/// Model dimensions the kernels need.
#[derive(Clone, Debug)]
pub struct Dims {
    pub batch: usize,
    pub seq: usize,
    pub n: usize,
    pub heads: usize,
    pub groups: usize,
    pub hs: usize,
    pub inner: usize,
    pub vocab: usize,
    pub padded_vocab: usize,
    pub layers: usize,
    pub eps: f32,
    pub residual_scale: f32,
    pub logit_scale: f32,
    pub attn_scale: f32,
    pub smoothing: f32,
    pub windows: Vec<usize>,
    pub rope: Vec<bool>,
    pub rope_base: f64,
    pub mixers: Vec<LayerKind>,
    /// Per layer: YOCO and GMU wiring, differential attention.
    pub info: Vec<LayerInfo>,
    pub mamba: Option<MambaShape>,
    /// LayerNorm (weight and bias) instead of RMSNorm.
    pub layer_norm: bool,
    /// Biases on the MLP and GMU linears.
    pub bias: bool,
    /// Bias on the QKV (or Q-only) projection.
    pub attn_bias: bool,
    /// Bias on the attention output projection.
    pub attn_out_bias: bool,
    /// Document masking from `eos` (arch-spec §4.3): attention, conv and scan never look
    /// before the document's start.
    pub varlen: bool,
    pub eos: u32,
}

impl Dims {
    fn qkv_width(&self) -> usize {
        (self.heads + 2 * self.groups) * self.hs
    }
    fn attn_width(&self) -> usize {
        self.heads * self.hs
    }
    /// Width of layer `l`'s QKV projection output (Q only for cross-attention).
    fn proj_in_width(&self, l: usize) -> usize {
        if self.info[l].kv_from.is_some() {
            self.attn_width()
        } else {
            self.qkv_width()
        }
    }
    fn any_diff(&self) -> bool {
        self.info.iter().any(|i| i.lambda_init.is_some())
    }
    fn any_cross(&self) -> bool {
        self.info.iter().any(|i| i.kv_from.is_some())
    }
    /// Widest exported GMU memory (0 when no layer exports one).
    fn max_memory(&self) -> usize {
        self.info
            .iter()
            .filter_map(|i| i.memory.map(|m| m.1))
            .max()
            .unwrap_or(0)
    }
    /// Needs the hybrid kernels (Mamba, LayerNorm, GMU, differential attention, biases).
    fn needs_hybrid(&self) -> bool {
        self.mamba.is_some()
            || self.layer_norm
            || self.bias
            || self.attn_bias
            || self.attn_out_bias
            || self.mixers.contains(&LayerKind::Gmu)
            || self.any_diff()
    }
}

/// Where a layer's exported GMU memory lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemorySource {
    /// Mamba scan output before the z gate, `[rows, d_inner]`.
    Mamba,
    /// Attention output before `proj`, `[rows, H·hs]`.
    Attention,
    /// The MLP up-half `u` of `w1`'s output, `[rows, I]` (row stride 2I).
    Mlp,
}

/// Per-layer wiring beyond the mixer kind.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LayerInfo {
    /// Cross-attention: the layer whose K/V this layer reads.
    pub kv_from: Option<usize>,
    /// Later cross-attention layers read this layer's K/V.
    pub exports_kv: bool,
    /// Differential attention's λ_init.
    pub lambda_init: Option<f64>,
    /// The GMU memory this layer exports, and its width.
    pub memory: Option<(MemorySource, usize)>,
    /// GMU layers: the layer whose memory they read.
    pub memory_from: Option<usize>,
}

/// Offsets (in elements of the flat parameter buffer) of one block's tensors.
#[derive(Clone, Copy, Debug)]
struct LayerParams {
    norm1: Norm,
    /// Attention layers only (Q-only for cross-attention).
    qkv: usize,
    qkv_b: Option<usize>,
    proj: usize,
    proj_b: Option<usize>,
    norm2: Norm,
    w1: usize,
    w1_b: Option<usize>,
    w3: usize,
    w3_b: Option<usize>,
    mamba: Option<MambaParams>,
    gmu: Option<GmuParams>,
    diff: Option<DiffParams>,
}

/// A norm's weight and (LayerNorm) bias offsets.
#[derive(Clone, Copy, Debug)]
struct Norm {
    w: usize,
    b: Option<usize>,
}

/// The mixer of one layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerKind {
    Attention,
    Mamba,
    Gmu,
}

/// Mamba-1 sizes: `d` = d_inner, `r` = dt_rank, padded to `rp` (a multiple of 8, so every
/// operand row of the x_proj and dt_proj products starts 16-byte aligned), `ns` = d_state;
/// `xs` = rp + 2·ns, the row stride of x_proj's output `[dt | zeros | B | C]` and its
/// gradient.
#[derive(Clone, Copy, Debug)]
pub struct MambaShape {
    pub d: usize,
    pub r: usize,
    pub rp: usize,
    pub ns: usize,
    pub xs: usize,
}

/// Per-layer saved activations (device pointers; 0 where a layer has none).
#[derive(Clone, Copy, Debug)]
struct Saved {
    mamba: Option<MambaSaved>,
    /// Attention: QKV (or Q) projection output; GMU: `in_proj` output.
    qkv: u64,
    /// Attention: its output before `proj`; GMU: the gate's output before `out_proj`.
    y: u64,
    lse: u64,
    gu: u64,
    rstd1: u64,
    rstd2: u64,
    /// LayerNorm means.
    mean1: u64,
    mean2: u64,
    /// Mamba memory exporters: the pre-gate scan output.
    mem_y: u64,
    /// Memory exporters: fp32 gradient of the memory, summed over the GMU layers.
    dmem: u64,
    diff: Option<DiffSaved>,
}

/// How parameters, gradients and optimizer state are spread over the ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShardMode {
    /// Every rank holds everything (single GPU, or plain data parallel).
    Replicated,
    /// Optimizer state sharded; gradients reduce-scattered, parameters all-gathered.
    Zero1,
    /// Parameters, gradients and optimizer state sharded; each unit's parameters are
    /// gathered just before use and its gradients reduce-scattered right after.
    Zero3,
}

/// Scratch of the cross-layer gradients (YOCO K/V, GMU memory).
#[derive(Clone, Copy, Debug, Default)]
struct CrossScratch {
    /// fp32 `[rows, qkv_width]`: the K/V gradient of the exporting layer, summed over the
    /// cross-attention layers reading it (the K/V columns only; Q's are never read).
    kv_acc: u64,
    /// bf16 `[rows, H·hs]`: a cross layer's dQ.
    dq: u64,
    /// bf16 `[rows, max memory width]`: a memory gradient rounded for the GEMMs / scan.
    dmem_bf: u64,
    /// GMU: the gate output's gradient and the `in_proj` output's gradient (bf16
    /// `[rows, d_mem]`; the gate output itself is saved per layer, `Saved::y`).
    gmu_dh: u64,
    gmu_dg: u64,
}
pub struct CudaBackend {
    gpu: Arc<Gpu>,
    ops: Ops,
    lt: Lt,
    plan: Plan,
    pub dims: Dims,
    /// Where each parameter lives in the flat buffers, and this rank's share of them.
    layout: FlatLayout,
    pub mode: ShardMode,
    /// Element offset of each plan parameter in the flat buffers (tied tensors share).
    offsets: Vec<usize>,
    numel: usize,
    layer_params: Vec<LayerParams>,
    wte: usize,
    ln_f: Norm,
    head: usize,
    step: u64,
    /// Token capacity of the per-layer buffers (rows·seq) and of layer 0 / logits.
    cap_train: usize,
    cap_eval: usize,
    // flat parameter state
    params: DeviceBuffer,
    params_bf: DeviceBuffer,
    grads: DeviceBuffer,
    exp_avg: DeviceBuffer,
    /// AdamW's second moments, compact: slots for AdamW's tensors only (Muon matrices
    /// keep one moment, in `exp_avg`); `second` maps local elements to them.
    exp_avg_sq: DeviceBuffer,
    second: CompactState,
    chunk_off: DeviceBuffer,
    chunk_len: DeviceBuffer,
    chunk_group: DeviceBuffer,
    /// Per item: where its gradient starts when held in bf16 (−1: fp32).
    chunk_gbf: DeviceBuffer,
    /// Per item: where its second moments start in `exp_avg_sq`.
    chunk_voff: DeviceBuffer,
    /// Per unit: its AdamW work items in the chunk tables.
    unit_chunks: Vec<UnitChunks>,
    hyper: DeviceBuffer,
    /// Muon groups' matrices, kernels and scratch (None without Muon groups).
    muon: Option<MuonState>,
    zero3: Option<Zero3Slots>,
    // activations
    residual: Vec<DeviceBuffer>, // 2L+1 fp32 [cap, n]; index 0 has eval capacity
    saved: Vec<Saved>,
    /// Layer whose saved buffers evaluation uses for layer `l` (the first of its kind).
    eval_saved: Vec<usize>,
    mamba_scratch: Option<MambaScratch>,
    cross: CrossScratch,
    diff: Option<DiffScratch>,
    /// Mamba / hybrid kernels, loaded only for models that have such layers.
    hops: Option<HybridOps>,
    _saved_bufs: Vec<DeviceBuffer>,
    rstd_f: DeviceBuffer,
    mean_f: DeviceBuffer,
    hf: DeviceBuffer,
    logits: DeviceBuffer,
    losses: DeviceBuffer,
    tokens: DeviceBuffer,
    targets: DeviceBuffer,
    /// Varlen: i32 document start of every input token within its row.
    seg: DeviceBuffer,
    rope_cos: DeviceBuffer,
    rope_sin: DeviceBuffer,
    rope_len: usize,
    // scratch
    h: DeviceBuffer,
    a: DeviceBuffer,
    dres: DeviceBuffer,
    dres_bf: DeviceBuffer,
    dy: DeviceBuffer,
    dqkv: DeviceBuffer,
    dq_acc: DeviceBuffer,
    delta: DeviceBuffer,
    norm_out: DeviceBuffer,
    /// When set, `mark` records a device event before each op (see `profile_step`).
    prof: std::cell::RefCell<Option<Vec<(&'static str, archscale_kernels::gpu::Event)>>>,
    /// Data parallel: gradients are summed over ranks before the norm / optimizer step.
    comm: Option<Rc<NcclComm>>,
    /// The ranks parameters, gradients and optimizer state are sharded over: `comm`, or
    /// under hybrid shard the GPUs of this node.
    shard_comm: Option<Rc<NcclComm>>,
    /// Hybrid shard: this rank's counterparts on the other nodes (same chunk).
    replica_comm: Option<NcclComm>,
    /// Gradient reductions run here, overlapped with the rest of the backward pass.
    comm_stream: Option<Arc<CudaStream>>,
    /// Reduce gradients during the next backward (the last micro-step of a step).
    sync_grads: bool,
    grads_reduced: Cell<bool>,
    /// cuBLASLt candidates timed per product shape (`ARCHSCALE_GEMM_TUNE=N`, N rounds);
    /// off by default: the heuristic's first choice.
    gemm_tune: Option<usize>,
    /// Whether the discarded pass that also tunes the weight-gradient products has run.
    gemm_tuned_all: bool,
    /// An optimizer step zeroes only the gradients that kernels add to; the ones that
    /// weight-gradient products write first ([`ParamMap::gemm_written`]) are overwritten
    /// by those products in the next backward pass (beta 0, [`Self::dw_beta`]). Replicated
    /// modes only (ZeRO-1 clears the other ranks' partial sums with one memset anyway, and
    /// ZeRO-3's gradient slots are rebuilt per unit); `ARCHSCALE_GRAD_OVERWRITE=0` turns it
    /// off (AdamW zeroes every gradient, the products add to them).
    overwrite_grads: bool,
    /// The overwritten gradients still hold the last step's values, which the next backward
    /// replaces; every gradient is zero as far as a reader is concerned.
    grads_stale: Cell<bool>,
    /// The MLP's and every mixer's output products (attention, Mamba, GMU) write their
    /// branch in bf16 to `h`, and the next RMSNorm adds it to the residual stream
    /// (`Ops::rmsnorm_fwd_add`) instead of the product's epilogue reading and writing the fp32
    /// stream. RMSNorm models without output biases at widths the register kernels take;
    /// `ARCHSCALE_RESIDUAL_ADD=gemm` keeps the epilogue.
    residual_in_norm: bool,
    /// One micro-step per optimizer step: the weight-gradient products write the gradients
    /// of `bf16_grads` (offsets, sorted) in bf16, into the first half of each tensor's fp32
    /// slot, which is what ArchScale's autocast products hand its optimizer; AdamW and the
    /// grad norm read them there. Halves those products' output bytes and the two reads.
    /// With one replica, AdamW only and gradient overwrite on; `ARCHSCALE_WEIGHT_GRAD=f32`
    /// keeps them in fp32.
    weight_grads_bf16: bool,
    /// Whether this backend may hold them so (what `weight_grads_bf16` needs beyond the
    /// plan's single micro-step).
    weight_grads_bf16_able: bool,
    bf16_grads: Vec<usize>,
    /// A backward pass ran since the last optimizer step.
    micro_step_pending: Cell<bool>,
}

/// One unit's AdamW work items: `count` from `first` in the chunk tables, of which the
/// first `zeroed` hold gradients that kernels add to (the others are overwritten by
/// weight-gradient products).
#[derive(Clone, Copy, Debug)]
struct UnitChunks {
    first: usize,
    count: usize,
    zeroed: usize,
}

/// A two-way setting read from the environment: unset or `on` gives true, `off` false,
/// anything else is an error naming both.
fn env_switch(var: &str, on: &str, off: &str) -> Result<bool> {
    match std::env::var(var) {
        Err(_) => Ok(true),
        Ok(v) if v == on => Ok(true),
        Ok(v) if v == off => Ok(false),
        Ok(other) => Err(err(format!(
            "{var}={other}: expected `{on}` (default) or `{off}`"
        ))),
    }
}

/// Rounds per candidate algorithm when tuning cuBLASLt (`ARCHSCALE_GEMM_TUNE=N`); unset,
/// `off` or `0` keeps the heuristic's first choice. Off by default: on an H200 at its power
/// cap the tuned Transformer++ d8/d16 steps were no faster (bench/NOTES.md, 2026-11-29),
/// and the heuristic's choice is the same on every run.
fn gemm_tune_reps() -> Option<usize> {
    match std::env::var("ARCHSCALE_GEMM_TUNE").as_deref() {
        Ok("off") | Ok("0") | Err(_) => None,
        Ok(v) => v.parse().ok().or(Some(10)),
    }
}

const BF: usize = 2;
const F32: usize = 4;

/// Checks that `plan` is a model this backend runs, and extracts its dimensions.
pub fn dims_of(plan: &Plan) -> Result<Dims> {
    let m = &plan.model;
    if m.mlp != MlpKind::Swiglu {
        return Err(err("CUDA backend: only SwiGLU MLPs are supported"));
    }
    if !m.n_head.is_multiple_of(m.n_query_groups) {
        return Err(err(
            "CUDA backend: n_head must be a multiple of n_query_groups",
        ));
    }
    if m.head_size != 64 && m.head_size != 128 {
        return Err(err(format!(
            "CUDA backend: flash attention supports head sizes 64 and 128, not {}",
            m.head_size
        )));
    }
    let layer_norm = m.norm == NormKind::LayerNorm;
    if layer_norm && m.n_embd > 6144 {
        return Err(err(format!(
            "CUDA backend: the LayerNorm backward kernel takes widths up to 6144, not {}",
            m.n_embd
        )));
    }
    let (mut windows, mut rope, mut mixers, mut info) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for l in &plan.layers {
        let mut li = LayerInfo {
            kv_from: None,
            exports_kv: false,
            lambda_init: None,
            memory: None,
            memory_from: None,
        };
        let (kind, window, r) = match &l.mixer {
            Mixer::Attention(a) => {
                li.kv_from = a.kv_from;
                li.exports_kv = a.exports_kv;
                li.lambda_init = a.differential.map(|d| d.lambda_init);
                if a.exports_memory {
                    li.memory = Some((MemorySource::Attention, m.n_head * m.head_size));
                }
                if let Some(src) = a.kv_from {
                    let ok = src < l.index
                        && matches!(&plan.layers[src].mixer, Mixer::Attention(p) if p.exports_kv && p.kv_from.is_none());
                    if !ok {
                        return Err(err(format!(
                            "CUDA backend: layer {} reads K/V from layer {src}, which is not an earlier attention layer exporting its K/V",
                            l.index
                        )));
                    }
                    if a.rope {
                        return Err(err(format!(
                            "CUDA backend: layer {} is cross-attention with RoPE, which is not built (YOCO families are NoPE)",
                            l.index
                        )));
                    }
                }
                if a.differential.is_some()
                    && (!m.n_head.is_multiple_of(2) || !m.n_query_groups.is_multiple_of(2))
                {
                    return Err(err(format!(
                        "CUDA backend: layer {}: differential attention needs even heads and KV groups, got {} and {}",
                        l.index, m.n_head, m.n_query_groups
                    )));
                }
                (LayerKind::Attention, a.window.unwrap_or(0), a.rope)
            }
            Mixer::Mamba(mp) => {
                if mp.export_memory {
                    let d_inner = m.mamba.map_or(0, |md| md.d_inner);
                    li.memory = Some((MemorySource::Mamba, d_inner));
                }
                (LayerKind::Mamba, 0, false)
            }
            Mixer::Gmu(g) => {
                if g.gated_norm {
                    return Err(err(format!(
                        "CUDA backend: layer {}: the gated-RMSNorm GMU (Mamba-2 / Gated DeltaNet memory) is plan-only",
                        l.index
                    )));
                }
                let src = g.memory_from;
                let exported = if src < info.len() {
                    let si: &LayerInfo = &info[src];
                    si.memory
                } else {
                    None
                };
                match exported {
                    Some((_, w)) if w == g.d_mem => {}
                    _ => {
                        return Err(err(format!(
                            "CUDA backend: layer {} reads GMU memory of width {} from layer {src}, which is not an earlier layer exporting memory of that width",
                            l.index, g.d_mem
                        )))
                    }
                }
                li.memory_from = Some(src);
                (LayerKind::Gmu, 0, false)
            }
            other => {
                let kind = match other {
                    Mixer::Mamba2 { .. } => "mamba2",
                    Mixer::GatedDeltaNet { .. } => "gated_deltanet",
                    _ => "unknown",
                };
                return Err(err(format!(
                    "CUDA backend: layer {} mixer `{kind}` is plan-only (attention, Mamba-1 and GMU run)",
                    l.index
                )));
            }
        };
        if l.mlp_exports_memory {
            // the MLP's export wins: it is computed later in the block (as the CPU model)
            li.memory = Some((MemorySource::Mlp, m.intermediate_size));
        }
        windows.push(window);
        rope.push(r);
        mixers.push(kind);
        info.push(li);
    }
    let mamba = if mixers.contains(&LayerKind::Mamba) {
        let md = m
            .mamba
            .ok_or_else(|| err("CUDA backend: a Mamba layer but the model has no Mamba sizes"))?;
        if md.d_state != archscale_kernels::ops::SCAN_D_STATE || md.d_conv != 4 {
            return Err(err(format!(
                "CUDA backend: the Mamba kernels take d_state {} and d_conv 4, this model has {} and {}",
                archscale_kernels::ops::SCAN_D_STATE,
                md.d_state,
                md.d_conv
            )));
        }
        if md.d_inner % 8 != 0 || md.dt_rank == 0 {
            return Err(err(format!(
                "CUDA backend: Mamba d_inner {} must be a multiple of 8",
                md.d_inner
            )));
        }
        Some(MambaShape {
            d: md.d_inner,
            r: md.dt_rank,
            rp: md.dt_rank.div_ceil(8) * 8,
            ns: md.d_state,
            xs: md.dt_rank.div_ceil(8) * 8 + 2 * md.d_state,
        })
    } else {
        None
    };
    if rope.iter().any(|&r| r) && m.rope_base.is_none() {
        return Err(err(
            "CUDA backend: a layer asks for RoPE but the model has no rope_base",
        ));
    }
    for g in &plan.optimizer.groups {
        if !matches!(g.optimizer, OptimizerKind::AdamW | OptimizerKind::Muon) {
            return Err(err(format!(
                "CUDA backend: optimizer {:?} (group `{}`) is not built yet; AdamW and Muon only",
                g.optimizer, g.name
            )));
        }
    }
    Ok(Dims {
        batch: plan.layout.micro_batch,
        seq: plan.layout.seq_len,
        n: m.n_embd,
        heads: m.n_head,
        groups: m.n_query_groups,
        hs: m.head_size,
        inner: m.intermediate_size,
        vocab: m.vocab_size,
        padded_vocab: m.padded_vocab_size,
        layers: m.n_layer,
        eps: m.norm_eps as f32,
        residual_scale: m.residual_scale as f32,
        logit_scale: m.logit_scale as f32,
        attn_scale: m.attn_scale as f32,
        smoothing: plan.training.label_smoothing as f32,
        windows,
        rope,
        rope_base: m.rope_base.unwrap_or(10000.0),
        mamba,
        mixers,
        info,
        layer_norm,
        bias: m.bias,
        attn_bias: m.attn_bias,
        attn_out_bias: m.attn_out_bias,
        varlen: m.varlen,
        eos: m.eos_token_id,
    })
}

/// Device bytes [`CudaBackend::with_comm`] allocates through `Gpu::alloc` for `plan` on rank
/// 0 of its layout (`plan.layout.world` ranks, `plan.layout.sharding`; one rank replicates),
/// NCCL's scratch included. Every buffer is allocated once, so this is the backend's peak
/// (`peak_bytes`). It mirrors `with_comm` buffer by buffer and must change with it;
/// `archscale_compiler::estimates::plan_memory` computes the same from the Plan alone
/// (runtime/tests/planned_memory.rs holds the two together).
pub fn planned_bytes(plan: &Plan) -> Result<usize> {
    let d = dims_of(plan)?;
    let l = &plan.layout;
    let hybrid_nodes = l.sharding == Sharding::HybridShard && l.nodes > 1;
    let (shards, zero3) = match l.sharding {
        _ if l.world <= 1 => (1, false),
        Sharding::DataParallel => (1, false),
        Sharding::Zero1 => (l.world, false),
        Sharding::Zero3 => (l.world, true),
        Sharding::HybridShard if hybrid_nodes => (l.gpus_per_node, true),
        Sharding::HybridShard => (l.world, true),
    };
    let layout = FlatLayout::new(plan, shards, 0)?;
    let mut total = 0usize;
    let mut add = |bytes: usize| total += bytes.max(1).div_ceil(256) * 256;

    // cuBLASLt workspace; NCCL's scratch per communicator
    add(archscale_kernels::cublaslt::WORKSPACE_BYTES);
    if l.world > 1 {
        for _ in 0..if hybrid_nodes { 3 } else { 1 } {
            add(64 * 8);
        }
    }
    // flat parameter state
    let (numel, local) = (layout.numel, layout.local_len);
    let owned = if zero3 { local } else { numel };
    add(owned * F32);
    add(if zero3 { 64 } else { numel } * BF);
    add(owned * F32);
    add(local * F32);
    let has_second = |i: usize| !muon::is_muon(plan, i);
    add(layout.compact_state_len(&has_second) * F32);
    let adamw = |g: usize| plan.optimizer.groups[g].optimizer == OptimizerKind::AdamW;
    let items = (0..layout.units.len())
        .map(|u| {
            layout
                .opt_chunks(u)
                .iter()
                .filter(|c| adamw(c.group))
                .count()
        })
        .sum::<usize>()
        .max(1);
    add(items * 8);
    add(items * 4);
    add(items * 4);
    add(items * 8);
    add(items * 8);
    add(8 * F32 * plan.optimizer.groups.len().max(1));
    let muon = muon::planned_scratch_bytes(plan);
    if muon > 0 {
        add(muon);
    }
    if zero3 {
        let head = layout.unit_of_param[plan
            .params
            .iter()
            .position(|p| p.name == "lm_head.weight")
            .unwrap_or(0)];
        let tied = plan
            .params
            .iter()
            .any(|p| p.aliases.iter().any(|a| a == "transformer.wte.weight"));
        let embed_unit = tied.then_some(head);
        let e_len = embed_unit.map_or(64, |u| layout.units[u].len);
        let l_len = (0..layout.units.len())
            .filter(|&u| Some(u) != embed_unit)
            .map(|u| layout.units[u].len)
            .max()
            .unwrap_or(64);
        for len in [e_len, l_len] {
            add(len * F32);
            add(len * BF);
            add(len * F32);
        }
    }

    // activations: training capacity, and evaluation capacity for residual 0, the head and
    // the first layer of each buffer class
    let ct = d.batch * d.seq;
    let val_len = plan.data.val_block_size.saturating_sub(1);
    let ce = ct.max(val_len);
    for i in 0..2 * d.layers + 1 {
        add(if i == 0 { ce } else { ct } * d.n * F32);
    }
    let class = |l: usize| {
        let i = &d.info[l];
        let own = i.exports_kv || i.memory.is_some();
        (
            d.mixers[l],
            i.kv_from.is_some(),
            i.lambda_init.is_some(),
            i.memory_from.map(|s| d.info[s].memory.map_or(0, |m| m.1)),
            own.then_some(l),
        )
    };
    let ln = d.layer_norm;
    for l in 0..d.layers {
        let first = (0..=l).find(|&k| class(k) == class(l)) == Some(l);
        let cap = if first { ce } else { ct };
        let info = d.info[l];
        let buf = |bytes: usize| bytes.max(64);
        add(buf(cap * 2 * d.inner * BF));
        add(buf(cap * F32));
        add(buf(cap * F32));
        if ln {
            add(buf(cap * F32));
            add(buf(cap * F32));
        }
        if let Some((_, w)) = info.memory {
            add(buf(ct * w * F32));
        }
        match (d.mixers[l], d.mamba) {
            (LayerKind::Mamba, Some(ms)) => {
                let ckpt = archscale_kernels::ops::ScanShape {
                    batch: d.batch,
                    seq: d.seq,
                    d_inner: ms.d,
                }
                .ckpt_len();
                for bytes in [
                    cap * 2 * ms.d * BF,
                    cap * ms.d * BF,
                    cap * ms.xs * BF,
                    cap * ms.d * BF,
                    cap * ms.d * BF,
                    ckpt * F32,
                ] {
                    add(buf(bytes));
                }
                if matches!(info.memory, Some((MemorySource::Mamba, _))) {
                    add(buf(cap * ms.d * BF));
                }
            }
            (LayerKind::Gmu, _) => {
                let dm = info
                    .memory_from
                    .and_then(|s| d.info[s].memory)
                    .map_or(0, |m| m.1);
                add(buf(cap * dm * BF));
                add(buf(cap * dm * BF));
            }
            _ => {
                let fh = if info.lambda_init.is_some() { 2 } else { 1 } * d.heads;
                add(buf(cap * d.proj_in_width(l) * BF));
                add(buf(cap * d.attn_width() * BF));
                add(buf(cap * fh * F32));
                if info.lambda_init.is_some() {
                    add(buf(cap * fh * d.hs * BF));
                    add(buf(cap * d.heads / 2 * F32));
                    add(buf(4 * F32));
                }
            }
        }
    }
    // head
    add(ce * F32);
    add(if ln { ce * F32 } else { 64 });
    add(ce * d.n * BF);
    add(ce * d.padded_vocab * BF);
    add(ce * F32);
    add(ce * 4);
    add(ce * 4);
    add(if d.varlen { ce * 4 } else { 64 });
    let rope_len = d.seq.max(val_len);
    add(rope_len * (d.hs / 2) * BF);
    add(rope_len * (d.hs / 2) * BF);
    // scratch
    add(ce * d.n * BF);
    add(ce * d.inner * BF);
    add(ct * d.n * F32);
    add(ct * d.n * BF);
    add(ct * d.attn_width() * BF);
    add(ct * d.qkv_width() * BF);
    add(ct * d.attn_width() * F32);
    add(ct * d.heads * F32);
    add(8);
    if let Some(ms) = d.mamba {
        for bytes in [
            ct * 2 * ms.d * BF,
            ct * ms.d * BF,
            ct * ms.d * BF,
            ct * ms.xs * BF,
            ct * 2 * ms.ns * F32,
            ct * ms.d * BF,
            ms.xs * ms.d * BF,
            ms.d * ms.rp * BF,
        ] {
            add(bytes);
        }
    }
    if d.any_cross() {
        add(ct * d.qkv_width() * F32);
        add(ct * d.attn_width() * BF);
    }
    let mem = d.max_memory();
    if mem > 0 {
        add(ct * mem * BF);
        add(ct * mem * BF);
        add(ct * mem * BF);
    }
    if d.any_diff() {
        let (aw, kv) = (d.attn_width(), 2 * d.groups * d.hs);
        add((7 * d.heads + 4 * d.groups) * 4);
        for bytes in [2 * aw * BF, kv * BF, kv * BF, aw * BF, aw * BF] {
            add(ce * bytes);
        }
        for bytes in [
            aw * BF,
            aw * BF,
            2 * aw * BF,
            2 * aw * BF,
            kv * BF,
            kv * BF,
            2 * aw * F32,
            2 * d.heads * F32,
        ] {
            add(ct * bytes);
        }
    }
    Ok(total)
}

/// Where each tensor the layers use sits in the flat buffers.
struct ParamMap {
    layers: Vec<LayerParams>,
    wte: usize,
    ln_f: Norm,
    head: usize,
}

/// Looks up every tensor of `plan` the model uses (element offsets from `offsets`, plan
/// order); the plan must hold no other.
fn param_map(plan: &Plan, d: &Dims, offsets: &[usize]) -> Result<ParamMap> {
    let used = std::cell::RefCell::new(std::collections::BTreeSet::new());
    let take = |name: &str, shape: &[usize]| -> Result<usize> {
        let i = plan
            .params
            .iter()
            .position(|p| p.name == name || p.aliases.iter().any(|a| a == name))
            .ok_or_else(|| err(format!("CUDA backend: plan has no parameter `{name}`")))?;
        if plan.params[i].shape != shape {
            return Err(err(format!(
                "CUDA backend: `{name}` has shape {:?}, expected {shape:?}",
                plan.params[i].shape
            )));
        }
        used.borrow_mut().insert(i);
        Ok(offsets[i])
    };
    let take_if = |on: bool, name: &str, shape: &[usize]| -> Result<Option<usize>> {
        if on {
            take(name, shape).map(Some)
        } else {
            Ok(None)
        }
    };
    let norm = |pre: &str| -> Result<Norm> {
        Ok(Norm {
            w: take(&format!("{pre}.weight"), &[d.n])?,
            b: take_if(d.layer_norm, &format!("{pre}.bias"), &[d.n])?,
        })
    };
    let mut layer_params = Vec::new();
    for i in 0..d.layers {
        let pre = format!("transformer.h.{i}");
        let a = format!("{pre}.attn");
        let (n, hs) = (d.n, d.hs);
        let mut lp = LayerParams {
            norm1: norm(&format!("{pre}.norm_1"))?,
            qkv: 0,
            qkv_b: None,
            proj: 0,
            proj_b: None,
            norm2: norm(&format!("{pre}.norm_2"))?,
            w1: take(&format!("{pre}.mlp.w1.weight"), &[2 * d.inner, n])?,
            w1_b: take_if(d.bias, &format!("{pre}.mlp.w1.bias"), &[2 * d.inner])?,
            w3: take(&format!("{pre}.mlp.w3.weight"), &[n, d.inner])?,
            w3_b: take_if(d.bias, &format!("{pre}.mlp.w3.bias"), &[n])?,
            mamba: None,
            gmu: None,
            diff: None,
        };
        match (d.mixers[i], d.mamba) {
            (LayerKind::Mamba, Some(ms)) => {
                let (dd, r, ns) = (ms.d, ms.r, ms.ns);
                lp.mamba = Some(MambaParams {
                    in_proj: take(&format!("{a}.in_proj.weight"), &[2 * dd, n])?,
                    conv_w: take(&format!("{a}.conv1d.weight"), &[dd, 1, 4])?,
                    conv_b: take(&format!("{a}.conv1d.bias"), &[dd])?,
                    x_proj: take(&format!("{a}.x_proj.weight"), &[r + 2 * ns, dd])?,
                    dt_w: take(&format!("{a}.dt_proj.weight"), &[dd, r])?,
                    dt_b: take(&format!("{a}.dt_proj.bias"), &[dd])?,
                    a_log: take(&format!("{a}.A_log"), &[dd, ns])?,
                    d_skip: take(&format!("{a}.D"), &[dd])?,
                    out_proj: take(&format!("{a}.out_proj.weight"), &[n, dd])?,
                });
            }
            (LayerKind::Gmu, _) => {
                let src = d.info[i].memory_from.unwrap_or(0);
                let dm = d.info[src].memory.map_or(0, |m| m.1);
                let g = format!("{a}.gmu");
                lp.gmu = Some(GmuParams {
                    in_proj: take(&format!("{g}.in_proj.weight"), &[dm, n])?,
                    in_b: take_if(d.bias, &format!("{g}.in_proj.bias"), &[dm])?,
                    out_proj: take(&format!("{g}.out_proj.weight"), &[n, dm])?,
                    out_b: take_if(d.bias, &format!("{g}.out_proj.bias"), &[n])?,
                });
            }
            _ => {
                let qw = d.proj_in_width(i);
                lp.qkv = take(&format!("{a}.attn.weight"), &[qw, n])?;
                lp.qkv_b = take_if(d.attn_bias, &format!("{a}.attn.bias"), &[qw])?;
                lp.proj = take(&format!("{a}.proj.weight"), &[n, d.attn_width()])?;
                lp.proj_b = take_if(d.attn_out_bias, &format!("{a}.proj.bias"), &[n])?;
                if let Some(lambda_init) = d.info[i].lambda_init {
                    lp.diff = Some(DiffParams {
                        q1: take(&format!("{a}.da.lambda_q1"), &[hs])?,
                        k1: take(&format!("{a}.da.lambda_k1"), &[hs])?,
                        q2: take(&format!("{a}.da.lambda_q2"), &[hs])?,
                        k2: take(&format!("{a}.da.lambda_k2"), &[hs])?,
                        subln: take(&format!("{a}.da.subln.weight"), &[2 * hs])?,
                        lambda_init,
                    });
                }
            }
        }
        layer_params.push(lp);
    }
    let wte = take("transformer.wte.weight", &[d.padded_vocab, d.n])?;
    let ln_f = norm("transformer.ln_f")?;
    let head = take("lm_head.weight", &[d.padded_vocab, d.n])?;
    let known = used.borrow().len();
    if plan.params.len() != known {
        let names: Vec<&str> = plan
            .params
            .iter()
            .enumerate()
            .filter(|(i, _)| !used.borrow().contains(i))
            .map(|(_, p)| p.name.as_str())
            .collect();
        return Err(err(format!(
            "CUDA backend: the plan has parameters this model does not use: {}",
            names.join(", ")
        )));
    }
    Ok(ParamMap {
        layers: layer_params,
        wte,
        ln_f,
        head,
    })
}

impl ParamMap {
    /// Offsets of the tensors whose gradient the backward pass first writes with
    /// weight-gradient products covering the whole tensor, so that after an optimizer step
    /// those products can overwrite it (beta 0, [`CudaBackend::dw_beta`]) instead of adding
    /// to zeros: the head (a tied embedding's backward adds to it later), every block's w1
    /// (a GMU memory's product then adds to its up half) and w3, attention qkv and proj,
    /// Mamba in_proj, x_proj (its dt rows and its B/C rows, one product each), dt_proj and
    /// out_proj, GMU in_proj and out_proj. Every other gradient (norms, biases, Mamba's conv,
    /// A_log, D and dt bias, differential attention's λ and sub-layer norm, an untied
    /// embedding) is only ever added to by kernels, so it must start from zero.
    fn gemm_written(&self) -> Vec<usize> {
        let mut out = vec![self.head];
        for lp in &self.layers {
            out.extend([lp.w1, lp.w3]);
            match (lp.mamba, lp.gmu) {
                (Some(m), _) => out.extend([m.in_proj, m.x_proj, m.dt_w, m.out_proj]),
                (None, Some(g)) => out.extend([g.in_proj, g.out_proj]),
                (None, None) => out.extend([lp.qkv, lp.proj]),
            }
        }
        out
    }

    /// The tensors of [`Self::gemm_written`] that one product per element writes, so that
    /// after one micro-step their gradient can be held in bf16 (`CudaBackend::wgrad`): all
    /// of them except a tied head (the embedding backward adds to it) and the w1 of a layer
    /// whose MLP feeds a GMU memory (a second product adds to its up half).
    fn bf16_grad_tensors(&self, d: &Dims) -> Vec<usize> {
        let tied = self.head == self.wte;
        let mut out: Vec<usize> = self
            .gemm_written()
            .into_iter()
            .filter(|&off| !(tied && off == self.head))
            .filter(|&off| {
                !self.layers.iter().enumerate().any(|(l, lp)| {
                    lp.w1 == off && matches!(d.info[l].memory, Some((MemorySource::Mlp, _)))
                })
            })
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }
}

/// AdamW work items (chunk tables) of one rank, unit by unit; Muon matrices are stepped
/// apart (muon.rs).
struct AdamWItems {
    /// Per item: offset in the rank's chunk of its unit, length, optimizer group.
    offs: Vec<i64>,
    lens: Vec<i32>,
    grps: Vec<i32>,
    /// Where the item's gradient starts when it is held in bf16 (in bf16 elements from the
    /// unit's gradient base: the first half of the tensor's fp32 slot), −1 for fp32.
    gbf: Vec<i64>,
    /// Where the item's second moments start in the compact `exp_avg_sq`.
    voffs: Vec<i64>,
    units: Vec<UnitChunks>,
}

/// The AdamW work items of `layout`'s rank. In each unit the items of gradients that kernels
/// add to come first, those of the tensors at `gemm_written` offsets (whole tensors the
/// backward's products overwrite) after them, so a step can zero the first ones only. Items
/// of the tensors at `bf16_able` offsets (a subset of `gemm_written`) get their bf16 place.
fn adamw_items(
    plan: &Plan,
    layout: &FlatLayout,
    second: &CompactState,
    gemm_written: &[usize],
    bf16_able: &[usize],
) -> Result<AdamWItems> {
    let mut overwritten: Vec<std::ops::Range<usize>> = gemm_written
        .iter()
        .filter_map(|&off| {
            let i = layout.offsets.iter().position(|&o| o == off)?;
            Some(off..off + layout.numels[i])
        })
        .collect();
    overwritten.sort_by_key(|r| r.start);
    let tensor_of = |flat: usize| {
        let k = overwritten.partition_point(|r| r.end <= flat);
        overwritten.get(k).filter(|r| r.contains(&flat))
    };
    let is_overwritten = |flat: usize| tensor_of(flat).is_some();
    let mut items = AdamWItems {
        offs: Vec::new(),
        lens: Vec::new(),
        grps: Vec::new(),
        gbf: Vec::new(),
        voffs: Vec::new(),
        units: Vec::with_capacity(layout.units.len()),
    };
    let groups = &plan.optimizer.groups;
    for u in 0..layout.units.len() {
        let first = items.offs.len();
        let own = layout.chunk(u, layout.rank).start;
        let (added, kept): (Vec<_>, Vec<_>) = layout
            .opt_chunks(u)
            .into_iter()
            .filter(|c| groups[c.group].optimizer == OptimizerKind::AdamW)
            .partition(|c| !is_overwritten(own + c.offset));
        let zeroed = added.len();
        for c in added.into_iter().chain(kept) {
            items.offs.push(c.offset as i64);
            items.lens.push(c.len as i32);
            items.grps.push(c.group as i32);
            // tensor slot at t0 (relative to `own`), element a = offset − t0 of it:
            // bf16 element 2·t0 + a = t0 + offset
            let gbf = tensor_of(own + c.offset)
                .filter(|t| bf16_able.binary_search(&t.start).is_ok())
                .map_or(-1, |t| (t.start - own + c.offset) as i64);
            items.gbf.push(gbf);
            let local = layout.units[u].local_start + c.offset;
            let v = second.index(local).ok_or_else(|| {
                err(format!(
                    "AdamW item at local element {local} has no second-moment slot"
                ))
            })?;
            items.voffs.push(v as i64);
        }
        items.units.push(UnitChunks {
            first,
            count: items.offs.len() - first,
            zeroed,
        });
    }
    Ok(items)
}

/// bf16 RoPE tables (computed in f32, rounded to bf16 as ArchScale) as raw bf16 bits.
fn rope_tables(len: usize, hs: usize, base: f64) -> (Vec<u16>, Vec<u16>) {
    let t = crate::cpu::ops::rope::RopeTable::new(len, hs, base);
    let c = t
        .cos
        .iter()
        .map(|&x| half::bf16::from_f32(x).to_bits())
        .collect();
    let s = t
        .sin
        .iter()
        .map(|&x| half::bf16::from_f32(x).to_bits())
        .collect();
    (c, s)
}

impl CudaBackend {
    /// Allocates everything for `plan` on device `ordinal` and initialises the parameters
    /// from `init` (plan order, f32) — use the CPU reference initialiser so both backends
    /// start from the same weights.
    pub fn new(plan: &Plan, ordinal: usize, init: &[Vec<f32>]) -> Result<CudaBackend> {
        Self::with_comm(plan, Gpu::new(ordinal)?, init, None)
    }

    /// As [`CudaBackend::new`] on `gpu`, as one rank of `comm` (data parallel, or ZeRO-1 /
    /// ZeRO-3 as the plan's layout says). Without `comm` everything is replicated.
    pub fn with_comm(
        plan: &Plan,
        gpu: Arc<Gpu>,
        init: &[Vec<f32>],
        comm: Option<Rc<NcclComm>>,
    ) -> Result<CudaBackend> {
        let dims = dims_of(plan)?;
        let ops = Ops::new(gpu.clone())?;
        let lt = Lt::new(&gpu)?;
        let d = dims.clone();
        let global_world = comm.as_ref().map_or(1, |c| c.world);
        let mode = if global_world == 1 {
            ShardMode::Replicated
        } else {
            match plan.layout.sharding {
                Sharding::DataParallel => ShardMode::Replicated,
                Sharding::Zero1 => ShardMode::Zero1,
                Sharding::Zero3 => ShardMode::Zero3,
                Sharding::HybridShard => ShardMode::Zero3,
            }
        };
        // Hybrid shard (ArchScale's HYBRID_SHARD): ZeRO-3 over the GPUs of a node, each
        // node a replica; gradients are reduce-scattered in the node, then all-reduced
        // across nodes chunk by chunk.
        let (shard_comm, replica_comm) = match &comm {
            Some(c) if plan.layout.sharding == Sharding::HybridShard && plan.layout.nodes > 1 => {
                let gpn = plan.layout.gpus_per_node;
                let (node, local) = (c.rank / gpn, c.rank % gpn);
                let intra = c.split(node, local, gpn)?;
                let inter = c.split(local, node, plan.layout.nodes)?;
                (Some(Rc::new(intra)), Some(inter))
            }
            other => (other.clone(), None),
        };
        let overwrite_grads = mode == ShardMode::Replicated
            && std::env::var("ARCHSCALE_GRAD_OVERWRITE").as_deref() != Ok("0");
        let weight_grad_env = env_switch("ARCHSCALE_WEIGHT_GRAD", "bf16", "f32")?;
        let weight_grads_bf16_able = weight_grad_env
            && overwrite_grads
            && comm.is_none()
            && plan
                .optimizer
                .groups
                .iter()
                .all(|g| g.optimizer == OptimizerKind::AdamW);
        let (world, rank) = shard_comm.as_ref().map_or((1, 0), |c| (c.world, c.rank));
        let shards = if mode == ShardMode::Replicated {
            1
        } else {
            world
        };
        let layout = FlatLayout::new(plan, shards, if shards == 1 { 0 } else { rank })?;
        let offsets = layout.offsets.clone();
        let numel = layout.numel;
        let map = param_map(plan, &d, &offsets)?;
        let (wte, ln_f, head) = (map.wte, map.ln_f, map.head);
        let tied = head == wte;
        let residual_add_in_norm = env_switch("ARCHSCALE_RESIDUAL_ADD", "norm", "gemm")?;
        let residual_in_norm = residual_add_in_norm
            && ops.rmsnorm_add_available(d.n)
            && ln_f.b.is_none()
            && map.layers.iter().all(|lp| {
                lp.norm1.b.is_none()
                    && lp.norm2.b.is_none()
                    && lp.proj_b.is_none()
                    && lp.w3_b.is_none()
                    && lp.gmu.is_none_or(|g| g.out_b.is_none())
            });

        // ARCHSCALE_POISON=1 fills every new buffer with NaN, so a read of memory nothing
        // wrote shows up as NaN in the results (diagnostics).
        let poison = std::env::var_os("ARCHSCALE_POISON").is_some();
        let alloc = |bytes: usize| -> Result<DeviceBuffer> {
            let b = gpu.alloc(bytes)?;
            if poison {
                gpu.memset_byte(b.ptr, 0xFF, b.bytes)?;
            }
            Ok(b)
        };
        // Under ZeRO-3 a rank keeps only its chunks of params and grads; under ZeRO-1 only
        // its chunks of the optimizer state.
        let local = layout.local_len;
        let (param_len, grad_len) = match mode {
            ShardMode::Zero3 => (local, local),
            _ => (numel, numel),
        };
        let params = alloc(param_len * F32)?;
        let params_bf = alloc(if mode == ShardMode::Zero3 { 64 } else { numel } * BF)?;
        let grads = alloc(grad_len * F32)?;
        let exp_avg = alloc(local * F32)?;
        let has_second = |i: usize| !muon::is_muon(plan, i);
        let second = layout.compact_state(layout.rank, &has_second);
        let exp_avg_sq = alloc(layout.compact_state_len(&has_second) * F32)?;
        gpu.memset_zero(params.ptr, params.bytes)?;
        gpu.memset_zero(grads.ptr, grads.bytes)?;
        gpu.memset_zero(exp_avg.ptr, exp_avg.bytes)?;
        gpu.memset_zero(exp_avg_sq.ptr, exp_avg_sq.bytes)?;

        let bf16_grads = map.bf16_grad_tensors(&d);
        let AdamWItems {
            offs,
            lens,
            grps,
            gbf,
            voffs,
            units: unit_chunks,
        } = adamw_items(plan, &layout, &second, &map.gemm_written(), &bf16_grads)?;
        let n_chunks = offs.len().max(1);
        let chunk_off = alloc(n_chunks * 8)?;
        let chunk_len = alloc(n_chunks * 4)?;
        let chunk_group = alloc(n_chunks * 4)?;
        let chunk_gbf = alloc(n_chunks * 8)?;
        let chunk_voff = alloc(n_chunks * 8)?;
        if !offs.is_empty() {
            gpu.upload(chunk_off.ptr, &offs)?;
            gpu.upload(chunk_len.ptr, &lens)?;
            gpu.upload(chunk_group.ptr, &grps)?;
            gpu.upload(chunk_gbf.ptr, &gbf)?;
            gpu.upload(chunk_voff.ptr, &voffs)?;
        }
        let hyper = alloc(8 * F32 * plan.optimizer.groups.len().max(1))?;
        let muon = MuonState::new(plan, &gpu, &layout)?;
        let zero3 = if mode == ShardMode::Zero3 {
            // A tied embedding is needed at both ends of the step: give its unit a slot of
            // its own. An untied one is read only by the embedding forward and written only
            // by the embedding backward, so it takes its turn in the shared slot.
            let embed_unit = if tied {
                Some(layout.unit_of_offset(wte))
            } else {
                None
            };
            let e_len = embed_unit.map_or(64, |u| layout.units[u].len);
            let l_len = layout
                .units
                .iter()
                .enumerate()
                .filter(|(u, _)| Some(*u) != embed_unit)
                .map(|(_, x)| x.len)
                .max()
                .unwrap_or(64);
            Some(Zero3Slots {
                embed_unit,
                e_f32: alloc(e_len * F32)?,
                e_bf: alloc(e_len * BF)?,
                e_grad: alloc(e_len * F32)?,
                l_f32: alloc(l_len * F32)?,
                l_bf: alloc(l_len * BF)?,
                l_grad: alloc(l_len * F32)?,
                loaded_e: Cell::new(None),
                loaded_l: Cell::new(None),
            })
        } else {
            None
        };
        let comm_stream = match &comm {
            Some(_) => Some(
                gpu.stream
                    .fork()
                    .map_err(|e| err(format!("CUDA: creating the communication stream: {e:?}")))?,
            ),
            None => None,
        };

        let cap_train = d.batch * d.seq;
        let val_len = plan.data.val_block_size.saturating_sub(1);
        let cap_eval = cap_train.max(val_len);
        let mut residual = Vec::new();
        for i in 0..2 * d.layers + 1 {
            let cap = if i == 0 { cap_eval } else { cap_train };
            residual.push(alloc(cap * d.n * F32)?);
        }
        let mut saved = Vec::new();
        let mut saved_bufs = Vec::new();
        // Evaluation runs every layer in the buffers of the first layer of its class (same
        // mixer and buffer shapes), which therefore get the (possibly longer) evaluation
        // capacity. Layers whose activations later layers read (K/V, GMU memory) keep
        // their own.
        let class = |l: usize| {
            let i = &d.info[l];
            let own = i.exports_kv || i.memory.is_some();
            (
                d.mixers[l],
                i.kv_from.is_some(),
                i.lambda_init.is_some(),
                i.memory_from.map(|s| d.info[s].memory.map_or(0, |m| m.1)),
                own.then_some(l),
            )
        };
        let eval_saved: Vec<usize> = (0..d.layers)
            .map(|l| (0..=l).find(|&k| class(k) == class(l)).unwrap_or(l))
            .collect();
        let ln = d.layer_norm;
        for (l, &saved_as) in eval_saved.iter().enumerate() {
            let cap = if saved_as == l { cap_eval } else { cap_train };
            let info = d.info[l];
            let mut bufs = Vec::new();
            let mut buf = |bytes: usize| -> Result<u64> {
                let b = alloc(bytes.max(64))?;
                let p = b.ptr;
                bufs.push(b);
                Ok(p)
            };
            let mut sv = Saved {
                mamba: None,
                qkv: 0,
                y: 0,
                lse: 0,
                gu: buf(cap * 2 * d.inner * BF)?,
                rstd1: buf(cap * F32)?,
                rstd2: buf(cap * F32)?,
                mean1: if ln { buf(cap * F32)? } else { 0 },
                mean2: if ln { buf(cap * F32)? } else { 0 },
                mem_y: 0,
                dmem: match info.memory {
                    Some((_, w)) => buf(cap_train * w * F32)?,
                    None => 0,
                },
                diff: None,
            };
            match (d.mixers[l], d.mamba) {
                (LayerKind::Mamba, Some(ms)) => {
                    // state checkpoints are written in training only
                    let ckpt_len = archscale_kernels::ops::ScanShape {
                        batch: d.batch,
                        seq: d.seq,
                        d_inner: ms.d,
                    }
                    .ckpt_len();
                    sv.mamba = Some(MambaSaved {
                        xz: buf(cap * 2 * ms.d * BF)?,
                        xc: buf(cap * ms.d * BF)?,
                        xproj: buf(cap * ms.xs * BF)?,
                        delta: buf(cap * ms.d * BF)?,
                        gated: buf(cap * ms.d * BF)?,
                        ckpt: buf(ckpt_len * F32)?,
                    });
                    if matches!(info.memory, Some((MemorySource::Mamba, _))) {
                        sv.mem_y = buf(cap * ms.d * BF)?;
                    }
                }
                (LayerKind::Gmu, _) => {
                    let dm = info
                        .memory_from
                        .and_then(|s| d.info[s].memory)
                        .map_or(0, |m| m.1);
                    sv.qkv = buf(cap * dm * BF)?;
                    sv.y = buf(cap * dm * BF)?;
                }
                _ => {
                    // differential attention runs 2H flash heads (see diff_attention.rs)
                    let fh = if info.lambda_init.is_some() { 2 } else { 1 } * d.heads;
                    sv.qkv = buf(cap * d.proj_in_width(l) * BF)?;
                    sv.y = buf(cap * d.attn_width() * BF)?;
                    sv.lse = buf(cap * fh * F32)?;
                    if info.lambda_init.is_some() {
                        sv.diff = Some(DiffSaved {
                            ob: buf(cap * fh * d.hs * BF)?,
                            rstd: buf(cap * d.heads / 2 * F32)?,
                            lam: buf(4 * F32)?,
                        });
                    }
                }
            }
            saved.push(sv);
            saved_bufs.extend(bufs);
        }
        let rstd_f = alloc(cap_eval * F32)?;
        let mean_f = alloc(if ln { cap_eval * F32 } else { 64 })?;
        let hf = alloc(cap_eval * d.n * BF)?;
        let logits = alloc(cap_eval * d.padded_vocab * BF)?;
        let losses = alloc(cap_eval * F32)?;
        let tokens = alloc(cap_eval * 4)?;
        let targets = alloc(cap_eval * 4)?;
        let seg = alloc(if d.varlen { cap_eval * 4 } else { 64 })?;
        let rope_len = d.seq.max(val_len);
        let (c, s) = rope_tables(rope_len, d.hs, d.rope_base);
        let rope_cos = alloc(c.len() * BF)?;
        let rope_sin = alloc(s.len() * BF)?;
        gpu.upload(rope_cos.ptr, &c)?;
        gpu.upload(rope_sin.ptr, &s)?;

        let h = alloc(cap_eval * d.n * BF)?;
        let a = alloc(cap_eval * d.inner * BF)?;
        let dres = alloc(cap_train * d.n * F32)?;
        let dres_bf = alloc(cap_train * d.n * BF)?;
        let dy = alloc(cap_train * d.attn_width() * BF)?;
        let dqkv = alloc(cap_train * d.qkv_width() * BF)?;
        let dq_acc = alloc(cap_train * d.attn_width() * F32)?;
        let delta = alloc(cap_train * d.heads * F32)?;
        let norm_out = alloc(8)?;
        let mamba_scratch = match d.mamba {
            Some(ms) => {
                let c = cap_train;
                let bufs = [
                    alloc(c * 2 * ms.d * BF)?,
                    alloc(c * ms.d * BF)?,
                    alloc(c * ms.d * BF)?,
                    alloc(c * ms.xs * BF)?,
                    alloc(c * 2 * ms.ns * F32)?,
                    alloc(c * ms.d * BF)?,
                    alloc(ms.xs * ms.d * BF)?,
                    alloc(ms.d * ms.rp * BF)?,
                ];
                let sc = MambaScratch {
                    dxz: bufs[0].ptr,
                    dxc: bufs[1].ptr,
                    ddelta: bufs[2].ptr,
                    dxproj: bufs[3].ptr,
                    bc_acc: bufs[4].ptr,
                    dgated: bufs[5].ptr,
                    wx_pad: bufs[6].ptr,
                    wdt_pad: bufs[7].ptr,
                };
                saved_bufs.extend(bufs);
                Some(sc)
            }
            None => None,
        };
        let hops = if d.needs_hybrid() {
            Some(HybridOps::new(gpu.clone())?)
        } else {
            None
        };
        let mut cross = CrossScratch::default();
        {
            let mut buf = |bytes: usize| -> Result<u64> {
                let b = alloc(bytes.max(64))?;
                let p = b.ptr;
                saved_bufs.push(b);
                Ok(p)
            };
            if d.any_cross() {
                cross.kv_acc = buf(cap_train * d.qkv_width() * F32)?;
                cross.dq = buf(cap_train * d.attn_width() * BF)?;
            }
            let mem = d.max_memory();
            if mem > 0 {
                cross.dmem_bf = buf(cap_train * mem * BF)?;
                cross.gmu_dh = buf(cap_train * mem * BF)?;
                cross.gmu_dg = buf(cap_train * mem * BF)?;
            }
        }
        let diff = if d.any_diff() {
            Some(DiffScratch::new(
                &d,
                cap_train,
                cap_eval,
                &alloc,
                &gpu,
                &mut saved_bufs,
            )?)
        } else {
            None
        };

        let mut be = CudaBackend {
            gpu,
            ops,
            lt,
            plan: plan.clone(),
            dims,
            layout,
            mode,
            offsets,
            numel,
            layer_params: map.layers,
            wte,
            ln_f,
            head,
            step: 0,
            cap_train,
            cap_eval,
            params,
            params_bf,
            grads,
            exp_avg,
            exp_avg_sq,
            second,
            chunk_off,
            chunk_len,
            chunk_group,
            chunk_gbf,
            chunk_voff,
            unit_chunks,
            hyper,
            muon,
            zero3,
            residual,
            saved,
            eval_saved,
            mamba_scratch,
            cross,
            diff,
            hops,
            _saved_bufs: saved_bufs,
            rstd_f,
            mean_f,
            hf,
            logits,
            losses,
            tokens,
            targets,
            seg,
            rope_cos,
            rope_sin,
            rope_len,
            h,
            a,
            dres,
            dres_bf,
            dy,
            dqkv,
            dq_acc,
            delta,
            norm_out,
            prof: std::cell::RefCell::new(None),
            comm,
            shard_comm,
            replica_comm,
            comm_stream,
            sync_grads: true,
            grads_reduced: Cell::new(false),
            gemm_tune: gemm_tune_reps(),
            gemm_tuned_all: false,
            overwrite_grads,
            grads_stale: Cell::new(overwrite_grads),
            residual_in_norm,
            // one micro-step per optimizer step: no accumulation, and no other ranks'
            // batches run here in turn (a single process standing in for a world)
            weight_grads_bf16: weight_grads_bf16_able
                && plan.layout.gas == 1
                && plan.layout.world <= 1,
            weight_grads_bf16_able,
            bf16_grads,
            micro_step_pending: Cell::new(false),
        };
        be.lt.set_autotune(be.gemm_tune, false);
        be.write_params(init)?;
        Ok(be)
    }

    /// Records an event named for the op that follows (profiling only).
    fn mark(&self, name: &'static str) -> Result<()> {
        if let Some(v) = self.prof.borrow_mut().as_mut() {
            v.push((name, self.gpu.event()?));
        }
        Ok(())
    }

    /// Optimizer steps with a device event before every op, as the bench loop runs them;
    /// returns milliseconds per op name and step (summed over layers), in first-seen order.
    /// Three steps run back to back: "between steps" is the time from one step's last
    /// optimizer kernel to the next step's first kernel (the host's share: the loss and
    /// grad-norm readbacks, the token upload, the launches), averaged over the two gaps.
    pub fn profile_step(
        &mut self,
        rows: &[u32],
        micro: usize,
        lrs: &[f64],
    ) -> Result<Vec<(String, f64)>> {
        const STEPS: usize = 3;
        const GAP: &str = "between steps";
        *self.prof.borrow_mut() = Some(Vec::new());
        let r = (|| -> Result<()> {
            for s in 0..STEPS {
                self.forward_backward(rows, micro, 1.0)?;
                self.mark("grad norm")?;
                self.grad_norm()?;
                self.mark("adamw")?;
                self.optimizer_step(lrs, 1.0)?;
                self.mark(if s + 1 < STEPS { GAP } else { "end" })?;
            }
            self.gpu.sync()?;
            Ok(())
        })();
        let marks = self.prof.borrow_mut().take().unwrap_or_default();
        r?;
        let mut out: Vec<(String, f64)> = Vec::new();
        for w in marks.windows(2) {
            let ms = w[0].1.elapsed_ms(&w[1].1)? as f64;
            match out.iter_mut().find(|(n, _)| n == w[0].0) {
                Some(e) => e.1 += ms,
                None => out.push((w[0].0.to_string(), ms)),
            }
        }
        for (name, ms) in out.iter_mut() {
            *ms /= if name == GAP { STEPS - 1 } else { STEPS } as f64;
        }
        Ok(out)
    }

    /// Accumulated gradients in plan order (f32).
    pub fn read_grads(&self) -> Result<Vec<Vec<f32>>> {
        let mut out = Vec::with_capacity(self.plan.params.len());
        for (i, p) in self.plan.params.iter().enumerate() {
            if self.grads_stale.get() {
                out.push(vec![0.0; p.numel()]);
                continue;
            }
            let off = self.offsets[i];
            if self.grad_in_bf16(off) {
                let bits: Vec<u16> = self.gpu.download_vec(self.g32(off), p.numel())?;
                out.push(
                    bits.into_iter()
                        .map(|b| half::bf16::from_bits(b).to_f32())
                        .collect(),
                );
            } else {
                out.push(self.gpu.download_vec(self.g32(off), p.numel())?);
            }
        }
        Ok(out)
    }

    /// Per plan parameter: whether its gradient is held in bf16 (after one micro-step, as
    /// ArchScale's autocast products hand it over), for a CPU reference that rounds there.
    pub fn grads_in_bf16(&self) -> Vec<bool> {
        self.offsets
            .iter()
            .map(|&off| self.grad_in_bf16(off))
            .collect()
    }

    /// Whether the gradient of the tensor at `off` is held in bf16 (`weight_grads_bf16`).
    fn grad_in_bf16(&self, off: usize) -> bool {
        self.weight_grads_bf16 && self.bf16_grads.binary_search(&off).is_ok()
    }

    /// Where a weight-gradient product writes the gradient of the tensor at `off`.
    fn wgrad(&self, off: usize) -> WeightGrad {
        self.wgrad_at(off, 0)
    }

    /// [`Self::wgrad`] from element `at` of the tensor on (a product writing some rows).
    fn wgrad_at(&self, off: usize, at: usize) -> WeightGrad {
        if self.grad_in_bf16(off) {
            WeightGrad {
                ptr: self.g32(off) + (at * BF) as u64,
                ty: OutType::Bf16,
            }
        } else {
            WeightGrad {
                ptr: self.g32(off) + (at * F32) as u64,
                ty: OutType::F32,
            }
        }
    }

    /// Unit `u`'s AdamW items in the device tables (bf16 places only while gradients are
    /// held so).
    fn unit_tables(&self, u: usize) -> OptChunkTables {
        let UnitChunks { first, count, .. } = self.unit_chunks[u];
        let at = |table: &DeviceBuffer, bytes: usize| table.ptr + (first * bytes) as u64;
        OptChunkTables {
            off: at(&self.chunk_off, 8),
            len: at(&self.chunk_len, 4),
            group: at(&self.chunk_group, 4),
            gbf: if self.weight_grads_bf16 {
                at(&self.chunk_gbf, 8)
            } else {
                0
            },
            voff: at(&self.chunk_voff, 8),
            count,
        }
    }

    /// Holds the one-micro-step weight gradients in bf16, or not ([`Self::weight_grads_bf16`];
    /// on only where this backend can, off under `ARCHSCALE_WEIGHT_GRAD=f32`): the selftest
    /// runs its single-micro-step model check with them and its accumulation check without.
    pub fn set_weight_grads_bf16(&mut self, on: bool) -> Result<()> {
        if self.micro_step_pending.get() {
            return Err(err(
                "set_weight_grads_bf16: a backward pass's gradients are waiting for the optimizer",
            ));
        }
        self.clear_stale_grads()?;
        self.weight_grads_bf16 = on && self.weight_grads_bf16_able && self.overwrite_grads;
        Ok(())
    }

    /// Whether every mixer and MLP branch reaches the residual stream rounded to bf16
    /// (`residual_in_norm`), for a CPU reference that rounds where this backend does.
    pub fn branches_in_bf16(&self) -> bool {
        self.residual_in_norm
    }

    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    /// Bytes allocated at the high-water mark.
    pub fn peak_bytes(&self) -> usize {
        self.gpu.peak_allocated()
    }

    /// Device bytes of parameters, gradients and optimizer state on this rank (the part
    /// ZeRO shards), as opposed to activations and scratch.
    pub fn model_state_bytes(&self) -> usize {
        let mut b = self.params.bytes
            + self.params_bf.bytes
            + self.grads.bytes
            + self.exp_avg.bytes
            + self.exp_avg_sq.bytes
            + self.muon.as_ref().map_or(0, MuonState::bytes);
        if let Some(z) = &self.zero3 {
            b += z.e_f32.bytes + z.e_bf.bytes + z.e_grad.bytes;
            b += z.l_f32.bytes + z.l_bf.bytes + z.l_grad.bytes;
        }
        b
    }

    /// Beta of a weight-gradient product that is the first writer of its tensor in the
    /// backward pass ([`ParamMap::gemm_written`]): 0 on the first micro-step after an
    /// optimizer step (the tensor holds that step's gradient), else 1 (accumulate).
    fn dw_beta(&self) -> f32 {
        if self.grads_stale.get() {
            0.0
        } else {
            1.0
        }
    }

    /// Makes the gradients the products overwrite zero in memory too, for a reader that
    /// comes before the next backward pass (not the training loop's order).
    fn clear_stale_grads(&self) -> Result<()> {
        if self.grads_stale.get() {
            self.gpu.memset_zero(self.grads.ptr, self.grads.bytes)?;
            self.grads_stale.set(false);
        }
        Ok(())
    }

    /// Turns [`Self::overwrite_grads`] on or off (on only takes effect when replicated):
    /// the selftest compares both.
    pub fn set_grad_overwrite(&mut self, on: bool) -> Result<()> {
        if self.weight_grads_bf16 && self.micro_step_pending.get() {
            return Err(err(
                "set_grad_overwrite: bf16 weight gradients are waiting for the optimizer",
            ));
        }
        self.clear_stale_grads()?;
        self.overwrite_grads = on && self.mode == ShardMode::Replicated;
        // bf16 weight gradients need the products to overwrite them
        self.weight_grads_bf16 &= self.overwrite_grads;
        Ok(())
    }

    fn p32(&self, off: usize) -> u64 {
        if self.zero3.is_some() {
            return self.slot(self.layout.unit_of_offset(off)).0 + (off * F32) as u64;
        }
        self.params.ptr + (off * F32) as u64
    }
    fn pbf(&self, off: usize) -> u64 {
        if self.zero3.is_some() {
            return self.slot(self.layout.unit_of_offset(off)).1 + (off * BF) as u64;
        }
        self.params_bf.ptr + (off * BF) as u64
    }
    fn g32(&self, off: usize) -> u64 {
        if self.zero3.is_some() {
            return self.slot(self.layout.unit_of_offset(off)).2 + (off * F32) as u64;
        }
        self.grads.ptr + (off * F32) as u64
    }

    fn upload_tokens(
        &self,
        rows: &[u32],
        nrows: usize,
        row_len: usize,
        with_targets: bool,
    ) -> Result<()> {
        let seq = row_len - 1;
        let (mut inp, mut tgt) = (
            Vec::with_capacity(nrows * seq),
            Vec::with_capacity(nrows * seq),
        );
        for r in 0..nrows {
            let row = &rows[r * row_len..(r + 1) * row_len];
            for &t in row {
                if t as usize >= self.dims.vocab {
                    return Err(err(format!(
                        "token id {t} is outside the vocabulary ({})",
                        self.dims.vocab
                    )));
                }
            }
            inp.extend(row[..seq].iter().map(|&t| t as i32));
            tgt.extend(row[1..].iter().map(|&t| t as i32));
        }
        self.gpu.upload(self.tokens.ptr, &inp)?;
        if self.dims.varlen {
            let toks: Vec<u32> = inp.iter().map(|&t| t as u32).collect();
            let mut starts = vec![0u32; toks.len()];
            crate::cpu::ops::mask::segment_starts(&toks, seq, self.dims.eos, &mut starts);
            let starts: Vec<i32> = starts.iter().map(|&s| s as i32).collect();
            self.gpu.upload(self.seg.ptr, &starts)?;
        }
        if with_targets {
            self.gpu.upload(self.targets.ptr, &tgt)?;
        }
        Ok(())
    }

    /// The hybrid kernels (loaded for models with Mamba, LayerNorm, GMU, DA or biases).
    fn hops(&self) -> Result<&HybridOps> {
        self.hops
            .as_ref()
            .ok_or_else(|| err("CUDA backend: hybrid kernels not loaded"))
    }

    /// Varlen: the device document starts of the uploaded rows.
    fn seg(&self) -> Option<u64> {
        self.dims.varlen.then_some(self.seg.ptr)
    }

    /// Layer `l`'s saved buffers in training, or the ones evaluation runs it in.
    fn saved_of(&self, l: usize, train: bool) -> Saved {
        if train {
            self.saved[l]
        } else {
            self.saved[self.eval_saved[l]]
        }
    }

    /// Normalises fp32 rows `x` into bf16 `out` (RMSNorm, or LayerNorm with its bias),
    /// saving `mean` / `rstd` where non-zero.
    fn norm_fwd(
        &self,
        x: u64,
        nm: Norm,
        out: u64,
        mean: u64,
        rstd: u64,
        rows: usize,
    ) -> Result<()> {
        let d = &self.dims;
        match nm.b {
            None => {
                Ok(self
                    .ops
                    .rmsnorm_fwd(x, self.p32(nm.w), out, rstd, rows, d.n, d.eps, 1.0)?)
            }
            Some(b) => Ok(self.hops()?.layernorm_fwd(
                x,
                self.p32(nm.w),
                self.p32(b),
                out,
                mean,
                rstd,
                rows,
                d.n,
                d.eps,
            )?),
        }
    }

    /// The output product of a residual branch, `a[rows, k]·Wᵀ` with W `[n, k]` at `w`. With
    /// `residual_in_norm` it goes to `h` in bf16 (dead by then: the branch's input product
    /// was its last reader) for the next norm to add ([`Self::norm_fwd_add`]), and this
    /// returns true; otherwise the product's epilogue writes `x_out = x_in + rs·(a·Wᵀ + bias)`
    /// and this returns false. (`residual_in_norm` holds only where no output has a bias.)
    #[allow(clippy::too_many_arguments)]
    fn branch_output(
        &self,
        a: u64,
        w: usize,
        bias: Option<usize>,
        x_in: u64,
        x_out: u64,
        rows: usize,
        k: usize,
    ) -> Result<bool> {
        let (n, rs) = (self.dims.n, self.dims.residual_scale);
        if self.residual_in_norm {
            let (h, bf16) = (self.h.ptr, OutType::Bf16);
            self.lt
                .linear(&self.gpu, a, self.pbf(w), h, 0, rows, k, n, bf16, 1.0, 0.0)?;
            return Ok(true);
        }
        let f32 = OutType::F32;
        self.lt.linear(
            &self.gpu,
            a,
            self.pbf(w),
            x_out,
            x_in,
            rows,
            k,
            n,
            f32,
            rs,
            1.0,
        )?;
        if let Some(b) = bias {
            self.hops()?.bias_add_f32(x_out, self.p32(b), rs, rows, n)?;
        }
        Ok(false)
    }

    /// `x_out = base + rs·h` (the branch output the last product left in `h`) and
    /// `out = rmsnorm(x_out)·scale`, in one pass (`residual_in_norm`); `out` may be `h`.
    #[allow(clippy::too_many_arguments)]
    fn norm_fwd_add(
        &self,
        base: u64,
        x_out: u64,
        nm: Norm,
        out: u64,
        rstd: u64,
        rows: usize,
        scale: f32,
    ) -> Result<()> {
        let d = &self.dims;
        Ok(self.ops.rmsnorm_fwd_add(
            base,
            self.h.ptr,
            d.residual_scale,
            x_out,
            self.p32(nm.w),
            out,
            rstd,
            rows,
            d.n,
            d.eps,
            scale,
        )?)
    }

    /// Forward, loss (per-token losses kept in `self.losses`, logits' gradient scaled by
    /// `scale`) and backward of the tokens already uploaded.
    fn training_pass(&self, micro: usize, seq: usize, scale: f32) -> Result<()> {
        self.forward(micro, seq, true)?;
        self.mark("cross-entropy")?;
        self.ops.cross_entropy(
            self.logits.ptr,
            self.targets.ptr,
            self.losses.ptr,
            micro * seq,
            self.dims.padded_vocab,
            self.dims.smoothing,
            scale,
            true,
        )?;
        self.backward(micro, seq)
    }

    /// The end of every mixer's backward: `dsrc` [rows, width] is the gradient of the
    /// mixer's input projection `w` (weights at offset `w`), applied to h = norm1(x_in); it
    /// gives w's weight gradient and, through w, the gradient into norm1. An RMSNorm backward
    /// writes h over its own input (the gradient dx GEMM just wrote), so h is not recomputed
    /// and norm1's backward runs here; a LayerNorm's h is recomputed first and the block loop
    /// runs its backward. Returns whether norm1's backward ran here. `marks` name the weight
    /// and input gradient products in profiles.
    #[allow(clippy::too_many_arguments)]
    fn input_projection_backward(
        &self,
        lp: &LayerParams,
        sv: &Saved,
        x_in: u64,
        dsrc: u64,
        w: usize,
        width: usize,
        rows: usize,
        marks: [&'static str; 2],
    ) -> Result<bool> {
        let (gpu, lt, n) = (&*self.gpu, &self.lt, self.dims.n);
        let rms = lp.norm1.b.is_none();
        let grad_weight = || -> Result<()> {
            self.mark(marks[0])?;
            Ok(lt.linear_grad_weight(
                gpu,
                dsrc,
                self.h.ptr,
                self.wgrad(w),
                rows,
                n,
                width,
                1.0,
                self.dw_beta(),
            )?)
        };
        if !rms {
            self.mark("norm fwd")?;
            self.norm_fwd(x_in, lp.norm1, self.h.ptr, 0, 0, rows)?;
            grad_weight()?;
        }
        self.mark(marks[1])?;
        lt.linear_grad_input(
            gpu,
            dsrc,
            self.pbf(w),
            self.h.ptr,
            rows,
            n,
            width,
            OutType::Bf16,
            1.0,
            0.0,
        )?;
        if rms {
            self.mark("norm bwd")?;
            self.norm_bwd_into(
                x_in, lp.norm1, sv.mean1, sv.rstd1, self.h.ptr, rows, 1.0, true, self.h.ptr,
            )?;
            grad_weight()?;
        }
        Ok(rms)
    }

    /// Norm backward from bf16 `dy` into `self.dres` (added when `accumulate`) and
    /// `self.dres_bf`; `scale` multiplies an RMSNorm's output (the final norm's logit scale).
    #[allow(clippy::too_many_arguments)]
    fn norm_bwd(
        &self,
        x: u64,
        nm: Norm,
        mean: u64,
        rstd: u64,
        dy: u64,
        rows: usize,
        scale: f32,
        accumulate: bool,
    ) -> Result<()> {
        self.norm_bwd_into(x, nm, mean, rstd, dy, rows, scale, accumulate, 0)
    }

    /// [`Self::norm_bwd`] that also writes the norm's forward output (scale 1) to `h_out`
    /// (may be `dy`). RMSNorm only: LayerNorm callers recompute it with `norm_fwd`.
    #[allow(clippy::too_many_arguments)]
    fn norm_bwd_into(
        &self,
        x: u64,
        nm: Norm,
        mean: u64,
        rstd: u64,
        dy: u64,
        rows: usize,
        scale: f32,
        accumulate: bool,
        h_out: u64,
    ) -> Result<()> {
        let n = self.dims.n;
        if h_out != 0 && nm.b.is_some() {
            return Err(err(
                "norm backward with the forward output again: RMSNorm only",
            ));
        }
        match nm.b {
            None => Ok(self.ops.rmsnorm_bwd(
                x,
                self.p32(nm.w),
                rstd,
                dy,
                self.dres.ptr,
                self.dres_bf.ptr,
                self.g32(nm.w),
                rows,
                n,
                scale,
                accumulate,
                h_out,
            )?),
            Some(b) => Ok(self.hops()?.layernorm_bwd(
                x,
                self.p32(nm.w),
                mean,
                rstd,
                dy,
                self.dres.ptr,
                self.dres_bf.ptr,
                self.g32(nm.w),
                self.g32(b),
                rows,
                n,
                accumulate,
            )?),
        }
    }

    /// The GMU memory exported by layer `src` (bf16 rows).
    fn memory_rows(&self, src: usize, train: bool) -> Result<(Rows, usize)> {
        let d = &self.dims;
        let sv = self.saved_of(src, train);
        match d.info[src].memory {
            Some((MemorySource::Mamba, w)) => Ok((Rows::new(sv.mem_y, w), w)),
            Some((MemorySource::Attention, w)) => Ok((Rows::new(sv.y, w), w)),
            Some((MemorySource::Mlp, w)) => {
                Ok((Rows::new(sv.gu + (d.inner * BF) as u64, 2 * d.inner), w))
            }
            None => Err(err(format!(
                "CUDA backend: layer {src} exports no GMU memory"
            ))),
        }
    }

    /// Forward over `batch` rows of `seq` tokens already uploaded. `train`: per-layer saves
    /// (else every layer uses the buffers of the first layer of its class). Leaves bf16
    /// logits in `self.logits`.
    fn forward(&self, batch: usize, seq: usize, train: bool) -> Result<()> {
        let d = &self.dims;
        let rows = batch * seq;
        let (n, inner) = (d.n, d.inner);
        let ops = &self.ops;
        let gpu = &self.gpu;
        let uof = |off: usize| self.layout.unit_of_offset(off);
        self.gather_unit(uof(self.wte))?;
        self.mark("embedding")?;
        ops.embedding_fwd(
            self.tokens.ptr,
            self.p32(self.wte),
            self.residual[0].ptr,
            rows,
            n,
        )?;
        // The residual stream a branch output waiting in `h` adds to (`residual_in_norm`).
        let mut pending: Option<u64> = None;
        for l in 0..d.layers {
            let lp = self.layer_params[l];
            let sv = self.saved_of(l, train);
            self.gather_unit(uof(lp.norm1.w))?;
            let (x_in, x_mid, x_out) = if train {
                (
                    self.residual[2 * l].ptr,
                    self.residual[2 * l + 1].ptr,
                    self.residual[2 * l + 2].ptr,
                )
            } else {
                // eval: the residual stream is updated in place (C == D in the GEMM).
                (
                    self.residual[0].ptr,
                    self.residual[0].ptr,
                    self.residual[0].ptr,
                )
            };
            self.mark("norm fwd")?;
            match pending.take() {
                Some(base) => {
                    self.norm_fwd_add(base, x_in, lp.norm1, self.h.ptr, sv.rstd1, rows, 1.0)?
                }
                None => self.norm_fwd(x_in, lp.norm1, self.h.ptr, sv.mean1, sv.rstd1, rows)?,
            }
            let deferred = match d.mixers[l] {
                LayerKind::Attention => {
                    self.attention_forward(l, &lp, &sv, batch, seq, x_in, x_mid, train)?
                }
                LayerKind::Mamba => {
                    self.mamba_forward(l, &lp, &sv, batch, seq, x_in, x_mid, train)?
                }
                LayerKind::Gmu => self.gmu_forward(l, &lp, &sv, batch, seq, x_in, x_mid, train)?,
            };
            self.mark("norm fwd")?;
            if deferred {
                self.norm_fwd_add(x_in, x_mid, lp.norm2, self.h.ptr, sv.rstd2, rows, 1.0)?;
            } else {
                self.norm_fwd(x_mid, lp.norm2, self.h.ptr, sv.mean2, sv.rstd2, rows)?;
            }
            self.mark("gemm w1")?;
            self.lt.linear(
                gpu,
                self.h.ptr,
                self.pbf(lp.w1),
                sv.gu,
                0,
                rows,
                n,
                2 * inner,
                OutType::Bf16,
                1.0,
                0.0,
            )?;
            if let Some(b) = lp.w1_b {
                self.hops()?.bias_add_bf16(
                    Rows::new(sv.gu, 2 * inner),
                    self.p32(b),
                    rows,
                    2 * inner,
                )?;
            }
            self.mark("swiglu")?;
            ops.swiglu_fwd(sv.gu, self.a.ptr, rows, inner)?;
            self.mark("gemm w3")?;
            if self.branch_output(self.a.ptr, lp.w3, lp.w3_b, x_mid, x_out, rows, inner)? {
                pending = Some(x_mid);
            }
        }
        let x_final = if train {
            self.residual[2 * d.layers].ptr
        } else {
            self.residual[0].ptr
        };
        self.gather_unit(uof(self.ln_f.w))?;
        self.gather_unit(uof(self.head))?;
        self.mark("norm fwd")?;
        // RMSNorm folds the logit scale into its output; LayerNorm's goes into the head GEMM.
        let head_alpha = match (self.ln_f.b, pending) {
            (None, Some(base)) => {
                self.norm_fwd_add(
                    base,
                    x_final,
                    self.ln_f,
                    self.hf.ptr,
                    self.rstd_f.ptr,
                    rows,
                    d.logit_scale,
                )?;
                1.0
            }
            (None, None) => {
                ops.rmsnorm_fwd(
                    x_final,
                    self.p32(self.ln_f.w),
                    self.hf.ptr,
                    self.rstd_f.ptr,
                    rows,
                    n,
                    d.eps,
                    d.logit_scale,
                )?;
                1.0
            }
            // LayerNorm: the products added the branches themselves (no `residual_in_norm`)
            (Some(_), _) => {
                self.norm_fwd(
                    x_final,
                    self.ln_f,
                    self.hf.ptr,
                    self.mean_f.ptr,
                    self.rstd_f.ptr,
                    rows,
                )?;
                d.logit_scale
            }
        };
        self.mark("gemm head")?;
        self.lt.linear(
            gpu,
            self.hf.ptr,
            self.pbf(self.head),
            self.logits.ptr,
            0,
            rows,
            n,
            d.padded_vocab,
            OutType::Bf16,
            head_alpha,
            0.0,
        )?;
        Ok(())
    }

    fn backward(&self, batch: usize, seq: usize) -> Result<()> {
        let d = &self.dims;
        let rows = batch * seq;
        let (n, inner) = (d.n, d.inner);
        let ops = &self.ops;
        let gpu = &self.gpu;
        let lt = &self.lt;
        let rs = d.residual_scale;
        let uof = |off: usize| self.layout.unit_of_offset(off);
        let (u_norm, u_head, u_embed) = (uof(self.ln_f.w), uof(self.head), uof(self.wte));
        self.gather_unit(u_norm)?;
        self.gather_unit(u_head)?;
        self.grads_begin(u_norm)?;
        if u_head != u_norm {
            self.grads_begin(u_head)?;
        }
        let (head_alpha, norm_scale) = match self.ln_f.b {
            None => (1.0, d.logit_scale),
            Some(_) => (d.logit_scale, 1.0),
        };
        // head: dW_head += dlogitsᵀ·hf; dhf = dlogits·W_head
        self.mark("gemm head dW")?;
        lt.linear_grad_weight(
            gpu,
            self.logits.ptr,
            self.hf.ptr,
            self.wgrad(self.head),
            rows,
            n,
            d.padded_vocab,
            head_alpha,
            self.dw_beta(),
        )?;
        self.mark("gemm head dx")?;
        lt.linear_grad_input(
            gpu,
            self.logits.ptr,
            self.pbf(self.head),
            self.h.ptr,
            rows,
            n,
            d.padded_vocab,
            OutType::Bf16,
            head_alpha,
            0.0,
        )?;
        self.mark("norm bwd")?;
        self.norm_bwd(
            self.residual[2 * d.layers].ptr,
            self.ln_f,
            self.mean_f.ptr,
            self.rstd_f.ptr,
            self.h.ptr,
            rows,
            norm_scale,
            false,
        )?;
        // The embedding's unit (with a tied head, also the head's) completes only after
        // the embedding backward at the very end.
        if u_norm != u_embed {
            self.grads_done(u_norm)?;
        }
        if u_head != u_norm && u_head != u_embed {
            self.grads_done(u_head)?;
        }
        // Cross-layer gradients (GMU memory, YOCO K/V) are summed into these before their
        // producer's backward runs.
        for l in 0..d.layers {
            if let Some((_, w)) = d.info[l].memory {
                gpu.memset_zero(self.saved[l].dmem, rows * w * F32)?;
            }
        }
        for l in (0..d.layers).rev() {
            let lp = self.layer_params[l];
            let u_layer = uof(lp.norm1.w);
            self.gather_unit(u_layer)?;
            self.grads_begin(u_layer)?;
            let sv = self.saved[l];
            let (x_in, x_mid) = (self.residual[2 * l].ptr, self.residual[2 * l + 1].ptr);
            // MLP branch: out = rs · a·W3ᵀ. da first; the SwiGLU backward then leaves a
            // (recomputed from g and u) where da was, for W3's weight gradient.
            self.mark("gemm w3 dx")?;
            lt.linear_grad_input(
                gpu,
                self.dres_bf.ptr,
                self.pbf(lp.w3),
                self.a.ptr,
                rows,
                inner,
                n,
                OutType::Bf16,
                rs,
                0.0,
            )?;
            self.mark("swiglu bwd")?;
            ops.swiglu_bwd(sv.gu, self.a.ptr, rows, inner)?;
            self.mark("gemm w3 dW")?;
            lt.linear_grad_weight(
                gpu,
                self.dres_bf.ptr,
                self.a.ptr,
                self.wgrad(lp.w3),
                rows,
                inner,
                n,
                rs,
                self.dw_beta(),
            )?;
            if let Some(b) = lp.w3_b {
                self.hops()?
                    .bias_grad(Rows::new(self.dres_bf.ptr, n), self.g32(b), rs, rows, n)?;
            }
            // gmu_mlp: the memory u (w1's up half) also gets the GMU layers' gradient
            let mlp_mem = matches!(d.info[l].memory, Some((MemorySource::Mlp, _)));
            let dmem = self.cross.dmem_bf;
            if mlp_mem {
                ops.cast_f32_bf16(sv.dmem, dmem, rows * inner)?;
            }
            if let Some(b) = lp.w1_b {
                let hops = self.hops()?;
                hops.bias_grad(
                    Rows::new(sv.gu, 2 * inner),
                    self.g32(b),
                    1.0,
                    rows,
                    2 * inner,
                )?;
                if mlp_mem {
                    let up = self.g32(b) + (inner * F32) as u64;
                    hops.bias_grad(Rows::new(dmem, inner), up, 1.0, rows, inner)?;
                }
            }
            // h = norm2(x_mid) for W1's weight gradient: an RMSNorm backward writes it over
            // its own input dh (so dh comes first); a LayerNorm's is recomputed up front.
            let rms = lp.norm2.b.is_none();
            let w1_grad_weight = || -> Result<()> {
                self.mark("gemm w1 dW")?;
                lt.linear_grad_weight(
                    gpu,
                    sv.gu,
                    self.h.ptr,
                    self.wgrad(lp.w1),
                    rows,
                    n,
                    2 * inner,
                    1.0,
                    self.dw_beta(),
                )?;
                if mlp_mem {
                    lt.linear_grad_weight(
                        gpu,
                        dmem,
                        self.h.ptr,
                        self.wgrad_at(lp.w1, inner * n),
                        rows,
                        n,
                        inner,
                        1.0,
                        1.0,
                    )?;
                }
                Ok(())
            };
            if !rms {
                self.mark("norm fwd")?;
                self.norm_fwd(x_mid, lp.norm2, self.h.ptr, 0, 0, rows)?;
                w1_grad_weight()?;
            }
            self.mark("gemm w1 dx")?;
            lt.linear_grad_input(
                gpu,
                sv.gu,
                self.pbf(lp.w1),
                self.h.ptr,
                rows,
                n,
                2 * inner,
                OutType::Bf16,
                1.0,
                0.0,
            )?;
            if mlp_mem {
                lt.linear_grad_input(
                    gpu,
                    dmem,
                    self.pbf(lp.w1) + (inner * n * BF) as u64,
                    self.h.ptr,
                    rows,
                    n,
                    inner,
                    OutType::Bf16,
                    1.0,
                    1.0,
                )?;
            }
            self.mark("norm bwd")?;
            self.norm_bwd_into(
                x_mid,
                lp.norm2,
                sv.mean2,
                sv.rstd2,
                self.h.ptr,
                rows,
                1.0,
                true,
                if rms { self.h.ptr } else { 0 },
            )?;
            if rms {
                w1_grad_weight()?;
            }
            let norm1_done = match d.mixers[l] {
                LayerKind::Attention => self.attention_backward(l, &lp, &sv, batch, seq, x_in)?,
                LayerKind::Mamba => self.mamba_backward(l, &lp, &sv, batch, seq, x_in)?,
                LayerKind::Gmu => self.gmu_backward(l, &lp, &sv, batch, seq, x_in)?,
            };
            if !norm1_done {
                self.mark("norm bwd")?;
                self.norm_bwd(
                    x_in, lp.norm1, sv.mean1, sv.rstd1, self.h.ptr, rows, 1.0, true,
                )?;
            }
            self.grads_done(u_layer)?;
        }
        if u_embed != u_norm && u_embed != u_head {
            // untied: only the embedding backward writes this unit's gradient
            self.grads_begin(u_embed)?;
        }
        self.mark("embedding bwd")?;
        ops.embedding_bwd(self.tokens.ptr, self.dres.ptr, self.g32(self.wte), rows, n)?;
        self.grads_done(u_embed)?;
        self.grads_all_done()?;
        // every gradient has had its first writer: the products accumulate from here on
        self.grads_stale.set(false);
        Ok(())
    }

    /// Per-row losses of the last forward (rows·seq values).
    fn read_losses(&self, count: usize) -> Result<Vec<f32>> {
        Ok(self.gpu.download_vec(self.losses.ptr, count)?)
    }

    /// Mean training loss of a micro-batch without the backward pass (for timing splits).
    pub fn forward_only(&mut self, rows: &[u32], micro: usize) -> Result<f64> {
        let seq = self.dims.seq;
        self.upload_tokens(rows, micro, seq + 1, true)?;
        self.forward(micro, seq, true)?;
        let n = micro * seq;
        self.ops.cross_entropy(
            self.logits.ptr,
            self.targets.ptr,
            self.losses.ptr,
            n,
            self.dims.padded_vocab,
            self.dims.smoothing,
            0.0,
            false,
        )?;
        let l = self.read_losses(n)?;
        Ok(l.iter().map(|&x| x as f64).sum::<f64>() / n as f64)
    }
}

impl Backend for CudaBackend {
    fn name(&self) -> String {
        format!("cuda:{}", self.gpu.ordinal)
    }

    fn forward_backward(&mut self, rows: &[u32], micro: usize, grad_scale: f32) -> Result<f64> {
        let d = &self.dims;
        let seq = d.seq;
        if micro == 0 || micro > d.batch {
            return Err(err(format!(
                "CUDA backend: micro-batch {micro} outside 1..={} (allocated from the plan)",
                d.batch
            )));
        }
        if rows.len() != micro * (seq + 1) {
            return Err(err(format!(
                "CUDA backend: expected {} tokens ({micro} rows of {}), got {}",
                micro * (seq + 1),
                seq + 1,
                rows.len()
            )));
        }
        if self.weight_grads_bf16 && self.micro_step_pending.get() {
            return Err(err(
                "CUDA backend: a second micro-step before the optimizer step, but this backend \
                 holds weight gradients in bf16, which is for one micro-step per step (a plan \
                 with gas 1); accumulating would round the sum to bf16",
            ));
        }
        self.upload_tokens(rows, micro, seq + 1, true)?;
        let n = micro * seq;
        let scale = grad_scale / n as f32;
        let alone = self.comm.is_none() && self.shard_comm.is_none() && self.replica_comm.is_none();
        if !self.gemm_tuned_all && self.gemm_tune.is_some() && alone {
            // One discarded pass on this batch times the candidates of every product,
            // the weight-gradient products too: tuning runs those many times over the
            // gradients, which start at zero here and are zeroed again after it. (With
            // other ranks the collectives inside the backward rule this out; there only
            // products that do not add into their input are tuned, at first use.)
            self.lt.set_autotune(self.gemm_tune, true);
            let tuning = self.training_pass(micro, seq, scale);
            self.lt.set_autotune(self.gemm_tune, false);
            tuning?;
            self.gpu.memset_zero(self.grads.ptr, self.grads.bytes)?;
            self.gemm_tuned_all = true;
        }
        self.training_pass(micro, seq, scale)?;
        self.micro_step_pending.set(true);
        let l = self.read_losses(n)?;
        Ok(l.iter().map(|&x| x as f64).sum::<f64>() / n as f64)
    }

    fn grad_norm(&mut self) -> Result<f64> {
        self.clear_stale_grads()?;
        self.reduce_grads()?;
        self.gpu.memset_zero(self.norm_out.ptr, 8)?;
        match self.mode {
            // bf16-held gradients: over the AdamW items, which cover every tensor then
            ShardMode::Replicated if self.weight_grads_bf16 => {
                for u in 0..self.unit_chunks.len() {
                    let own = self.layout.chunk(u, self.layout.rank).start;
                    self.ops.grad_sum_squares(
                        self.grads.ptr + (own * F32) as u64,
                        &self.unit_tables(u),
                        self.norm_out.ptr,
                    )?;
                }
            }
            ShardMode::Replicated => {
                self.ops
                    .sum_squares(self.grads.ptr, self.numel, self.norm_out.ptr)?
            }
            // each rank holds the reduced gradient of its chunks only
            ShardMode::Zero1 => {
                for u in 0..self.layout.units.len() {
                    let own = self.layout.chunk(u, self.layout.rank);
                    self.ops.sum_squares(
                        self.grads.ptr + (own.start * F32) as u64,
                        own.len(),
                        self.norm_out.ptr,
                    )?;
                }
            }
            ShardMode::Zero3 => {
                self.ops
                    .sum_squares(self.grads.ptr, self.layout.local_len, self.norm_out.ptr)?
            }
        }
        let mut v: Vec<f64> = self.gpu.download_vec(self.norm_out.ptr, 1)?;
        if self.mode != ShardMode::Replicated {
            // over the shard group only: hybrid-shard replicas hold the same chunks
            if let Some(comm) = &self.shard_comm {
                comm.all_reduce_host_f64(&mut v)?;
            }
        }
        Ok(v[0].sqrt())
    }

    fn optimizer_step(&mut self, group_lrs: &[f64], grad_mult: f64) -> Result<()> {
        self.clear_stale_grads()?;
        self.reduce_grads()?;
        self.grads_reduced.set(false);
        let groups = &self.plan.optimizer.groups;
        if group_lrs.len() != groups.len() {
            return Err(err(format!(
                "optimizer_step: {} learning rates for {} groups",
                group_lrs.len(),
                groups.len()
            )));
        }
        self.step += 1;
        let mut hyper = Vec::with_capacity(8 * groups.len());
        for (g, &lr) in groups.iter().zip(group_lrs) {
            let h = AdamWHyper {
                lr,
                beta1: g.beta1,
                beta2: g.beta2,
                eps: g.eps,
                weight_decay: g.weight_decay,
                step: self.step,
            };
            hyper.extend(super::selftest::adamw_hyper(&h));
        }
        self.gpu.upload(self.hyper.ptr, &hyper)?;
        // One launch per unit, on this rank's chunk of it.
        for (u, unit) in self.layout.units.iter().enumerate() {
            let UnitChunks { count, zeroed, .. } = self.unit_chunks[u];
            if count == 0 {
                continue;
            }
            let zeroed = if self.overwrite_grads { zeroed } else { count };
            let own = self.layout.chunk(u, self.layout.rank).start;
            let (p, g, pbf) = match self.mode {
                ShardMode::Zero3 => (
                    self.params.ptr + (unit.local_start * F32) as u64,
                    self.grads.ptr + (unit.local_start * F32) as u64,
                    0,
                ),
                _ => (
                    self.params.ptr + (own * F32) as u64,
                    self.grads.ptr + (own * F32) as u64,
                    self.params_bf.ptr + (own * BF) as u64,
                ),
            };
            let state = (unit.local_start * F32) as u64;
            self.ops.adamw(
                p,
                g,
                self.exp_avg.ptr + state,
                self.exp_avg_sq.ptr,
                pbf,
                &self.unit_tables(u),
                zeroed,
                self.hyper.ptr,
                grad_mult as f32,
            )?;
        }
        self.muon_step(group_lrs, grad_mult)?;
        self.micro_step_pending.set(false);
        match self.mode {
            ShardMode::Replicated => self.grads_stale.set(self.overwrite_grads),
            ShardMode::Zero1 => {
                // every rank updated its chunks: gather them everywhere, refresh the bf16
                // copy, and clear the other ranks' partial sums left in the gradients
                let comm = self
                    .shard_comm
                    .as_ref()
                    .ok_or_else(|| err("ZeRO-1 without NCCL"))?;
                self.mark("zero1 all-gather")?;
                for (u, unit) in self.layout.units.iter().enumerate() {
                    comm.all_gather_f32(
                        self.params.ptr + (unit.start * F32) as u64,
                        self.layout.chunk_len(u),
                        self.gpu.raw_stream() as u64,
                    )?;
                }
                self.ops
                    .cast_f32_bf16(self.params.ptr, self.params_bf.ptr, self.numel)?;
                self.gpu.memset_zero(self.grads.ptr, self.grads.bytes)?;
            }
            ShardMode::Zero3 => self.invalidate_slots(),
        }
        Ok(())
    }

    fn set_gradient_sync(&mut self, sync: bool) {
        // ARCHSCALE_OVERLAP_REDUCE=0 reduces once before the norm instead (diagnostics).
        self.sync_grads = sync && std::env::var("ARCHSCALE_OVERLAP_REDUCE").as_deref() != Ok("0");
    }

    fn read_params_is_collective(&self) -> bool {
        self.zero3.is_some()
    }

    fn optimizer_is_sharded(&self) -> bool {
        self.mode != ShardMode::Replicated
    }

    fn device_memory(&self) -> Option<(usize, usize)> {
        Some((self.peak_bytes(), self.model_state_bytes()))
    }

    fn optimizer_shard(&mut self) -> Result<Option<OptimizerShard>> {
        if self.mode == ShardMode::Replicated {
            return Ok(None);
        }
        let comm = self
            .comm
            .as_ref()
            .ok_or_else(|| err("sharded state without NCCL"))?;
        let n = self.layout.local_len;
        Ok(Some(OptimizerShard {
            step: self.step,
            rank: comm.rank,
            manifest: self.layout.manifest(
                self.plan.layout.sharding,
                self.plan.layout.gpus_per_node,
                "optimizer",
            ),
            exp_avg: self.gpu.download_vec(self.exp_avg.ptr, n)?,
            exp_avg_sq: self.second.to_local(
                &self
                    .gpu
                    .download_vec(self.exp_avg_sq.ptr, self.second.len)?,
            )?,
        }))
    }

    fn optimizer_shard_layout(&self) -> Option<(crate::distributed::manifest::Manifest, usize)> {
        (self.mode != ShardMode::Replicated).then(|| {
            let manifest = self.layout.manifest(
                self.plan.layout.sharding,
                self.plan.layout.gpus_per_node,
                "optimizer",
            );
            (manifest, self.layout.rank)
        })
    }

    fn write_optimizer_shard(&mut self, shard: &OptimizerShard) -> Result<()> {
        let (ours, _) = self
            .optimizer_shard_layout()
            .ok_or_else(|| err("write_optimizer_shard: the optimizer state is not sharded"))?;
        let n = self.layout.local_len;
        if shard.manifest.tensors != ours.tensors
            || shard.manifest.shard_len != n
            || shard.exp_avg.len() != n
            || shard.exp_avg_sq.len() != n
        {
            return Err(err(format!(
                "write_optimizer_shard: a shard of {} / {} values cut for another layout \
                 (this rank holds {n})",
                shard.exp_avg.len(),
                shard.exp_avg_sq.len()
            )));
        }
        self.gpu.upload(self.exp_avg.ptr, &shard.exp_avg)?;
        let compact = self
            .second
            .from_local(&shard.exp_avg_sq, self.exp_avg_sq.bytes / F32)?;
        self.gpu.upload(self.exp_avg_sq.ptr, &compact)?;
        self.step = shard.step;
        self.gpu.sync()?;
        Ok(())
    }

    fn eval_loss(
        &mut self,
        tokens: &[u32],
        rows: usize,
        row_len: usize,
        prefixes: &[usize],
    ) -> Result<Vec<f64>> {
        if row_len < 2 || tokens.len() != rows * row_len {
            return Err(err(format!(
                "eval_loss: {} tokens for {rows} rows of {row_len}",
                tokens.len()
            )));
        }
        let seq = row_len - 1;
        if seq > self.rope_len || seq > self.cap_eval {
            return Err(err(format!(
                "eval_loss: rows of {seq} tokens exceed what was allocated ({})",
                self.cap_eval.min(self.rope_len)
            )));
        }
        for &p in prefixes {
            if p == 0 || p > seq {
                return Err(err(format!("eval_loss: prefix {p} outside 1..={seq}")));
            }
        }
        let chunk = (self.cap_train / seq).max(1).min(rows);
        let mut sums = vec![0.0f64; prefixes.len()];
        let mut r0 = 0;
        while r0 < rows {
            let nr = chunk.min(rows - r0);
            self.upload_tokens(
                &tokens[r0 * row_len..(r0 + nr) * row_len],
                nr,
                row_len,
                true,
            )?;
            self.forward(nr, seq, false)?;
            self.ops.cross_entropy(
                self.logits.ptr,
                self.targets.ptr,
                self.losses.ptr,
                nr * seq,
                self.dims.padded_vocab,
                0.0,
                0.0,
                false,
            )?;
            let l = self.read_losses(nr * seq)?;
            for r in 0..nr {
                for (i, &p) in prefixes.iter().enumerate() {
                    sums[i] += l[r * seq..r * seq + p]
                        .iter()
                        .map(|&x| x as f64)
                        .sum::<f64>();
                }
            }
            r0 += nr;
        }
        Ok(prefixes
            .iter()
            .zip(sums)
            .map(|(&p, s)| s / (p * rows) as f64)
            .collect())
    }

    fn last_logits(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        let seq = tokens.len();
        if seq == 0 || seq > self.rope_len || seq > self.cap_eval {
            return Err(err(format!(
                "last_logits: {seq} tokens; this backend was allocated for 1..={}",
                self.cap_eval.min(self.rope_len)
            )));
        }
        // one row of inputs; the target slot is a placeholder (no loss is taken)
        let mut row = tokens.to_vec();
        row.push(0);
        self.upload_tokens(&row, 1, seq + 1, false)?;
        self.forward(1, seq, false)?;
        let v = self.dims.padded_vocab;
        let bits: Vec<u16> = self
            .gpu
            .download_vec(self.logits.ptr + ((seq - 1) * v * BF) as u64, v)?;
        Ok(bits
            .into_iter()
            .map(|b| half::bf16::from_bits(b).to_f32())
            .collect())
    }

    fn read_params(&mut self) -> Result<Vec<Vec<f32>>> {
        if self.zero3.is_some() {
            // collective: every rank gathers unit after unit
            let mut out: Vec<Vec<f32>> = vec![Vec::new(); self.plan.params.len()];
            for (u, unit) in self.layout.units.iter().enumerate() {
                self.gather_unit(u)?;
                for &i in &unit.params {
                    out[i] = self
                        .gpu
                        .download_vec(self.p32(self.offsets[i]), self.layout.numels[i])?;
                }
            }
            return Ok(out);
        }
        let mut out = Vec::with_capacity(self.plan.params.len());
        for (i, p) in self.plan.params.iter().enumerate() {
            out.push(
                self.gpu
                    .download_vec(self.p32(self.offsets[i]), p.numel())?,
            );
        }
        Ok(out)
    }

    fn write_params(&mut self, params: &[Vec<f32>]) -> Result<()> {
        if params.len() != self.plan.params.len() {
            return Err(err(format!(
                "write_params: {} tensors for {} parameters",
                params.len(),
                self.plan.params.len()
            )));
        }
        for (p, v) in self.plan.params.iter().zip(params) {
            if v.len() != p.numel() {
                return Err(err(format!(
                    "write_params: `{}` has {} values, expected {}",
                    p.name,
                    v.len(),
                    p.numel()
                )));
            }
        }
        if self.zero3.is_some() {
            let refs: Vec<&[f32]> = params.iter().map(|v| v.as_slice()).collect();
            let local = self.layout.local_from_full(&refs)?;
            self.gpu.upload(self.params.ptr, &local)?;
            self.invalidate_slots();
            self.gpu.sync()?;
            return Ok(());
        }
        for (i, v) in params.iter().enumerate() {
            self.gpu.upload(self.p32(self.offsets[i]), v)?;
        }
        self.ops
            .cast_f32_bf16(self.params.ptr, self.params_bf.ptr, self.numel)?;
        self.gpu.sync()?;
        Ok(())
    }

    fn read_optimizer_state(&mut self) -> Result<OptimizerState> {
        if self.mode != ShardMode::Replicated {
            return Err(err(
                "CUDA backend: the optimizer state is sharded over the ranks; read it with optimizer_shard()",
            ));
        }
        let mut tensors = Vec::new();
        for (i, p) in self.plan.params.iter().enumerate() {
            let off = (self.offsets[i] * F32) as u64;
            if muon::is_muon(&self.plan, i) {
                // Muon keeps one moment, named as the CPU backend names it
                tensors.push((
                    format!("{}.momentum_buffer", p.name),
                    self.gpu.download_vec(self.exp_avg.ptr + off, p.numel())?,
                ));
                continue;
            }
            tensors.push((
                format!("{}.exp_avg", p.name),
                self.gpu.download_vec(self.exp_avg.ptr + off, p.numel())?,
            ));
            let v = self
                .second
                .index(self.offsets[i])
                .ok_or_else(|| err(format!("`{}` has no second-moment slot", p.name)))?;
            tensors.push((
                format!("{}.exp_avg_sq", p.name),
                self.gpu
                    .download_vec(self.exp_avg_sq.ptr + (v * F32) as u64, p.numel())?,
            ));
        }
        Ok(OptimizerState {
            step: self.step,
            tensors,
        })
    }

    /// Takes the full state (as read back from any world size) and keeps this rank's part.
    /// A Muon matrix's `momentum_buffer` goes where AdamW keeps `exp_avg`; its `exp_avg_sq`
    /// slot gets zeros.
    fn write_optimizer_state(&mut self, state: &OptimizerState) -> Result<()> {
        let unused: Vec<Vec<f32>> = (0..self.plan.params.len())
            .map(|i| {
                let n = if muon::is_muon(&self.plan, i) {
                    self.plan.params[i].numel()
                } else {
                    0
                };
                vec![0.0; n]
            })
            .collect();
        for (suffix, base) in [
            ("exp_avg", self.exp_avg.ptr),
            ("exp_avg_sq", self.exp_avg_sq.ptr),
        ] {
            let mut full: Vec<&[f32]> = Vec::with_capacity(self.plan.params.len());
            for (i, p) in self.plan.params.iter().enumerate() {
                let name = match (muon::is_muon(&self.plan, i), suffix) {
                    (false, _) => format!("{}.{suffix}", p.name),
                    (true, "exp_avg") => format!("{}.momentum_buffer", p.name),
                    (true, _) => {
                        full.push(&unused[i]);
                        continue;
                    }
                };
                let t = state
                    .tensors
                    .iter()
                    .find(|(n, _)| *n == name)
                    .ok_or_else(|| err(format!("optimizer state lacks `{name}`")))?;
                if t.1.len() != p.numel() {
                    return Err(err(format!(
                        "optimizer state `{name}` has {} values, expected {}",
                        t.1.len(),
                        p.numel()
                    )));
                }
                full.push(&t.1);
            }
            let local = self.layout.local_from_full(&full)?;
            if suffix == "exp_avg_sq" {
                let compact = self
                    .second
                    .from_local(&local, self.exp_avg_sq.bytes / F32)?;
                self.gpu.upload(base, &compact)?;
            } else {
                self.gpu.upload(base, &local)?;
            }
        }
        self.step = state.step;
        self.gpu.sync()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan_of(arch: &str) -> Plan {
        plan_at(arch, 4)
    }

    fn plan_at(arch: &str, depth: usize) -> Plan {
        plan_tied(arch, depth, false)
    }

    fn plan_tied(arch: &str, depth: usize, tied: bool) -> Plan {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            r#"arch = "{arch}"
depth = {depth}
parametrization = "sp"
tied_embeddings = {tied}

[base]
depth = {depth}
lr = 1e-3
batch_tokens = 512

[train]
tokens = 51_200
seq_len = 256
micro_batch = 2
swa_len = 128

[data]
train = [{{ synthetic = {{ seed = 1, tokens = 100_000 }} }}]
"#
        );
        let exp = archscale_spec::parse_experiment("exp.toml", &text, dir.path(), &[])
            .unwrap_or_else(|e| panic!("{}", e.render()));
        archscale_compiler::plan_experiment(&exp)
            .unwrap_or_else(|e| panic!("{}", e.render()))
            .swap_remove(0)
    }

    #[test]
    fn samba_runs_on_cuda_with_mamba_and_window_attention_layers() {
        let plan = plan_of("samba");
        let d = dims_of(&plan).unwrap();
        assert_eq!(
            d.mixers,
            [
                LayerKind::Mamba,
                LayerKind::Attention,
                LayerKind::Mamba,
                LayerKind::Attention
            ]
        );
        let m = d.mamba.unwrap();
        assert_eq!((m.d, m.ns), (976, 16));
        assert_eq!(m.rp % 8, 0);
        assert!(m.rp >= m.r);
        assert_eq!(m.xs, m.rp + 2 * m.ns);
        assert_eq!(d.windows[1], 128);
    }

    #[test]
    fn every_yoco_family_is_wired_with_its_memory_and_kv_producers() {
        let d = dims_of(&plan_at("sambay", 8)).unwrap();
        use LayerKind::*;
        assert_eq!(
            d.mixers,
            [Mamba, Attention, Mamba, Attention, Mamba, Attention, Gmu, Attention]
        );
        assert_eq!(d.info[4].memory.map(|m| m.0), Some(MemorySource::Mamba));
        assert!(d.info[5].exports_kv);
        assert_eq!(d.info[6].memory_from, Some(4));
        assert_eq!(d.info[7].kv_from, Some(5));
        assert_eq!(d.proj_in_width(7), d.attn_width());
        let da = dims_of(&plan_at("sambayda", 8)).unwrap();
        assert!(da.info[1].lambda_init.is_some() && da.info[7].lambda_init.is_some());
        assert!(da.info[0].lambda_init.is_none());
        let yoco = dims_of(&plan_at("sambayoco", 8)).unwrap();
        assert!(!yoco.mixers.contains(&Gmu));
    }

    /// The backward's first writers as `ParamMap::gemm_written` lists them: every matrix
    /// (2-D `.weight`) except an untied embedding, which only the embedding backward adds to.
    fn families() -> Vec<Plan> {
        let mut plans = vec![plan_tied("transformer", 4, true)];
        for (arch, depth) in [
            ("transformer", 8),
            ("samba", 8),
            ("sambay", 8),
            ("sambayda", 8),
            ("sambayoco", 8),
            ("sambaymlp", 16),
            ("sambayattn", 16),
        ] {
            plans.push(plan_at(arch, depth));
        }
        plans
    }

    #[test]
    fn every_matrix_but_an_untied_embedding_is_first_written_by_a_product() {
        for plan in families() {
            let d = dims_of(&plan).unwrap();
            let layout = FlatLayout::new(&plan, 1, 0).unwrap();
            let listed = param_map(&plan, &d, &layout.offsets)
                .unwrap()
                .gemm_written();
            let set: std::collections::BTreeSet<usize> = listed.iter().copied().collect();
            assert_eq!(
                set.len(),
                listed.len(),
                "{}: a tensor listed twice",
                plan.model.name
            );
            let tied = plan.params.iter().any(|p| !p.aliases.is_empty());
            for (i, p) in plan.params.iter().enumerate() {
                let matrix = p.shape.len() == 2 && p.name.ends_with(".weight");
                let untied_embedding = p.name == "transformer.wte.weight";
                assert_eq!(
                    set.contains(&layout.offsets[i]),
                    matrix && !untied_embedding,
                    "{} (tied {tied}): {}",
                    plan.model.name,
                    p.name
                );
            }
        }
    }

    #[test]
    fn a_step_zeroes_exactly_the_gradients_no_product_overwrites() {
        for plan in families() {
            let d = dims_of(&plan).unwrap();
            for shards in [1, 3] {
                for rank in 0..shards {
                    let layout = FlatLayout::new(&plan, shards, rank).unwrap();
                    let map = param_map(&plan, &d, &layout.offsets).unwrap();
                    let written = map.gemm_written();
                    let has_second = |i: usize| !muon::is_muon(&plan, i);
                    let second = layout.compact_state(rank, &has_second);
                    let items = adamw_items(&plan, &layout, &second, &written, &[]).unwrap();
                    let mut slots = vec![false; layout.compact_state_len(&has_second)];
                    let tensor_of = |flat: usize| {
                        (0..plan.params.len())
                            .find(|&i| {
                                (layout.offsets[i]..layout.offsets[i] + layout.numels[i])
                                    .contains(&flat)
                            })
                            .unwrap()
                    };
                    let mut covered = 0;
                    for (u, uc) in items.units.iter().enumerate() {
                        let own = layout.chunk(u, rank).start;
                        for k in uc.first..uc.first + uc.count {
                            let (start, len) =
                                (own + items.offs[k] as usize, items.lens[k] as usize);
                            let i = tensor_of(start);
                            // an item never straddles two tensors
                            assert_eq!(i, tensor_of(start + len - 1));
                            // its second moments: own, 16-byte aligned compact slots
                            let v = items.voffs[k] as usize;
                            assert_eq!(v % 4, 0);
                            for slot in &mut slots[v..v + len] {
                                assert!(!*slot, "{}", plan.params[i].name);
                                *slot = true;
                            }
                            let overwritten = written.contains(&layout.offsets[i]);
                            assert_eq!(
                                k < uc.first + uc.zeroed,
                                !overwritten,
                                "{}",
                                plan.params[i].name
                            );
                            covered += len;
                        }
                    }
                    let all: usize = (0..layout.units.len())
                        .flat_map(|u| layout.opt_chunks(u))
                        .map(|c| c.len)
                        .sum();
                    assert_eq!(covered, all, "{} shards {shards}", plan.model.name);
                }
            }
        }
    }

    #[test]
    fn bf16_gradients_fill_the_first_half_of_their_own_slot() {
        for plan in families() {
            let d = dims_of(&plan).unwrap();
            let layout = FlatLayout::new(&plan, 1, 0).unwrap();
            let map = param_map(&plan, &d, &layout.offsets).unwrap();
            let (written, able) = (map.gemm_written(), map.bf16_grad_tensors(&d));
            assert!(able.iter().all(|o| written.contains(o)));
            let tied = map.head == map.wte;
            assert_eq!(able.contains(&map.head), !tied, "{}", plan.model.name);
            let second = layout.compact_state(0, &|i| !muon::is_muon(&plan, i));
            let items = adamw_items(&plan, &layout, &second, &written, &able).unwrap();
            let mut bf16_elems = vec![0usize; plan.params.len()];
            for (u, uc) in items.units.iter().enumerate() {
                let own = layout.chunk(u, 0).start;
                for k in uc.first..uc.first + uc.count {
                    let start = own + items.offs[k] as usize;
                    let i = (0..plan.params.len())
                        .find(|&i| {
                            (layout.offsets[i]..layout.offsets[i] + layout.numels[i])
                                .contains(&start)
                        })
                        .unwrap();
                    let (t0, len) = (layout.offsets[i], items.lens[k] as usize);
                    if !able.contains(&t0) {
                        assert_eq!(items.gbf[k], -1, "{}", plan.params[i].name);
                        continue;
                    }
                    assert!(k >= uc.first + uc.zeroed, "a bf16 gradient is never zeroed");
                    // bf16 element e of the slot sits at byte 4·t0 + 2·e (gbf counts bf16
                    // elements from the unit's gradient base, byte 4·own)
                    let byte = 4 * own + 2 * items.gbf[k] as usize;
                    assert_eq!(byte, 4 * t0 + 2 * (start - t0), "{}", plan.params[i].name);
                    assert!(byte + 2 * len <= 4 * t0 + 2 * layout.numels[i]);
                    assert_eq!(byte % 16, 0, "vector loads need 16-byte items");
                    bf16_elems[i] += len;
                }
            }
            for (i, &n) in bf16_elems.iter().enumerate() {
                let expect = if able.contains(&layout.offsets[i]) {
                    layout.numels[i]
                } else {
                    0
                };
                assert_eq!(n, expect, "{}: {}", plan.model.name, plan.params[i].name);
            }
        }
    }

    #[test]
    fn plan_only_mixers_are_refused_by_name() {
        let e = dims_of(&plan_at("sambay2", 16)).unwrap_err().to_string();
        assert!(e.contains("mamba2") && e.contains("plan-only"), "{e}");
        let mut p = plan_at("sambay", 8);
        p.model.varlen = true;
        assert!(dims_of(&p).unwrap().varlen);
    }
}
