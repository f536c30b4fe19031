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
//! Memory per GPU: fp32 master params (4 B), fp32 grads (4 B), optimizer state (AdamW and
//! NAdam 8 B, Muon momentum 4 B per element), each divided by the shard count of the
//! layout, plus activations saved for backward at `micro x T` tokens (`activation_bytes_per_token`).

use crate::plan::{
    LayerPlan, MemoryEstimate, Mixer, ModelConfig, OptimizerKind, OptimizerPlan, ParamSpec,
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

/// Activation bytes saved for backward per token, bf16 activations and an fp32 residual
/// stream, flash attention (no T x T scores), nothing recomputed:
/// - per block: both norm inputs (fp32, 4n each) and outputs (bf16, 2n each);
///   MLP `w1` output (2·2I) and SwiGLU output (2I), bf16;
/// - attention: Q, K, V (or Q alone for cross-attention) and the output before `proj`,
///   plus the softmax statistics (fp32 per head); differential attention adds the two
///   `2hs`-wide branch outputs before `subln`;
/// - Mamba: `in_proj` output (2·d_in), conv output, x_proj output, Δ, scan output y and
///   the gated product (d_in each), all bf16;
/// - GMU: `in_proj` output and the gated product (d_mem each);
/// - Mamba-2 / GDN: every projection output and the pre-norm output, bf16;
/// - head: final norm (4n + 2n), bf16 logits (2V) and their fp32 copy (4V).
pub fn activation_bytes_per_token(cfg: &ModelConfig, layers: &[LayerPlan]) -> f64 {
    let n = cfg.n_embd as f64;
    let inter = cfg.intermediate_size as f64;
    let (h, g, hs) = (
        cfg.n_head as f64,
        cfg.n_query_groups as f64,
        cfg.head_size as f64,
    );
    let mut total = 0.0;
    for layer in layers {
        total += 2.0 * (4.0 * n + 2.0 * n) + 2.0 * (2.0 * inter) + 2.0 * inter;
        total += match &layer.mixer {
            Mixer::Attention(a) => {
                let qkv = if a.kv_from.is_some() {
                    h * hs
                } else {
                    (h + 2.0 * g) * hs
                };
                let da = if a.differential.is_some() {
                    2.0 * 2.0 * (2.0 * hs) * (h / 2.0)
                } else {
                    0.0
                };
                2.0 * qkv + 2.0 * h * hs + 4.0 * h + da
            }
            Mixer::Mamba(_) => match cfg.mamba {
                Some(m) => {
                    let d = m.d_inner as f64;
                    2.0 * (2.0 * d + d + (m.dt_rank + 2 * m.d_state) as f64 + d + d + d)
                }
                None => 0.0,
            },
            Mixer::Mamba2 { .. } => {
                let m = crate::params::mamba2_dims(cfg.n_embd);
                let d = m.d_inner as f64;
                2.0 * ((2.0 * d + 2.0 * m.d_state as f64 + m.nheads as f64)
                    + m.conv_dim as f64
                    + d
                    + d)
            }
            Mixer::GatedDeltaNet { .. } => {
                let gd = crate::params::gdn_dims(cfg.n_embd);
                let (k, v) = (gd.key_dim as f64, gd.value_dim as f64);
                2.0 * (2.0 * (2.0 * k + v) + 2.0 * v + 2.0 * v)
            }
            Mixer::Gmu(gm) => 2.0 * 2.0 * gm.d_mem as f64,
        };
    }
    total + 6.0 * n + 6.0 * cfg.padded_vocab_size as f64
}

/// Bytes of optimizer state per element for each group's optimizer.
fn optimizer_state_bytes(opt: &OptimizerPlan, params: &[ParamSpec]) -> u64 {
    params
        .iter()
        .map(|p| {
            let per = match opt.groups.get(p.group).map(|g| g.optimizer) {
                Some(OptimizerKind::Muon) => 4,
                _ => 8,
            };
            per * p.numel() as u64
        })
        .sum()
}

/// Elements of the largest unit a ZeRO-3 rank gathers at once: one block
/// (`transformer.h.{i}.*`), the embedding, or the head (everything else).
fn largest_unit(params: &[ParamSpec]) -> u64 {
    let mut units: std::collections::BTreeMap<String, u64> = Default::default();
    for p in params {
        let key = match p.name.strip_prefix("transformer.h.") {
            Some(rest) => format!("h.{}", rest.split('.').next().unwrap_or("")),
            None if p.name.starts_with("transformer.wte") => "embedding".into(),
            None => "head".into(),
        };
        *units.entry(key).or_default() += p.numel() as u64;
    }
    units.values().copied().max().unwrap_or(0)
}

/// Per-GPU memory under `sharding`.
pub fn memory(
    sharding: Sharding,
    world: usize,
    gpus_per_node: usize,
    params: &[ParamSpec],
    opt: &OptimizerPlan,
    activation_bytes: u64,
    gpu_memory_gib: f64,
) -> MemoryEstimate {
    let numel: u64 = params.iter().map(|p| p.numel() as u64).sum();
    let full = (4 * numel, 4 * numel, optimizer_state_bytes(opt, params));
    let div = |bytes: u64, k: usize| bytes.div_ceil(k.max(1) as u64);
    let (params_bytes, grads_bytes, optimizer_bytes) = match sharding {
        Sharding::DataParallel => full,
        Sharding::Zero1 => (full.0, full.1, div(full.2, world)),
        Sharding::Zero3 => (div(full.0, world), div(full.1, world), div(full.2, world)),
        Sharding::HybridShard => (
            div(full.0, gpus_per_node),
            div(full.1, gpus_per_node),
            div(full.2, gpus_per_node),
        ),
    };
    let working_bytes = match sharding {
        Sharding::DataParallel | Sharding::Zero1 => 2 * numel,
        Sharding::Zero3 | Sharding::HybridShard => {
            let tied = params
                .iter()
                .any(|p| p.aliases.iter().any(|a| a == "transformer.wte.weight"));
            10 * largest_unit(params) * if tied { 2 } else { 1 }
        }
    };
    let total_bytes =
        params_bytes + grads_bytes + optimizer_bytes + working_bytes + activation_bytes;
    let gpu_bytes = (gpu_memory_gib.max(0.0) * GIB) as u64;
    MemoryEstimate {
        params_bytes,
        grads_bytes,
        optimizer_bytes,
        working_bytes,
        activations_bytes: activation_bytes,
        total_bytes,
        gpu_bytes,
        fits: total_bytes <= gpu_bytes,
    }
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
    fn working_copy_is_a_bf16_copy_or_one_gathered_unit() {
        let numel: u64 = params(false).iter().map(|p| p.numel() as u64).sum();
        assert_eq!(working(Sharding::DataParallel, false), 2 * numel);
        assert_eq!(working(Sharding::Zero1, false), 2 * numel);
        // largest unit: the head (ln_f 8 + lm_head 800) beats the embedding (800) and a
        // block (704); fp32 + bf16 + fp32 gradient = 10 bytes per element
        assert_eq!(working(Sharding::Zero3, false), 10 * 808);
        // a tied embedding keeps its own slot beside the shared one
        assert_eq!(working(Sharding::HybridShard, true), 2 * 10 * 808);
    }
}
