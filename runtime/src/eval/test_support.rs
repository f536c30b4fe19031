//! Tiny plans and parameters for the eval tests (no compiler front end needed).

use crate::cpu::CpuModel;
use archscale_compiler::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub(crate) struct TinySpec {
    pub vocab: usize,
    pub padded_vocab: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_groups: usize,
    pub head_size: usize,
    pub tied: bool,
    pub norm: NormKind,
    pub bias: bool,
    pub parametrization: Parametrization,
    pub block_size: usize,
}

impl Default for TinySpec {
    fn default() -> Self {
        TinySpec {
            vocab: 20,
            padded_vocab: 24,
            n_embd: 16,
            n_head: 4,
            n_groups: 2,
            head_size: 4,
            tied: false,
            norm: NormKind::RmsNorm,
            bias: false,
            parametrization: Parametrization::MupPlusPlus,
            block_size: 16,
        }
    }
}

fn attn(
    window: Option<usize>,
    rope: bool,
    kv_from: Option<usize>,
    exports_kv: bool,
    exports_memory: bool,
) -> Mixer {
    Mixer::Attention(AttentionPlan {
        window,
        rope,
        kv_from,
        exports_kv,
        exports_memory,
        differential: None,
    })
}

/// Transformer++: layer 1 uses a sliding window of 3.
pub(crate) fn transformer_layers(depth: usize) -> Vec<LayerPlan> {
    (0..depth)
        .map(|i| LayerPlan {
            index: i,
            mixer: attn((i == 1).then_some(3), true, None, false, false),
            mlp_exports_memory: false,
        })
        .collect()
}

/// `layers` with differential attention on every attention layer (λ_init as ArchScale's
/// `0.8 − 0.6·exp(−0.3·index)`).
pub(crate) fn with_differential(layers: Vec<LayerPlan>) -> Vec<LayerPlan> {
    layers
        .into_iter()
        .map(|mut l| {
            if let Mixer::Attention(a) = &mut l.mixer {
                a.differential = Some(DiffAttnPlan {
                    lambda_init: 0.8 - 0.6 * (-0.3 * l.index as f64).exp(),
                });
            }
            l
        })
        .collect()
}

/// SambaY-like, NoPE: `M S M S | M* A | G X` with the GMU reading the Mamba memory of layer 4
/// and the cross-attention layer 7 reading layer 5's K/V.
pub(crate) fn hybrid_layers(n_embd: usize) -> Vec<LayerPlan> {
    (0..8)
        .map(|i| {
            let mixer = match i {
                0 | 2 => Mixer::Mamba(MambaPlan {
                    export_memory: false,
                }),
                4 => Mixer::Mamba(MambaPlan {
                    export_memory: true,
                }),
                1 | 3 => attn(Some(3), false, None, false, false),
                5 => attn(None, false, None, true, false),
                6 => Mixer::Gmu(GmuPlan {
                    memory_from: 4,
                    d_mem: 2 * n_embd,
                    gated_norm: false,
                }),
                _ => attn(None, false, Some(5), false, false),
            };
            LayerPlan {
                index: i,
                mixer,
                mlp_exports_memory: false,
            }
        })
        .collect()
}

pub(crate) fn model_config(t: &TinySpec, depth: usize, mamba: bool) -> ModelConfig {
    let mup = t.parametrization != Parametrization::Sp;
    let mut attn_scale = 1.0 / (t.head_size as f64).sqrt();
    if mup {
        attn_scale *= (128f64).sqrt() / (t.head_size as f64).sqrt();
    }
    ModelConfig {
        name: format!("tiny_d{depth}"),
        family: if mamba {
            "sambay".into()
        } else {
            "transformer".into()
        },
        n_layer: depth,
        n_embd: t.n_embd,
        n_head: t.n_head,
        n_query_groups: t.n_groups,
        head_size: t.head_size,
        intermediate_size: 4 * t.n_embd,
        vocab_size: t.vocab,
        padded_vocab_size: t.padded_vocab,
        norm: t.norm,
        norm_eps: 1e-5,
        mlp: MlpKind::Swiglu,
        tied_embeddings: t.tied,
        bias: t.bias,
        attn_bias: t.bias,
        attn_out_bias: t.bias,
        rope_base: (!mamba).then_some(10000.0),
        block_size: t.block_size,
        parametrization: t.parametrization,
        logit_scale: if mup { 16.0 / depth as f64 } else { 1.0 },
        residual_scale: if t.parametrization == Parametrization::MupPlusPlus {
            1.0 / (2.0 * depth as f64).sqrt()
        } else {
            1.0
        },
        attn_scale,
        varlen: false,
        eos_token_id: 2,
        mamba: mamba.then_some(MambaDims {
            d_inner: 2 * t.n_embd,
            d_state: 4,
            d_conv: 4,
            dt_rank: t.n_embd.div_ceil(16),
        }),
    }
}

/// The CPU model tests' complete Plan around `model` and `layers`, reading `val` for both
/// training and validation data.
pub(crate) fn plan(model: ModelConfig, layers: Vec<LayerPlan>, val: Vec<DataSource>) -> Plan {
    let mut plan = crate::cpu::model_tests::plan(model, layers);
    plan.training.eval_iters = 2;
    plan.data.train = val.clone();
    plan.data.val = val;
    plan
}

/// Init plus noise on every tensor, so zero-initialised ones (μP readout, biases) matter.
pub(crate) fn noisy_params(plan: &Plan, seed: u64) -> Vec<Vec<f32>> {
    let model = CpuModel::<f32>::new(plan).expect("tiny model builds");
    let mut params = model.init_params();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for (p, spec) in params.iter_mut().zip(&plan.params) {
        let scale = if spec.name.ends_with("dt_proj.bias") {
            0.0
        } else {
            1.0
        };
        for v in p.iter_mut() {
            *v = *v * scale + rng.gen_range(-0.3f32..0.3);
        }
    }
    params
}
