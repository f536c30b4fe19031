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
//! files under a directory of that name); `dtype`; `step`, `tokens`.

use super::load::LoadedModel;
use crate::{Result, RuntimeError};
use archscale_compiler::{Mixer, NormKind, Parametrization};
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
        "run_name": plan.run_name,
        "train_name": plan.archscale_summary.get("train_name").cloned().unwrap_or(Value::Null),
        "dtype": match dtype { ExportDtype::F32 => "float32", ExportDtype::Bf16 => "bfloat16" },
        "step": model.step,
        "tokens": model.tokens,
    })
}

/// Writes `model.safetensors` and `config.json` into `out` (created; existing files of
/// these names are replaced only after both are written). Returns the two paths.
pub fn export_hf(model: &LoadedModel, out: &Path, dtype: ExportDtype) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(out).map_err(io(format!("creating {}", out.display())))?;
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
    std::fs::rename(&st_tmp, &st_path).map_err(io(format!("writing {}", st_path.display())))?;
    std::fs::rename(&cfg_tmp, &cfg_path).map_err(io(format!("writing {}", cfg_path.display())))?;
    Ok(vec![st_path, cfg_path])
}
