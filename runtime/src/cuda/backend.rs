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
use crate::distributed::flat_layout::FlatLayout;
use crate::distributed::nccl::NcclComm;
use crate::optim::adamw::AdamWHyper;
use crate::{Backend, OptimizerState, Result, RuntimeError};
use archscale_compiler::plan::Sharding;
use archscale_compiler::plan::{Mixer, MlpKind, NormKind, OptimizerKind, Plan};
use archscale_kernels::cublaslt::{Lt, OutType};
use archscale_kernels::ops::{AttnLayout, HybridOps, Ops, Rows, ScanGrads, ScanShape, ScanTensors};
use archscale_kernels::{DeviceBuffer, Gpu};
use cudarc::driver::CudaStream;
use std::cell::Cell;
use std::rc::Rc;
use std::sync::Arc;

mod attention;
mod mamba;
mod sharding;

use mamba::{MambaParams, MambaSaved, MambaScratch};
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
    pub mamba: Option<MambaShape>,
}

impl Dims {
    fn qkv_width(&self) -> usize {
        (self.heads + 2 * self.groups) * self.hs
    }
    fn attn_width(&self) -> usize {
        self.heads * self.hs
    }
}

/// Offsets (in elements of the flat parameter buffer) of one block's tensors.
#[derive(Clone, Copy, Debug)]
struct LayerParams {
    norm1: usize,
    /// Attention layers only.
    qkv: usize,
    proj: usize,
    norm2: usize,
    w1: usize,
    w3: usize,
    mamba: Option<MambaParams>,
}

/// The mixer of one layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerKind {
    Attention,
    Mamba,
}

/// Mamba-1 sizes: `d` = d_inner, `r` = dt_rank (stored with row stride `rp`, a multiple of
/// 8 so every row starts 16-byte aligned), `ns` = d_state.
#[derive(Clone, Copy, Debug)]
pub struct MambaShape {
    pub d: usize,
    pub r: usize,
    pub rp: usize,
    pub ns: usize,
}

/// Per-layer saved activations (device pointers).
#[derive(Clone, Copy, Debug)]
struct Saved {
    mamba: Option<MambaSaved>,
    qkv: u64,
    y: u64,
    lse: u64,
    gu: u64,
    rstd1: u64,
    rstd2: u64,
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
    ln_f: usize,
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
    exp_avg_sq: DeviceBuffer,
    chunk_off: DeviceBuffer,
    chunk_len: DeviceBuffer,
    chunk_group: DeviceBuffer,
    /// Per unit: (first AdamW work item, count) in the chunk tables.
    unit_chunks: Vec<(usize, usize)>,
    hyper: DeviceBuffer,
    zero3: Option<Zero3Slots>,
    // activations
    residual: Vec<DeviceBuffer>, // 2L+1 fp32 [cap, n]; index 0 has eval capacity
    saved: Vec<Saved>,
    /// Layer whose saved buffers evaluation uses for layer `l` (the first of its kind).
    eval_saved: Vec<usize>,
    mamba_scratch: Option<MambaScratch>,
    /// Mamba / hybrid kernels, loaded only for models that have such layers.
    hops: Option<HybridOps>,
    _saved_bufs: Vec<DeviceBuffer>,
    rstd_f: DeviceBuffer,
    hf: DeviceBuffer,
    logits: DeviceBuffer,
    losses: DeviceBuffer,
    tokens: DeviceBuffer,
    targets: DeviceBuffer,
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
}

const BF: usize = 2;
const F32: usize = 4;

/// Checks that `plan` is a model this backend runs, and extracts its dimensions.
pub fn dims_of(plan: &Plan) -> Result<Dims> {
    dims_with(
        plan,
        std::env::var_os("ARCHSCALE_EXPERIMENTAL_MAMBA").is_some(),
    )
}

/// As [`dims_of`]; `allow_mamba` admits Mamba-1 layers, whose CUDA path has an open
/// gradient discrepancy (see the refusal below).
pub fn dims_with(plan: &Plan, allow_mamba: bool) -> Result<Dims> {
    let m = &plan.model;
    if m.norm != NormKind::RmsNorm {
        return Err(err(
            "CUDA backend: only RMSNorm models are supported (LayerNorm is not built yet)",
        ));
    }
    if m.mlp != MlpKind::Swiglu {
        return Err(err("CUDA backend: only SwiGLU MLPs are supported"));
    }
    if m.bias || m.attn_bias || m.attn_out_bias {
        return Err(err("CUDA backend: linear biases are not supported yet"));
    }
    if m.varlen {
        return Err(err(
            "CUDA backend: varlen (document-masked) attention is not built yet",
        ));
    }
    if m.n_head % m.n_query_groups != 0 {
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
    let mut windows = Vec::new();
    let mut rope = Vec::new();
    let mut mixers = Vec::new();
    for l in &plan.layers {
        match &l.mixer {
            Mixer::Attention(a) => {
                if a.kv_from.is_some()
                    || a.differential.is_some()
                    || a.exports_memory
                    || l.mlp_exports_memory
                {
                    return Err(err(format!(
                        "CUDA backend: layer {} uses cross-attention, differential attention or GMU memory, which are not built yet",
                        l.index
                    )));
                }
                windows.push(a.window.unwrap_or(0));
                rope.push(a.rope);
                mixers.push(LayerKind::Attention);
            }
            Mixer::Mamba(mp) => {
                if !allow_mamba {
                    return Err(err(format!(
                        "CUDA backend: layer {} is Mamba-1, which is experimental on CUDA: its x_proj gradient (the dB/dC rows) differs from the CPU reference by 1e-2 to 4e-1 from run to run (bench/NOTES.md, \"Samba on CUDA\"); train it with --backend cpu, or set ARCHSCALE_EXPERIMENTAL_MAMBA=1 to run it anyway",
                        l.index
                    )));
                }
                if mp.export_memory {
                    return Err(err(format!(
                        "CUDA backend: layer {} exports GMU memory, which is not built yet",
                        l.index
                    )));
                }
                windows.push(0);
                rope.push(false);
                mixers.push(LayerKind::Mamba);
            }
            other => {
                let kind = match other {
                    Mixer::Mamba(_) => "mamba",
                    Mixer::Mamba2 { .. } => "mamba2",
                    Mixer::GatedDeltaNet { .. } => "gated_deltanet",
                    Mixer::Gmu(_) => "gmu",
                    Mixer::Attention(_) => "attention",
                };
                return Err(err(format!(
                    "CUDA backend: layer {} mixer `{kind}` is not built yet (attention and Mamba-1 only)",
                    l.index
                )));
            }
        }
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
        if g.optimizer != OptimizerKind::AdamW {
            return Err(err(format!(
                "CUDA backend: optimizer {:?} (group `{}`) is not built yet; AdamW only",
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
    })
}

/// Device bytes the backend will allocate for `plan` (for fitting a micro-batch).
pub fn planned_bytes(plan: &Plan) -> Result<usize> {
    let d = dims_of(plan)?;
    let numel: usize = plan
        .params
        .iter()
        .map(|p| p.numel().div_ceil(64) * 64)
        .sum();
    let cap = d.batch * d.seq;
    let cap_eval = cap.max(plan.data.val_block_size.saturating_sub(1));
    let common = cap * (2 * d.n * F32 + 2 * d.inner * BF + 2 * F32);
    let attention = cap * (d.qkv_width() * BF + d.attn_width() * BF + d.heads * F32);
    let mamba = d.mamba.map_or(0, |m| {
        cap * (5 * m.d + m.rp + 2 * m.ns) * BF
            + archscale_kernels::ops::ScanShape {
                batch: d.batch,
                seq: d.seq,
                d_inner: m.d,
            }
            .ckpt_len()
                * F32
    });
    let layers: usize = d
        .mixers
        .iter()
        .map(|k| {
            common
                + match k {
                    LayerKind::Attention => attention,
                    LayerKind::Mamba => mamba,
                }
        })
        .sum();
    let mamba_scratch = d.mamba.map_or(0, |m| {
        cap * ((4 * m.d + m.rp + 2 * m.ns) * BF + 2 * m.ns * F32)
    });
    let params = numel * (4 * F32 + BF);
    let acts =
        layers + mamba_scratch + cap_eval * (d.n * F32 + d.padded_vocab * BF + d.n * BF + 3 * F32);
    let scratch = cap
        * (d.n * BF
            + d.inner * BF
            + d.n * F32
            + d.n * BF
            + d.attn_width() * BF
            + d.qkv_width() * BF
            + d.attn_width() * F32)
        + cap_eval * d.n * BF
        + d.batch * d.heads * d.seq * F32;
    Ok(params + acts + scratch + (64 << 20))
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
        let (world, rank) = shard_comm.as_ref().map_or((1, 0), |c| (c.world, c.rank));
        let shards = if mode == ShardMode::Replicated {
            1
        } else {
            world
        };
        let layout = FlatLayout::new(plan, shards, if shards == 1 { 0 } else { rank })?;
        let offsets = layout.offsets.clone();
        let numel = layout.numel;
        let find = |name: &str| -> Result<usize> {
            plan.params
                .iter()
                .position(|p| p.name == name || p.aliases.iter().any(|a| a == name))
                .map(|i| offsets[i])
                .ok_or_else(|| err(format!("CUDA backend: plan has no parameter `{name}`")))
        };
        let expect_shape = |name: &str, shape: &[usize]| -> Result<()> {
            let p = plan
                .params
                .iter()
                .find(|p| p.name == name || p.aliases.iter().any(|a| a == name));
            match p {
                Some(p) if p.shape == shape => Ok(()),
                Some(p) => Err(err(format!(
                    "CUDA backend: `{name}` has shape {:?}, expected {shape:?}",
                    p.shape
                ))),
                None => Err(err(format!("CUDA backend: plan has no parameter `{name}`"))),
            }
        };
        let mut layer_params = Vec::new();
        let mut known = 0;
        for i in 0..d.layers {
            let pre = format!("transformer.h.{i}");
            expect_shape(&format!("{pre}.mlp.w1.weight"), &[2 * d.inner, d.n])?;
            expect_shape(&format!("{pre}.mlp.w3.weight"), &[d.n, d.inner])?;
            let (qkv, proj, mamba) = match (d.mixers[i], d.mamba) {
                (LayerKind::Mamba, Some(ms)) => {
                    let (n, dd, r, ns) = (d.n, ms.d, ms.r, ms.ns);
                    let a = format!("{pre}.attn");
                    expect_shape(&format!("{a}.in_proj.weight"), &[2 * dd, n])?;
                    expect_shape(&format!("{a}.conv1d.weight"), &[dd, 1, 4])?;
                    expect_shape(&format!("{a}.x_proj.weight"), &[r + 2 * ns, dd])?;
                    expect_shape(&format!("{a}.dt_proj.weight"), &[dd, r])?;
                    expect_shape(&format!("{a}.A_log"), &[dd, ns])?;
                    expect_shape(&format!("{a}.out_proj.weight"), &[n, dd])?;
                    known += 13;
                    let mp = MambaParams {
                        in_proj: find(&format!("{a}.in_proj.weight"))?,
                        conv_w: find(&format!("{a}.conv1d.weight"))?,
                        conv_b: find(&format!("{a}.conv1d.bias"))?,
                        x_proj: find(&format!("{a}.x_proj.weight"))?,
                        dt_w: find(&format!("{a}.dt_proj.weight"))?,
                        dt_b: find(&format!("{a}.dt_proj.bias"))?,
                        a_log: find(&format!("{a}.A_log"))?,
                        d_skip: find(&format!("{a}.D"))?,
                        out_proj: find(&format!("{a}.out_proj.weight"))?,
                    };
                    (0, 0, Some(mp))
                }
                _ => {
                    expect_shape(&format!("{pre}.attn.attn.weight"), &[d.qkv_width(), d.n])?;
                    expect_shape(&format!("{pre}.attn.proj.weight"), &[d.n, d.attn_width()])?;
                    known += 6;
                    (
                        find(&format!("{pre}.attn.attn.weight"))?,
                        find(&format!("{pre}.attn.proj.weight"))?,
                        None,
                    )
                }
            };
            layer_params.push(LayerParams {
                norm1: find(&format!("{pre}.norm_1.weight"))?,
                qkv,
                proj,
                norm2: find(&format!("{pre}.norm_2.weight"))?,
                w1: find(&format!("{pre}.mlp.w1.weight"))?,
                w3: find(&format!("{pre}.mlp.w3.weight"))?,
                mamba,
            });
        }
        expect_shape("transformer.wte.weight", &[d.padded_vocab, d.n])?;
        expect_shape("lm_head.weight", &[d.padded_vocab, d.n])?;
        let wte = find("transformer.wte.weight")?;
        let ln_f = find("transformer.ln_f.weight")?;
        let head = find("lm_head.weight")?;
        let tied = head == wte;
        known += if tied { 2 } else { 3 };
        if plan.params.len() != known {
            let names: Vec<&str> = plan.params.iter().map(|p| p.name.as_str()).collect();
            return Err(err(format!(
                "CUDA backend: expected {known} parameters, the plan has {} ({})",
                plan.params.len(),
                names.join(", ")
            )));
        }

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
        let exp_avg_sq = alloc(local * F32)?;
        gpu.memset_zero(params.ptr, params.bytes)?;
        gpu.memset_zero(grads.ptr, grads.bytes)?;
        gpu.memset_zero(exp_avg.ptr, exp_avg.bytes)?;
        gpu.memset_zero(exp_avg_sq.ptr, exp_avg_sq.bytes)?;

        // AdamW work items, unit by unit, offsets relative to the rank's chunk of the unit
        let (mut offs, mut lens, mut grps) =
            (Vec::<i64>::new(), Vec::<i32>::new(), Vec::<i32>::new());
        let mut unit_chunks = Vec::with_capacity(layout.units.len());
        for u in 0..layout.units.len() {
            let first = offs.len();
            for c in layout.opt_chunks(u) {
                offs.push(c.offset as i64);
                lens.push(c.len as i32);
                grps.push(c.group as i32);
            }
            unit_chunks.push((first, offs.len() - first));
        }
        let n_chunks = offs.len().max(1);
        let chunk_off = alloc(n_chunks * 8)?;
        let chunk_len = alloc(n_chunks * 4)?;
        let chunk_group = alloc(n_chunks * 4)?;
        if !offs.is_empty() {
            gpu.upload(chunk_off.ptr, &offs)?;
            gpu.upload(chunk_len.ptr, &lens)?;
            gpu.upload(chunk_group.ptr, &grps)?;
        }
        let hyper = alloc(8 * F32 * plan.optimizer.groups.len().max(1))?;
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
        // Evaluation runs every layer in the buffers of the first layer of its kind, which
        // therefore get the (possibly longer) evaluation capacity.
        let eval_saved: Vec<usize> = (0..d.layers)
            .map(|l| (0..=l).find(|&k| d.mixers[k] == d.mixers[l]).unwrap_or(l))
            .collect();
        for l in 0..d.layers {
            let cap = if eval_saved[l] == l {
                cap_eval
            } else {
                cap_train
            };
            let gu = alloc(cap * 2 * d.inner * BF)?;
            let rstd1 = alloc(cap * F32)?;
            let rstd2 = alloc(cap * F32)?;
            let (mut qkv, mut y, mut lse, mut mamba) = (0, 0, 0, None);
            match (d.mixers[l], d.mamba) {
                (LayerKind::Mamba, Some(ms)) => {
                    // state checkpoints are written in training only
                    let ckpt_len = archscale_kernels::ops::ScanShape {
                        batch: d.batch,
                        seq: d.seq,
                        d_inner: ms.d,
                    }
                    .ckpt_len();
                    let bufs = [
                        alloc(cap * 2 * ms.d * BF)?,
                        alloc(cap * ms.d * BF)?,
                        alloc(cap * ms.rp * BF)?,
                        alloc(cap * 2 * ms.ns * BF)?,
                        alloc(cap * ms.d * BF)?,
                        alloc(cap * ms.d * BF)?,
                        alloc(ckpt_len * F32)?,
                    ];
                    mamba = Some(MambaSaved {
                        xz: bufs[0].ptr,
                        xc: bufs[1].ptr,
                        dt: bufs[2].ptr,
                        bc: bufs[3].ptr,
                        delta: bufs[4].ptr,
                        gated: bufs[5].ptr,
                        ckpt: bufs[6].ptr,
                    });
                    saved_bufs.extend(bufs);
                }
                _ => {
                    let bq = alloc(cap * d.qkv_width() * BF)?;
                    let by = alloc(cap * d.attn_width() * BF)?;
                    let bl = alloc(cap * d.heads * F32)?;
                    (qkv, y, lse) = (bq.ptr, by.ptr, bl.ptr);
                    saved_bufs.extend([bq, by, bl]);
                }
            }
            saved.push(Saved {
                mamba,
                qkv,
                y,
                lse,
                gu: gu.ptr,
                rstd1: rstd1.ptr,
                rstd2: rstd2.ptr,
            });
            saved_bufs.extend([gu, rstd1, rstd2]);
        }
        let rstd_f = alloc(cap_eval * F32)?;
        let hf = alloc(cap_eval * d.n * BF)?;
        let logits = alloc(cap_eval * d.padded_vocab * BF)?;
        let losses = alloc(cap_eval * F32)?;
        let tokens = alloc(cap_eval * 4)?;
        let targets = alloc(cap_eval * 4)?;
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
        let (mamba_scratch, hops) = match d.mamba {
            Some(ms) => {
                let c = cap_train;
                let bufs = [
                    alloc(c * 2 * ms.d * BF)?,
                    alloc(c * ms.d * BF)?,
                    alloc(c * ms.d * BF)?,
                    alloc(c * ms.rp * BF)?,
                    alloc(c * 2 * ms.ns * BF)?,
                    alloc(c * 2 * ms.ns * F32)?,
                    alloc(c * ms.d * BF)?,
                ];
                let sc = MambaScratch {
                    dxz: bufs[0].ptr,
                    dxc: bufs[1].ptr,
                    ddelta: bufs[2].ptr,
                    ddt: bufs[3].ptr,
                    dbc: bufs[4].ptr,
                    bc_acc: bufs[5].ptr,
                    dgated: bufs[6].ptr,
                };
                saved_bufs.extend(bufs);
                (Some(sc), Some(HybridOps::new(gpu.clone())?))
            }
            None => (None, None),
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
            layer_params,
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
            chunk_off,
            chunk_len,
            chunk_group,
            unit_chunks,
            hyper,
            zero3,
            residual,
            saved,
            eval_saved,
            mamba_scratch,
            hops,
            _saved_bufs: saved_bufs,
            rstd_f,
            hf,
            logits,
            losses,
            tokens,
            targets,
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
        };
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

    /// One full optimizer step with a device event before every op; returns milliseconds
    /// per op name (summed over layers), in first-seen order.
    pub fn profile_step(
        &mut self,
        rows: &[u32],
        micro: usize,
        lrs: &[f64],
    ) -> Result<Vec<(String, f64)>> {
        *self.prof.borrow_mut() = Some(Vec::new());
        let r = (|| -> Result<()> {
            self.forward_backward(rows, micro, 1.0)?;
            self.mark("grad norm")?;
            self.grad_norm()?;
            self.mark("adamw")?;
            self.optimizer_step(lrs, 1.0)?;
            self.mark("end")?;
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
        Ok(out)
    }

    /// Accumulated gradients in plan order (f32).
    pub fn read_grads(&self) -> Result<Vec<Vec<f32>>> {
        let mut out = Vec::with_capacity(self.plan.params.len());
        for (i, p) in self.plan.params.iter().enumerate() {
            out.push(
                self.gpu
                    .download_vec(self.g32(self.offsets[i]), p.numel())?,
            );
        }
        Ok(out)
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
            + self.exp_avg_sq.bytes;
        if let Some(z) = &self.zero3 {
            b += z.e_f32.bytes + z.e_bf.bytes + z.e_grad.bytes;
            b += z.l_f32.bytes + z.l_bf.bytes + z.l_grad.bytes;
        }
        b
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
        if with_targets {
            self.gpu.upload(self.targets.ptr, &tgt)?;
        }
        Ok(())
    }

    /// Forward over `batch` rows of `seq` tokens already uploaded. `train`: per-layer saves
    /// (else every layer uses the buffers of the first layer of its kind). Leaves bf16
    /// logits in `self.logits`.
    fn forward(&self, batch: usize, seq: usize, train: bool) -> Result<()> {
        let d = &self.dims;
        let rows = batch * seq;
        let (n, inner) = (d.n, d.inner);
        let ops = &self.ops;
        let gpu = &self.gpu;
        let rs = d.residual_scale;
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
        for l in 0..d.layers {
            let lp = self.layer_params[l];
            let sv = if train {
                self.saved[l]
            } else {
                self.saved[self.eval_saved[l]]
            };
            self.gather_unit(uof(lp.norm1))?;
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
            ops.rmsnorm_fwd(
                x_in,
                self.p32(lp.norm1),
                self.h.ptr,
                sv.rstd1,
                rows,
                n,
                d.eps,
                1.0,
            )?;
            match d.mixers[l] {
                LayerKind::Attention => {
                    self.attention_forward(l, &lp, &sv, batch, seq, x_in, x_mid)?
                }
                LayerKind::Mamba => self.mamba_forward(&lp, &sv, batch, seq, x_in, x_mid, train)?,
            }
            self.mark("norm fwd")?;
            ops.rmsnorm_fwd(
                x_mid,
                self.p32(lp.norm2),
                self.h.ptr,
                sv.rstd2,
                rows,
                n,
                d.eps,
                1.0,
            )?;
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
            self.mark("swiglu")?;
            ops.swiglu_fwd(sv.gu, self.a.ptr, rows, inner)?;
            self.mark("gemm w3")?;
            self.lt.linear(
                gpu,
                self.a.ptr,
                self.pbf(lp.w3),
                x_out,
                x_mid,
                rows,
                inner,
                n,
                OutType::F32,
                rs,
                1.0,
            )?;
        }
        let x_final = if train {
            self.residual[2 * d.layers].ptr
        } else {
            self.residual[0].ptr
        };
        self.gather_unit(uof(self.ln_f))?;
        self.gather_unit(uof(self.head))?;
        self.mark("norm fwd")?;
        ops.rmsnorm_fwd(
            x_final,
            self.p32(self.ln_f),
            self.hf.ptr,
            self.rstd_f.ptr,
            rows,
            n,
            d.eps,
            d.logit_scale,
        )?;
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
            1.0,
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
        let (u_norm, u_head, u_embed) = (uof(self.ln_f), uof(self.head), uof(self.wte));
        self.gather_unit(u_norm)?;
        self.gather_unit(u_head)?;
        self.grads_begin(u_norm)?;
        if u_head != u_norm {
            self.grads_begin(u_head)?;
        }
        // head: dW_head += dlogitsᵀ·hf; dhf = dlogits·W_head
        self.mark("gemm head dW")?;
        lt.linear_grad_weight(
            gpu,
            self.logits.ptr,
            self.hf.ptr,
            self.g32(self.head),
            rows,
            n,
            d.padded_vocab,
            1.0,
            1.0,
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
            1.0,
            0.0,
        )?;
        self.mark("norm bwd")?;
        ops.rmsnorm_bwd(
            self.residual[2 * d.layers].ptr,
            self.p32(self.ln_f),
            self.rstd_f.ptr,
            self.h.ptr,
            self.dres.ptr,
            self.dres_bf.ptr,
            self.g32(self.ln_f),
            rows,
            n,
            d.logit_scale,
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
        for l in (0..d.layers).rev() {
            let lp = self.layer_params[l];
            let u_layer = uof(lp.norm1);
            self.gather_unit(u_layer)?;
            self.grads_begin(u_layer)?;
            let sv = self.saved[l];
            let (x_in, x_mid) = (self.residual[2 * l].ptr, self.residual[2 * l + 1].ptr);
            // MLP branch: out = rs · a·W3ᵀ
            self.mark("swiglu")?;
            ops.swiglu_fwd(sv.gu, self.a.ptr, rows, inner)?;
            self.mark("gemm w3 dW")?;
            lt.linear_grad_weight(
                gpu,
                self.dres_bf.ptr,
                self.a.ptr,
                self.g32(lp.w3),
                rows,
                inner,
                n,
                rs,
                1.0,
            )?;
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
            self.mark("norm fwd")?;
            ops.rmsnorm_fwd(
                x_mid,
                self.p32(lp.norm2),
                self.h.ptr,
                0,
                rows,
                n,
                d.eps,
                1.0,
            )?;
            self.mark("gemm w1 dW")?;
            lt.linear_grad_weight(
                gpu,
                sv.gu,
                self.h.ptr,
                self.g32(lp.w1),
                rows,
                n,
                2 * inner,
                1.0,
                1.0,
            )?;
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
            self.mark("norm bwd")?;
            ops.rmsnorm_bwd(
                x_mid,
                self.p32(lp.norm2),
                sv.rstd2,
                self.h.ptr,
                self.dres.ptr,
                self.dres_bf.ptr,
                self.g32(lp.norm2),
                rows,
                n,
                1.0,
                true,
            )?;
            match d.mixers[l] {
                LayerKind::Attention => self.attention_backward(l, &lp, &sv, batch, seq, x_in)?,
                LayerKind::Mamba => self.mamba_backward(&lp, &sv, batch, seq, x_in)?,
            }
            self.mark("norm bwd")?;
            ops.rmsnorm_bwd(
                x_in,
                self.p32(lp.norm1),
                sv.rstd1,
                self.h.ptr,
                self.dres.ptr,
                self.dres_bf.ptr,
                self.g32(lp.norm1),
                rows,
                n,
                1.0,
                true,
            )?;
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
        self.upload_tokens(rows, micro, seq + 1, true)?;
        self.forward(micro, seq, true)?;
        let n = micro * seq;
        let scale = grad_scale / n as f32;
        self.mark("cross-entropy")?;
        self.ops.cross_entropy(
            self.logits.ptr,
            self.targets.ptr,
            self.losses.ptr,
            n,
            self.dims.padded_vocab,
            self.dims.smoothing,
            scale,
            true,
        )?;
        self.backward(micro, seq)?;
        let l = self.read_losses(n)?;
        Ok(l.iter().map(|&x| x as f64).sum::<f64>() / n as f64)
    }

    fn grad_norm(&mut self) -> Result<f64> {
        self.reduce_grads()?;
        self.gpu.memset_zero(self.norm_out.ptr, 8)?;
        match self.mode {
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
            let (first, count) = self.unit_chunks[u];
            if count == 0 {
                continue;
            }
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
                self.exp_avg_sq.ptr + state,
                pbf,
                self.chunk_off.ptr + (first * 8) as u64,
                self.chunk_len.ptr + (first * 4) as u64,
                self.chunk_group.ptr + (first * 4) as u64,
                count,
                self.hyper.ptr,
                grad_mult as f32,
            )?;
        }
        match self.mode {
            ShardMode::Replicated => {}
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
            exp_avg_sq: self.gpu.download_vec(self.exp_avg_sq.ptr, n)?,
        }))
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
            tensors.push((
                format!("{}.exp_avg", p.name),
                self.gpu.download_vec(self.exp_avg.ptr + off, p.numel())?,
            ));
            tensors.push((
                format!("{}.exp_avg_sq", p.name),
                self.gpu
                    .download_vec(self.exp_avg_sq.ptr + off, p.numel())?,
            ));
        }
        Ok(OptimizerState {
            step: self.step,
            tensors,
        })
    }

    /// Takes the full state (as read back from any world size) and keeps this rank's part.
    fn write_optimizer_state(&mut self, state: &OptimizerState) -> Result<()> {
        for (suffix, base) in [
            ("exp_avg", self.exp_avg.ptr),
            ("exp_avg_sq", self.exp_avg_sq.ptr),
        ] {
            let mut full: Vec<&[f32]> = Vec::with_capacity(self.plan.params.len());
            for p in &self.plan.params {
                let name = format!("{}.{suffix}", p.name);
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
            self.gpu.upload(base, &local)?;
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
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            r#"arch = "{arch}"
depth = 4
parametrization = "sp"

[base]
depth = 4
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
        let d = dims_with(&plan, true).unwrap();
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
        assert_eq!(d.windows[1], 128);
        let refused = dims_of(&plan).unwrap_err().to_string();
        assert!(
            refused.contains("ARCHSCALE_EXPERIMENTAL_MAMBA"),
            "{refused}"
        );
    }

    #[test]
    fn sambay_is_refused_naming_what_is_missing() {
        let e = dims_with(&plan_of("sambay"), true).unwrap_err().to_string();
        assert!(e.contains("not built yet"), "{e}");
    }
}
