//! FLOP and memory estimates, and the default sharding choice.
//!
//! FLOPs (per training token, forward + backward = 3x forward):
//! - ArchScale basis (arch-spec §7): `6N + 12·L·n·T`, N = all parameters counted once.
//! - Exact: the matmuls actually executed. Every Linear costs `2·in·out` per token; the
//!   LM head `2·n·V`; attention `4·H·hs` per (query, key) pair (QKᵀ and AV) over the pairs
//!   a causal, possibly windowed mask keeps (`T(T+1)/2` when full); differential attention
//!   runs four half-head flash calls, `8·H·hs` per pair. Elementwise work counted: the
//!   Mamba conv (`2·k·d_inner`) and selective scan (`7·d_inner·d_state`: Δ·A, exp, two
//!   products and a sum for the state, C·h and its sum). Norms, activations, the GDN and
//!   Mamba-2 scans, and flash attention's backward recompute are not counted.
//!   Varlen document masking is unknown at plan time, so varlen runs count full causal
//!   pairs (an upper bound).
//!
//! Memory per GPU: what the CUDA runtime allocates (`CudaBackend::with_comm`, every buffer
//! is allocated once, so its peak is their sum): fp32 params and grads (4 + 4 B), AdamW's
//! two moments (8 B, also for Muon matrices), a bf16 working copy (2 B) per element of the
//! 64-aligned flat layout, sharded as the layout says ([`memory`]); plus the saved
//! activations, scratch and head buffers at `micro·T` training and `num_extrapol·T`
//! evaluation tokens and the 64 MiB cuBLASLt workspace ([`activation_bytes`]).

use crate::plan::{
    LayerPlan, MemoryEstimate, Mixer, ModelConfig, OptimizerKind, OptimizerPlan, ParamSpec, Plan,
    Sharding,
};

pub const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// ArchScale's `6N + 12·L·n·T` (speed_monitor.py `estimate_flops`, per token).
pub fn flops_archscale(params_total: u64, cfg: &ModelConfig) -> f64 {
    6.0 * params_total as f64
        + 12.0 * cfg.n_layer as f64 * cfg.n_embd as f64 * cfg.block_size as f64
}

/// Mean number of keys a query attends to under a causal mask with an optional window.
pub fn mean_causal_pairs(t: usize, window: Option<usize>) -> f64 {
    let t = t as f64;
    let pairs = match window {
        Some(w) if (w as f64) < t => {
            let w = w as f64;
            w * (w + 1.0) / 2.0 + (t - w) * w
        }
        _ => t * (t + 1.0) / 2.0,
    };
    pairs / t
}

/// Matmul (and counted elementwise) FLOPs of one training token, forward x3.
pub fn flops_exact(cfg: &ModelConfig, layers: &[LayerPlan], params: &[ParamSpec]) -> f64 {
    let t = cfg.block_size;
    // Every 2-D weight except the embedding is a Linear executed once per token.
    let linear: f64 = params
        .iter()
        .filter(|p| {
            p.shape.len() == 2 && p.name.ends_with(".weight") && p.name != "transformer.wte.weight"
        })
        .map(|p| 2.0 * p.numel() as f64)
        .sum();
    let mut mixers = 0.0;
    for layer in layers {
        mixers += match &layer.mixer {
            Mixer::Attention(a) => {
                let per_pair = if a.differential.is_some() { 8.0 } else { 4.0 };
                per_pair * (cfg.n_head * cfg.head_size) as f64 * mean_causal_pairs(t, a.window)
            }
            Mixer::Mamba(_) => match cfg.mamba {
                Some(m) => (2 * m.d_conv * m.d_inner + 7 * m.d_inner * m.d_state) as f64,
                None => 0.0,
            },
            Mixer::Mamba2 { .. } | Mixer::GatedDeltaNet { .. } | Mixer::Gmu(_) => 0.0,
        };
    }
    3.0 * (linear + mixers)
}

/// Bytes the CUDA runtime's `Gpu::alloc` takes for a request: at least 1, rounded up to 256.
fn alloc_size(bytes: usize) -> u64 {
    (bytes.max(1).div_ceil(256) * 256) as u64
}

/// cuBLASLt workspace (kernels/src/cublaslt.rs `WORKSPACE_BYTES`), one per backend.
pub const CUBLASLT_WORKSPACE: usize = 64 << 20;
/// Selective-scan state checkpoint spacing (kernels/src/ops.rs `SCAN_CKPT_EVERY`).
pub const SCAN_CKPT_EVERY: usize = 16;
/// Elements every tensor of the runtime's flat buffers is aligned to (distributed/flat_layout.rs).
const FLAT_ALIGN: usize = 64;
/// Largest AdamW work item (distributed/flat_layout.rs `OPT_CHUNK`).
pub const ADAMW_ITEM: usize = 1 << 13;

/// Width of the GMU memory layer `layer` exports (the MLP's export wins, as in the runtime).
fn exported_memory(cfg: &ModelConfig, layer: &LayerPlan) -> Option<usize> {
    if layer.mlp_exports_memory {
        return Some(cfg.intermediate_size);
    }
    match &layer.mixer {
        Mixer::Attention(a) if a.exports_memory => Some(cfg.n_head * cfg.head_size),
        Mixer::Mamba(m) if m.export_memory => cfg.mamba.map(|d| d.d_inner),
        _ => None,
    }
}

/// Device bytes the CUDA runtime allocates for activations and scratch
/// (`CudaBackend::with_comm` in runtime/src/cuda/backend.rs, buffer by buffer), training
/// `micro` rows of `seq` tokens and evaluating `val_len`-token rows: everything except the
/// parameters, gradients, optimizer state and their working copies ([`memory`]).
///
/// Training buffers hold `micro·seq` tokens; the evaluation ones hold
/// `max(micro·seq, val_len)`: residual 0, the head's buffers, and the saved buffers of the
/// first layer of each buffer class (evaluation reuses them for every layer of that class).
/// Mamba-2 and Gated DeltaNet layers are plan-only (the runtime refuses them); they count
/// their projection outputs as saved activations.
pub fn activation_bytes(
    cfg: &ModelConfig,
    layers: &[LayerPlan],
    micro: usize,
    seq: usize,
    val_len: usize,
) -> u64 {
    // u128, token counts capped at 2^64: no product can overflow (widths are at most 2^24,
    // compile.rs `MAX_DIM`), and the total saturates at u64::MAX
    let u = |x: usize| x as u128;
    let cap64 = |x: u128| x.min(1 << 64);
    let ct = cap64(u(micro) * u(seq));
    let ce = ct.max(cap64(u(val_len)));
    let (n, inter, vocab) = (
        u(cfg.n_embd),
        u(cfg.intermediate_size),
        u(cfg.padded_vocab_size),
    );
    let (h, g, hs) = (u(cfg.n_head), u(cfg.n_query_groups), u(cfg.head_size));
    let (aw, qkvw) = (h * hs, (h + 2 * g) * hs);
    let ln = cfg.norm == crate::plan::NormKind::LayerNorm;
    let mamba = cfg
        .mamba
        .filter(|_| layers.iter().any(|l| matches!(l.mixer, Mixer::Mamba(_))));
    let (bf, f32) = (2, 4);
    let mut total = 0u128;
    let mut add = |bytes: u128| total = total.saturating_add(bytes.max(1).div_ceil(256) * 256);

    // cuBLASLt workspace
    add(u(CUBLASLT_WORKSPACE));
    // residual stream: 2L+1 fp32 buffers, the first at evaluation capacity
    add(ce * n * f32);
    for _ in 0..2 * layers.len() {
        add(ct * n * f32);
    }
    // per-layer saved activations (`Saved`); evaluation reuses the first layer of each
    // class, which therefore gets the evaluation capacity; layers that export K/V or memory
    // keep their own
    type Class = (u8, bool, bool, Option<usize>, Option<usize>);
    let mut seen: Vec<Class> = Vec::new();
    for (l, layer) in layers.iter().enumerate() {
        let memory = exported_memory(cfg, layer).map(u);
        let (kind, cross, diff, reads, exports_kv) = match &layer.mixer {
            Mixer::Attention(a) => (
                0,
                a.kv_from.is_some(),
                a.differential.is_some(),
                None,
                a.exports_kv,
            ),
            Mixer::Mamba(_) => (1, false, false, None, false),
            Mixer::Gmu(gm) => (2, false, false, Some(gm.d_mem), false),
            Mixer::Mamba2 { .. } => (3, false, false, None, false),
            Mixer::GatedDeltaNet { .. } => (4, false, false, None, false),
        };
        let own = (exports_kv || memory.is_some()).then_some(l);
        let class: Class = (kind, cross, diff, reads, own);
        let cap = if seen.contains(&class) {
            ct
        } else {
            seen.push(class);
            ce
        };
        // MLP w1 output (gate and up), both norms' rstd (and LayerNorm means)
        add(cap * 2 * inter * bf);
        add(cap * f32);
        add(cap * f32);
        if ln {
            add(cap * f32);
            add(cap * f32);
        }
        // fp32 gradient of the exported memory, summed over its readers
        if let Some(w) = memory {
            add(ct * w * f32);
        }
        match &layer.mixer {
            Mixer::Attention(a) => {
                let fh = if a.differential.is_some() { 2 * h } else { h };
                let proj_in = if a.kv_from.is_some() { aw } else { qkvw };
                // QKV (Q) projection output, attention output, flash log-sum-exp
                add(cap * proj_in * bf);
                add(cap * aw * bf);
                add(cap * fh * f32);
                if a.differential.is_some() {
                    // 2H-head flash output, subln rstd, the four λ
                    add(cap * fh * hs * bf);
                    add(cap * (h / 2) * f32);
                    add(4 * f32);
                }
            }
            Mixer::Mamba(mp) => {
                if let Some(m) = mamba {
                    let (d, rp, ns) = (u(m.d_inner), u(m.dt_rank.div_ceil(8) * 8), u(m.d_state));
                    // in_proj output (x, z), conv output, x_proj output [dt | zeros | B |
                    // C] (row stride rp + 2·ns), Δ, gated output, scan state checkpoints
                    // (training rows only)
                    add(cap * 2 * d * bf);
                    add(cap * d * bf);
                    add(cap * (rp + 2 * ns) * bf);
                    add(cap * d * bf);
                    add(cap * d * bf);
                    add(cap64(u(micro) * u(seq.div_ceil(SCAN_CKPT_EVERY))) * ns * d * f32);
                    // a Mamba memory exporter keeps its pre-gate scan output
                    if mp.export_memory && !layer.mlp_exports_memory {
                        add(cap * d * bf);
                    }
                }
            }
            // in_proj output and the gate's output (the out-projection's input)
            Mixer::Gmu(gm) => {
                add(cap * u(gm.d_mem) * bf);
                add(cap * u(gm.d_mem) * bf);
            }
            Mixer::Mamba2 { .. } => {
                let m = crate::params::mamba2_dims(cfg.n_embd);
                let d = m.d_inner;
                add(cap * u(2 * d + 2 * m.d_state + m.nheads + m.conv_dim + 2 * d) * bf);
            }
            Mixer::GatedDeltaNet { .. } => {
                let gd = crate::params::gdn_dims(cfg.n_embd);
                let (k, v) = (gd.key_dim, gd.value_dim);
                add(cap * u(2 * (2 * k + v) + 4 * v) * bf);
            }
        }
    }
    // head: final-norm rstd and mean, normed hidden, bf16 logits, losses, token ids,
    // targets, varlen document starts
    add(ce * f32);
    add(if ln { ce * f32 } else { 64 });
    add(ce * n * bf);
    add(ce * vocab * bf);
    add(ce * f32);
    add(ce * 4);
    add(ce * 4);
    add(if cfg.varlen { ce * 4 } else { 64 });
    // bf16 RoPE cos and sin tables, `[max(seq, val_len), hs/2]`
    let rope_len = cap64(u(seq.max(val_len)));
    add(rope_len * (hs / 2) * bf);
    add(rope_len * (hs / 2) * bf);
    // scratch: normed input, SwiGLU output (evaluation rows); residual gradient (fp32 and
    // bf16), attention output gradient, QKV gradient, flash dQ accumulator and Δ, norm out
    add(ce * n * bf);
    add(ce * inter * bf);
    add(ct * n * f32);
    add(ct * n * bf);
    add(ct * aw * bf);
    add(ct * qkvw * bf);
    add(ct * aw * f32);
    add(ct * h * f32);
    add(8);
    // Mamba backward scratch (`MambaScratch`)
    if let Some(m) = mamba {
        let (d, rp, ns) = (u(m.d_inner), u(m.dt_rank.div_ceil(8) * 8), u(m.d_state));
        add(ct * 2 * d * bf);
        add(ct * d * bf);
        add(ct * d * bf);
        add(ct * (rp + 2 * ns) * bf);
        add(ct * 2 * ns * f32);
        add(ct * d * bf);
        // x_proj and dt_proj weights with the dt rank padded to rp
        add((rp + 2 * ns) * d * bf);
        add(d * rp * bf);
    }
    // cross-layer gradients (`CrossScratch`): YOCO K/V, GMU memory
    let cross = layers
        .iter()
        .any(|l| matches!(&l.mixer, Mixer::Attention(a) if a.kv_from.is_some()));
    if cross {
        add(ct * qkvw * f32);
        add(ct * aw * bf);
    }
    let mem = layers
        .iter()
        .filter_map(|l| exported_memory(cfg, l))
        .max()
        .map_or(0, u);
    if mem > 0 {
        add(ct * mem * bf);
        add(ct * mem * bf);
        add(ct * mem * bf);
    }
    // differential attention (`DiffScratch`): index tables, 2H-head Q/K/V and branch
    // outputs (evaluation rows), their gradients and the 2H-head flash scratch
    let diff = layers
        .iter()
        .any(|l| matches!(&l.mixer, Mixer::Attention(a) if a.differential.is_some()));
    if diff {
        let kv = 2 * g * hs;
        add((7 * h + 4 * g) * 4);
        for bytes in [2 * aw * bf, kv * bf, kv * bf, aw * bf, aw * bf] {
            add(ce * bytes);
        }
        for bytes in [
            aw * bf,
            aw * bf,
            2 * aw * bf,
            2 * aw * bf,
            kv * bf,
            kv * bf,
            2 * aw * f32,
            2 * h * f32,
        ] {
            add(ct * bytes);
        }
    }
    u64::try_from(total).unwrap_or(u64::MAX)
}

/// The runtime's flat layout (distributed/flat_layout.rs) of `params` cut into `shards`:
/// units (embedding, each block, head) of 64-aligned tensors, each unit padded to a
/// multiple of `64·shards`. Returns each unit's padded length and its tensors' (offset in
/// the unit, numel, param index).
type FlatUnit = (usize, Vec<(usize, usize, usize)>);
fn flat_units(params: &[ParamSpec], shards: usize) -> Vec<FlatUnit> {
    let key = |name: &str| match name.strip_prefix("transformer.h.") {
        Some(rest) => format!("h.{}", rest.split('.').next().unwrap_or("")),
        None if name.starts_with("transformer.wte") => "embedding".into(),
        None => "head".into(),
    };
    let mut order: Vec<String> = Vec::new();
    if params.iter().any(|p| key(&p.name) == "embedding") {
        order.push("embedding".into());
    }
    for p in params {
        let k = key(&p.name);
        if k != "embedding" && k != "head" && !order.contains(&k) {
            order.push(k);
        }
    }
    if params.iter().any(|p| key(&p.name) == "head") {
        order.push("head".into());
    }
    order
        .iter()
        .map(|k| {
            let mut pos = 0;
            let mut tensors = Vec::new();
            for (i, p) in params.iter().enumerate() {
                if &key(&p.name) == k {
                    tensors.push((pos, p.numel(), i));
                    pos += p.numel().div_ceil(FLAT_ALIGN) * FLAT_ALIGN;
                }
            }
            let step = FLAT_ALIGN * shards.max(1);
            (pos.div_ceil(step) * step, tensors)
        })
        .collect()
}

fn is_muon(opt: &OptimizerPlan, p: &ParamSpec) -> bool {
    opt.groups.get(p.group).map(|g| g.optimizer) == Some(OptimizerKind::Muon)
}

/// Per-GPU device memory of the CUDA runtime under `sharding` (`CudaBackend::with_comm`):
/// the model state computed here plus `activation_bytes` ([`activation_bytes`]).
///
/// - params: fp32 master copy, the whole flat buffer, or under ZeRO-3 this rank's chunks;
/// - grads: fp32, sized as params (a one-micro-step weight gradient held in bf16 uses the
///   first half of its tensor's slot);
/// - optimizer: `exp_avg` (fp32, this rank's chunks; Muon matrices keep their momentum
///   there) and `exp_avg_sq` (fp32, slots for this rank's pieces of AdamW tensors only), the
///   AdamW work-item tables, the group hyperparameters, and Muon's Newton–Schulz scratch
///   (sized for the largest matrix, never sharded);
/// - working copy: the bf16 copy of every parameter, or under ZeRO-3 / hybrid shard the
///   gather slots (fp32 and bf16 parameters and fp32 gradient of the largest unit, plus a
///   slot of its own for a tied embedding's unit);
/// - NCCL's 512-byte scratch per communicator when `world > 1` (in activations).
///
/// ZeRO-1 / ZeRO-3 shard over `world` ranks, hybrid shard over the GPUs of a node; one GPU
/// replicates whatever the layout says, as the runtime does.
pub fn memory(
    sharding: Sharding,
    world: usize,
    gpus_per_node: usize,
    params: &[ParamSpec],
    opt: &OptimizerPlan,
    activation_bytes: u64,
    gpu_memory_gib: f64,
) -> MemoryEstimate {
    let nodes = world.div_ceil(gpus_per_node.max(1));
    let (shards, zero3) = match sharding {
        _ if world <= 1 => (1, false),
        Sharding::DataParallel => (1, false),
        Sharding::Zero1 => (world, false),
        Sharding::Zero3 => (world, true),
        Sharding::HybridShard if nodes > 1 => (gpus_per_node.max(1), true),
        Sharding::HybridShard => (world, true),
    };
    let units = flat_units(params, shards);
    let numel: usize = units.iter().map(|u| u.0).sum();
    let local = numel / shards;
    let (f32, bf) = (4, 2);

    let params_bytes = alloc_size(if zero3 { local } else { numel } * f32);
    let grads_bytes = params_bytes;

    // AdamW work items of rank 0's chunk of each unit (at most `ADAMW_ITEM` elements each)
    let mut items = 0;
    for (len, tensors) in &units {
        let chunk = len / shards;
        for &(off, numel, i) in tensors {
            if !is_muon(opt, &params[i]) {
                let own = (off + numel).min(chunk).saturating_sub(off);
                items += own.div_ceil(ADAMW_ITEM);
            }
        }
    }
    let items = items.max(1);
    let muon_shapes: Vec<(usize, usize)> = params
        .iter()
        .filter(|p| is_muon(opt, p))
        .map(|p| {
            let rows = p.shape.first().copied().unwrap_or(1).max(1);
            (rows, p.numel() / rows)
        })
        .collect();
    // kernels/src/muon.rs `MuonScratch`: two working copies of the largest (8-padded)
    // matrix, its Gram matrix and polynomial, a norm accumulator
    let muon = if muon_shapes.is_empty() {
        0
    } else {
        let pad8 = |x: usize| x.div_ceil(8) * 8;
        let x = muon_shapes.iter().map(|&(r, c)| pad8(r) * pad8(c)).max();
        let gram = muon_shapes
            .iter()
            .map(|&(r, c)| pad8(r.min(c)).pow(2))
            .max();
        let (x, gram) = (x.unwrap_or(0).max(64), gram.unwrap_or(0).max(64));
        2 * alloc_size(x * bf) + 2 * alloc_size(gram * bf) + alloc_size(8)
    };
    // AdamW's second moments, compact (runtime `FlatLayout::compact_state_len`): per rank,
    // its pieces of AdamW tensors, each padded to 64; every rank allocates the longest
    let second = (0..shards)
        .map(|r| {
            let mut len = 0;
            for (unit_len, tensors) in &units {
                let chunk = unit_len / shards;
                let own = r * chunk..(r + 1) * chunk;
                for &(off, numel, i) in tensors {
                    if !is_muon(opt, &params[i]) {
                        let piece = (off + numel)
                            .min(own.end)
                            .saturating_sub(off.max(own.start));
                        len += piece.div_ceil(FLAT_ALIGN) * FLAT_ALIGN;
                    }
                }
            }
            len
        })
        .max()
        .unwrap_or(0)
        .max(FLAT_ALIGN);
    // item tables: offsets, bf16 gradient offsets, second-moment offsets (i64), lengths,
    // groups (i32)
    let optimizer_bytes = alloc_size(local * f32)
        + alloc_size(second * f32)
        + 3 * alloc_size(items * 8)
        + 2 * alloc_size(items * 4)
        + alloc_size(8 * f32 * opt.groups.len().max(1))
        + muon;

    let working_bytes = if zero3 {
        // a tied embedding is `lm_head.weight` under an alias, in the head unit
        let tied = params
            .iter()
            .position(|p| p.aliases.iter().any(|a| a == "transformer.wte.weight"));
        let embed_unit = tied.and_then(|i| units.iter().position(|u| u.1.iter().any(|t| t.2 == i)));
        let e_len = embed_unit.map_or(64, |u| units[u].0);
        let l_len = units
            .iter()
            .enumerate()
            .filter(|(u, _)| Some(*u) != embed_unit)
            .map(|(_, u)| u.0)
            .max()
            .unwrap_or(64);
        // `params_bf` shrinks to a 64-element stub; each slot is fp32 + bf16 + fp32 grad
        alloc_size(64 * bf)
            + [e_len, l_len]
                .iter()
                .map(|&len| 2 * alloc_size(len * f32) + alloc_size(len * bf))
                .sum::<u64>()
    } else {
        alloc_size(numel * bf)
    };
    let nccl = match (world > 1, sharding == Sharding::HybridShard && nodes > 1) {
        (false, _) => 0,
        (true, false) => 512,
        (true, true) => 3 * 512,
    };
    let activations_bytes = activation_bytes.saturating_add(nccl);
    let total_bytes = [
        grads_bytes,
        optimizer_bytes,
        working_bytes,
        activations_bytes,
    ]
    .iter()
    .fold(params_bytes, |t, &b| t.saturating_add(b));
    let gpu_bytes = (gpu_memory_gib.max(0.0) * GIB) as u64;
    MemoryEstimate {
        params_bytes,
        grads_bytes,
        optimizer_bytes,
        working_bytes,
        activations_bytes,
        total_bytes,
        gpu_bytes,
        fits: total_bytes <= gpu_bytes,
    }
}

/// [`memory`] of `plan` as it stands (for a plan whose micro-batch or layout was changed
/// after compiling, as `archscale bench --micro` does).
pub fn plan_memory(plan: &Plan) -> MemoryEstimate {
    let l = &plan.layout;
    let activations = activation_bytes(
        &plan.model,
        &plan.layers,
        l.micro_batch,
        l.seq_len,
        plan.data.val_block_size.saturating_sub(1),
    );
    memory(
        l.sharding,
        l.world,
        l.gpus_per_node,
        &plan.params,
        &plan.optimizer,
        activations,
        plan.estimates.memory.gpu_bytes as f64 / GIB,
    )
}

/// The largest micro-batch (sequences per device per micro-step) whose [`plan_memory`]
/// total is at most `bytes`, searched up to `limit`; `None` when not even one fits. Memory
/// grows with the micro-batch, so a doubling then a bisection finds it.
pub fn largest_micro_that_fits(plan: &Plan, bytes: u64, limit: usize) -> Option<usize> {
    let fits = |m: usize| {
        let mut p = plan.clone();
        p.layout.micro_batch = m;
        plan_memory(&p).total_bytes <= bytes
    };
    if limit == 0 || !fits(1) {
        return None;
    }
    let mut lo = 1; // fits
    let mut hi = 2;
    while hi <= limit && fits(hi) {
        lo = hi;
        hi *= 2;
    }
    let mut hi = hi.min(limit + 1); // does not fit, or past the limit
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if fits(mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Some(lo)
}

/// The default layout when the spec names none: the least communication that fits.
/// One GPU: data parallel. Otherwise ZeRO-1 (optimizer state sharded; the gradient
/// all-reduce costs what plain DDP costs) if it fits; else, on several nodes, hybrid
/// shard (parameter all-gathers stay on the node's NVLink, ArchScale's own choice); else
/// full ZeRO-3. If nothing fits, ZeRO-3 (the smallest) and the plan says it does not fit.
pub fn choose_sharding(
    world: usize,
    nodes: usize,
    gpus_per_node: usize,
    params: &[ParamSpec],
    opt: &OptimizerPlan,
    activation_bytes: u64,
    gpu_memory_gib: f64,
) -> Sharding {
    if world <= 1 {
        return Sharding::DataParallel;
    }
    let fits = |s| {
        memory(
            s,
            world,
            gpus_per_node,
            params,
            opt,
            activation_bytes,
            gpu_memory_gib,
        )
        .fits
    };
    if fits(Sharding::Zero1) {
        Sharding::Zero1
    } else if nodes > 1 && fits(Sharding::HybridShard) {
        Sharding::HybridShard
    } else {
        Sharding::Zero3
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::InitRule;

    fn spec(name: &str, shape: &[usize], aliases: &[&str]) -> ParamSpec {
        ParamSpec {
            name: name.into(),
            aliases: aliases.iter().map(|a| a.to_string()).collect(),
            shape: shape.to_vec(),
            init: InitRule::Normal { std: 0.02 },
            group: 0,
            layer: None,
        }
    }

    fn params(tied: bool) -> Vec<ParamSpec> {
        let mut v = vec![];
        if !tied {
            v.push(spec("transformer.wte.weight", &[100, 8], &[]));
        }
        for l in 0..2 {
            v.push(spec(
                &format!("transformer.h.{l}.attn.attn.weight"),
                &[24, 8],
                &[],
            ));
            v.push(spec(
                &format!("transformer.h.{l}.mlp.w1.weight"),
                &[64, 8],
                &[],
            ));
        }
        v.push(spec("transformer.ln_f.weight", &[8], &[]));
        let alias: &[&str] = if tied {
            &["transformer.wte.weight"]
        } else {
            &[]
        };
        v.push(spec("lm_head.weight", &[100, 8], alias));
        v
    }

    fn working(sharding: Sharding, tied: bool) -> u64 {
        let opt = OptimizerPlan {
            groups: vec![],
            grad_clip: 1.0,
        };
        memory(sharding, 4, 4, &params(tied), &opt, 0, 80.0).working_bytes
    }

    #[test]
    fn working_copy_is_a_bf16_copy_or_the_zero3_gather_slots() {
        // Flat layout, one shard: every tensor 64-aligned, every unit a multiple of 64:
        // embedding 800 -> 832; each block 192 + 512 = 704; head ln_f 8 -> 64 plus
        // lm_head 800 -> 832 = 896. 3136 elements, bf16 6272 B, allocated in 256 B: 6400.
        assert_eq!(working(Sharding::DataParallel, false), 6400);
        // ZeRO-1 over 4: units padded to 256: 1024 + 768 + 768 + 1024 = 3584, bf16 7168 B
        assert_eq!(working(Sharding::Zero1, false), 7168);
        // ZeRO-3, untied: params_bf shrinks to 64 elements (256 B); the embedding slot is a
        // 64-element stub (3 x 256 B); the shared slot holds the largest unit (1024):
        // fp32 4096 + bf16 2048 + fp32 grad 4096
        assert_eq!(working(Sharding::Zero3, false), 256 + 768 + 10240);
        // tied: no embedding unit; the head unit (1024) gets its own slot, the shared one
        // the largest block (768: 3072 + 1536 + 3072)
        assert_eq!(working(Sharding::HybridShard, true), 256 + 10240 + 7680);
    }

    #[test]
    fn one_gpu_replicates_whatever_the_layout_says() {
        let opt = OptimizerPlan {
            groups: vec![],
            grad_clip: 1.0,
        };
        let p = params(true);
        let dp = memory(Sharding::DataParallel, 1, 1, &p, &opt, 0, 80.0);
        for s in [Sharding::Zero1, Sharding::Zero3, Sharding::HybridShard] {
            assert_eq!(memory(s, 1, 1, &p, &opt, 0, 80.0), dp);
        }
        // tied, one shard: blocks 704 + 704, head 64 + 832 = 896: 2304 elements
        assert_eq!(dp.working_bytes, 2 * 2304);
        assert_eq!(dp.params_bytes, 4 * 2304);
        assert_eq!(dp.grads_bytes, 4 * 2304);
        // two fp32 moments (the second one compact, the same size here: every tensor is
        // AdamW's and 64-aligned), six AdamW work items (one per tensor: three 48 B tables of
        // offsets and two 24 B ones, 256 B each), the hyperparameter block (32 B -> 256)
        assert_eq!(dp.optimizer_bytes, 2 * 4 * 2304 + 5 * 256 + 256);
        assert_eq!(dp.activations_bytes, 0);
    }

    fn tiny_transformer(layers: usize) -> (ModelConfig, Vec<LayerPlan>) {
        let cfg = ModelConfig {
            name: "tiny".into(),
            family: "transformer".into(),
            n_layer: layers,
            n_embd: 64,
            n_head: 2,
            n_query_groups: 1,
            head_size: 64,
            intermediate_size: 128,
            vocab_size: 256,
            padded_vocab_size: 256,
            norm: crate::plan::NormKind::RmsNorm,
            norm_eps: 1e-5,
            mlp: crate::plan::MlpKind::Swiglu,
            tied_embeddings: false,
            bias: false,
            attn_bias: false,
            attn_out_bias: false,
            rope_base: Some(10000.0),
            block_size: 256,
            parametrization: crate::plan::Parametrization::Sp,
            logit_scale: 1.0,
            residual_scale: 1.0,
            attn_scale: 0.125,
            varlen: false,
            eos_token_id: 0,
            mamba: None,
        };
        let attn = crate::plan::AttentionPlan {
            window: None,
            rope: true,
            kv_from: None,
            exports_kv: false,
            exports_memory: false,
            differential: None,
        };
        let layers = (0..layers)
            .map(|index| LayerPlan {
                index,
                mixer: Mixer::Attention(attn.clone()),
                mlp_exports_memory: false,
            })
            .collect();
        (cfg, layers)
    }

    #[test]
    fn longer_evaluation_rows_grow_the_head_and_the_first_layer_of_a_class_only() {
        // n 64, 2 heads x 64 (QKV width 256, attention 128), MLP 128, vocab 256; every
        // buffer below is a multiple of 256 B at 256 and 1024 tokens, so no rounding
        let (cfg, layers) = tiny_transformer(2);
        let short = activation_bytes(&cfg, &layers, 1, 256, 256);
        let long = activation_bytes(&cfg, &layers, 1, 256, 1024);
        // per evaluation token: residual 0 (fp32 n = 256 B); layer 0's w1 output (2I bf16
        // 512), two rstd (8), QKV (512), attention output (256), log-sum-exp (2 heads, 8);
        // head rstd, hidden, logits, loss, token, target (4 + 128 + 512 + 12); RoPE cos and
        // sin (2 x 32 bf16 = 128); scratch h and a (128 + 256). Layer 1 reuses layer 0's.
        let per_token = 256 + (512 + 8 + 512 + 256 + 8) + (4 + 128 + 512 + 12) + 128 + 384;
        assert_eq!(long - short, (1024 - 256) * per_token);
        // and a third layer of the same class costs only training rows
        let (cfg3, layers3) = tiny_transformer(3);
        let third = activation_bytes(&cfg3, &layers3, 1, 256, 1024) - long;
        // two fp32 residuals (2 x 256 B) + w1 output, rstd, QKV, output, lse (1296 B)
        assert_eq!(third, 256 * (2 * 256 + 1296));
    }
}
