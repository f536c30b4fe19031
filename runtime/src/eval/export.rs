//! Export for the PyTorch stack (`archscale export --format hf`): `model.safetensors` with
//! ArchScale's state-dict names (a tied head is written under both `transformer.wte.weight`
//! and `lm_head.weight`, as `state_dict()` lists both) and a `config.json` for lit-gpt's
//! `Config`:
//!
//! ```python
//! import json, torch
//! from safetensors.torch import load_file
//! from lit_gpt.config import Config
//! from lit_gpt.model import GPT
//! cfg = json.load(open("config.json"))
//! config = Config.from_name(cfg["name"], **cfg["overrides"])
//! model = GPT(config)
//! model.load_state_dict(load_file("model.safetensors"), strict=True)
//! ```
//!
//! `config.json` fields: `name` (the ArchScale config, `Config.from_name` key); `overrides`
//! (what `pretrain.py` injects for this run: `mup`, `original_mup`, `mup_d0`, `mup_hd0`,
//! `block_size`, `use_cu_seqlen`, `eos_token_id`, `tied_embed`, `rope_base`,
//! `local_window`); `resolved` (the dimensions the tensors have, to check against the built
//! `Config`: `n_layer`, `n_embd`, `n_head`, `n_query_groups`, `head_size`,
//! `intermediate_size`, `vocab_size`, `padded_vocab_size`, `_norm_class`, `norm_eps`,
//! `bias`, `attn_bias`, `attn_out_bias`); `layers` (each block's mixer); `run_name`,
//! `train_name` (ArchScale's `eval.py` infers flags from the checkpoint path, so keep the
//! files under a directory of that name); `dtype`; `step`, `tokens`; and, for loaders
//! other than lit-gpt, `blocks` (the plan's layers: mixer kind, window, RoPE, K/V and
//! memory sources, differential attention), `mamba` (sizes), `rope_base` and `multipliers`
//! (`logit_scale`, `residual_scale`, `attn_scale` as the forward applies them).
//!
//! `verify.json` holds what the exported values must compute: two seeded token rows, and
//! this build's CPU decoder's log-probability of each next token and full log-softmax rows
//! at three positions. `bench/export/check_export.py` rebuilds the model in plain PyTorch
//! from these files alone and compares.

use super::decoder::{Decoder, Logits};
use super::load::LoadedModel;
use crate::{Result, RuntimeError};
use archscale_compiler::{Mixer, NormKind, Parametrization};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::tensor::{Dtype, TensorView};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportDtype {
    F32,
    Bf16,
}

fn io(context: String) -> impl FnOnce(std::io::Error) -> RuntimeError {
    move |source| RuntimeError::Io { context, source }
}

/// The `config.json` value of a model.
pub fn config_json(model: &LoadedModel, dtype: ExportDtype) -> Value {
    let plan = &model.plan;
    let m = &plan.model;
    let mup = m.parametrization != Parametrization::Sp;
    // Under μP the plan carries the multipliers; ArchScale's d0 and hd0 are recovered from them.
    let d0 = if mup {
        (m.logit_scale * m.n_layer as f64).round() as i64
    } else {
        16
    };
    let hd0 = if mup {
        (m.attn_scale * m.head_size as f64).powi(2).round() as i64
    } else {
        128
    };
    let window = plan.layers.iter().find_map(|l| match &l.mixer {
        Mixer::Attention(a) => a.window,
        _ => None,
    });
    let mut overrides = json!({
        "mup": mup,
        "original_mup": m.parametrization == Parametrization::Mup,
        "mup_d0": d0,
        "mup_hd0": hd0,
        "block_size": m.block_size,
        "use_cu_seqlen": m.varlen,
        "eos_token_id": m.eos_token_id,
        "tied_embed": m.tied_embeddings,
    });
    if let Some(base) = m.rope_base {
        overrides["rope_base"] = json!(base.round() as i64);
    }
    if let Some(w) = window {
        overrides["local_window"] = json!(w);
    }
    let layers: Vec<String> = plan
        .layers
        .iter()
        .map(|l| {
            let mixer = match &l.mixer {
                Mixer::Attention(a) => match (a.kv_from, a.window) {
                    (Some(src), _) => format!("cross_attention(kv_from={src})"),
                    (None, Some(w)) => format!("attention(window={w})"),
                    (None, None) => "attention".to_string(),
                },
                Mixer::Mamba(_) => "mamba".to_string(),
                Mixer::Mamba2 { .. } => "mamba2".to_string(),
                Mixer::GatedDeltaNet { .. } => "gated_delta_net".to_string(),
                Mixer::Gmu(g) => format!("gmu(memory_from={})", g.memory_from),
            };
            mixer
        })
        .collect();
    json!({
        "format": "archscale-export-v1",
        "name": m.name,
        "overrides": overrides,
        "resolved": {
            "n_layer": m.n_layer,
            "n_embd": m.n_embd,
            "n_head": m.n_head,
            "n_query_groups": m.n_query_groups,
            "head_size": m.head_size,
            "intermediate_size": m.intermediate_size,
            "vocab_size": m.vocab_size,
            "padded_vocab_size": m.padded_vocab_size,
            "_norm_class": match m.norm { NormKind::RmsNorm => "FusedRMSNorm", NormKind::LayerNorm => "LayerNorm" },
            "norm_eps": m.norm_eps,
            "bias": m.bias,
            "attn_bias": m.attn_bias,
            "attn_out_bias": m.attn_out_bias,
        },
        "family": m.family,
        "layers": layers,
        // The same graph in machine-readable form (the plan's layers) and the forward
        // multipliers the plan resolved, for loaders other than lit-gpt.
        "blocks": plan.layers,
        "mlp": m.mlp,
        "mamba": m.mamba,
        "rope_base": m.rope_base,
        "multipliers": {
            "logit_scale": m.logit_scale,
            "residual_scale": m.residual_scale,
            "attn_scale": m.attn_scale,
        },
        "run_name": plan.run_name,
        "train_name": plan.archscale_summary.get("train_name").cloned().unwrap_or(Value::Null),
        "dtype": match dtype { ExportDtype::F32 => "float32", ExportDtype::Bf16 => "bfloat16" },
        "step": model.step,
        "tokens": model.tokens,
    })
}

/// Tokens per verification row (inputs; each row holds one more token, the last target).
pub const VERIFY_LEN: usize = 64;
/// Vocabulary entries of the full log-probability rows (all of them up to this size).
const VERIFY_VOCAB: usize = 4096;

/// The verification rows: `[VERIFY_LEN.min(block_size) + 1]` tokens each, seeded, avoiding
/// the special ids 0..=2: random ids, and random ids whose second half repeats the first
/// (so attention has something to retrieve).
pub fn verification_rows(vocab_size: usize, block_size: usize) -> Vec<Vec<u32>> {
    let len = VERIFY_LEN.min(block_size).max(2) + 1;
    let low = if vocab_size > 3 { 3 } else { 0 };
    let mut rng = ChaCha8Rng::seed_from_u64(0x5eed_e4a0);
    let mut random = |n: usize| -> Vec<u32> {
        (0..n)
            .map(|_| rng.gen_range(low..vocab_size as u32))
            .collect()
    };
    let first = random(len);
    let half = random(len.div_ceil(2));
    let repeat: Vec<u32> = half.iter().chain(&half).copied().take(len).collect();
    vec![first, repeat]
}

/// What the exported weights must compute (`verify.json`): for each row, the log-probability
/// of every next token and the full log-softmax at three positions, from this build's CPU
/// decoder run on exactly the exported values (bf16-rounded for `--dtype bf16`).
pub fn verification_json(model: &LoadedModel, params: &[Vec<f32>]) -> Result<Value> {
    let m = &model.plan.model;
    let rows = verification_rows(m.vocab_size, m.block_size);
    let v = m.padded_vocab_size;
    let vocab_ids: Vec<usize> = if v <= VERIFY_VOCAB {
        (0..v).collect()
    } else {
        (0..VERIFY_VOCAB).map(|i| i * v / VERIFY_VOCAB).collect()
    };
    let mut target_logprobs = Vec::new();
    let mut full = Vec::new();
    let mut total = 0.0;
    let mut count = 0usize;
    let len = rows[0].len() - 1;
    let positions = [0, len / 2, len - 1];
    for row in &rows {
        let mut dec = Decoder::new(&model.plan, params)?;
        let logits = dec.feed(&row[..len], Logits::All)?;
        let mut lps = Vec::with_capacity(len);
        let mut at = Vec::new();
        for (i, z) in logits.chunks(v).enumerate() {
            let max = z.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = max + z.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
            let lp = z[row[i + 1] as usize] as f64 - lse;
            total -= lp;
            count += 1;
            lps.push(lp);
            if positions.contains(&i) {
                at.push(
                    vocab_ids
                        .iter()
                        .map(|&j| z[j] as f64 - lse)
                        .collect::<Vec<f64>>(),
                );
            }
        }
        target_logprobs.push(lps);
        full.push(at);
    }
    Ok(json!({
        "format": "archscale-export-verify-v1",
        "about": "inputs row[:-1], targets row[1:]; natural-log softmax over the padded vocabulary; from archscale's CPU decoder (f32) on the exported tensor values",
        "rows": rows,
        "target_logprobs": target_logprobs,
        "full_positions": positions,
        "full_vocab_ids": vocab_ids,
        "full_logprobs": full,
        "mean_loss": total / count as f64,
        "tolerance": 5e-4,
    }))
}

/// Writes `model.safetensors`, `config.json` and `verify.json` into `out` (created;
/// existing files of these names are replaced only after all are written). Returns the paths.
pub fn export_hf(model: &LoadedModel, out: &Path, dtype: ExportDtype) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(out).map_err(io(format!("creating {}", out.display())))?;
    let exported: Vec<Vec<f32>> = match dtype {
        ExportDtype::F32 => model.params.clone(),
        ExportDtype::Bf16 => model
            .params
            .iter()
            .map(|t| {
                t.iter()
                    .map(|&x| half::bf16::from_f32(x).to_f32())
                    .collect()
            })
            .collect(),
    };
    let verify = serde_json::to_string(&verification_json(model, &exported)?)
        .map_err(|e| RuntimeError::Message(format!("encoding verify.json: {e}")))?;
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (spec, values) in model.plan.params.iter().zip(&model.params) {
        let bytes: Vec<u8> = match dtype {
            ExportDtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ExportDtype::Bf16 => values
                .iter()
                .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                .collect(),
        };
        for name in std::iter::once(&spec.name).chain(&spec.aliases) {
            tensors.push((name.clone(), spec.shape.clone(), bytes.clone()));
        }
    }
    let st_dtype = match dtype {
        ExportDtype::F32 => Dtype::F32,
        ExportDtype::Bf16 => Dtype::BF16,
    };
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, shape, data)| {
            TensorView::new(st_dtype, shape.clone(), data)
                .map(|v| (n.clone(), v))
                .map_err(|e| RuntimeError::Message(format!("tensor {n}: {e}")))
        })
        .collect::<Result<_>>()?;
    let mut metadata = std::collections::HashMap::new();
    metadata.insert("format".to_string(), "pt".to_string());
    let bytes = safetensors::serialize(views, &Some(metadata))
        .map_err(|e| RuntimeError::Message(format!("serialising tensors: {e}")))?;
    let config = serde_json::to_string_pretty(&config_json(model, dtype))
        .map_err(|e| RuntimeError::Message(format!("encoding config.json: {e}")))?;
    let st_path = out.join("model.safetensors");
    let cfg_path = out.join("config.json");
    let st_tmp = out.join("model.safetensors.partial");
    let cfg_tmp = out.join("config.json.partial");
    std::fs::write(&st_tmp, bytes).map_err(io(format!("writing {}", st_tmp.display())))?;
    std::fs::write(&cfg_tmp, config + "\n")
        .map_err(io(format!("writing {}", cfg_tmp.display())))?;
    let verify_path = out.join("verify.json");
    let verify_tmp = out.join("verify.json.partial");
    std::fs::write(&verify_tmp, verify + "\n")
        .map_err(io(format!("writing {}", verify_tmp.display())))?;
    std::fs::rename(&st_tmp, &st_path).map_err(io(format!("writing {}", st_path.display())))?;
    std::fs::rename(&cfg_tmp, &cfg_path).map_err(io(format!("writing {}", cfg_path.display())))?;
    std::fs::rename(&verify_tmp, &verify_path)
        .map_err(io(format!("writing {}", verify_path.display())))?;
    Ok(vec![st_path, cfg_path, verify_path])
}
