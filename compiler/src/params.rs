//! The parameter inventory: ArchScale state-dict names in registration order, PyTorch
//! shapes `(out, in)`, init rules (hp-spec §7.2, arch-spec §2) and optimizer groups (§8.1).
//!
//! Order follows PyTorch's `named_parameters()`: a module's own parameters first, then its
//! children in registration order. GPT registers `lm_head`, then `transformer.{wte, h, ln_f}`;
//! a Block `norm_1`, the mixer (`attn`), `norm_2`, `mlp`.

use crate::plan::{InitRule, Mixer, ModelConfig, NormKind, ParamSpec, Parametrization};

/// How a tensor's init depends on the parametrization.
#[derive(Clone, Debug)]
enum Kind {
    /// `nn.Linear.weight`; `out_proj`: an output projection the GPT-2 rule rescales.
    Linear {
        fan_in: usize,
        out_proj: bool,
    },
    /// Mamba `dt_proj.weight`: its own U(±R^-1/2) draw survives only under μP.
    DtProjWeight {
        dt_rank: usize,
    },
    Fixed(InitRule),
}

/// Mamba-2 sizes (mamba_ssm `Mamba2` as ArchScale builds it, arch-spec §1.11).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mamba2Dims {
    pub d_inner: usize,
    pub nheads: usize,
    pub d_state: usize,
    pub conv_dim: usize,
}

/// ArchScale's `expand = 8*ceil(2n/64/8)*64/n`, then `int(expand * n)` (model.py get_rnn).
pub fn mamba2_dims(n_embd: usize) -> Mamba2Dims {
    let c = ((n_embd * 2) as f64 / 64.0 / 8.0).ceil();
    let expand = (8.0 * c * 64.0) / n_embd as f64;
    let d_inner = (expand * n_embd as f64).trunc() as usize;
    let d_state = 128;
    Mamba2Dims {
        d_inner,
        nheads: d_inner / 64,
        d_state,
        conv_dim: d_inner + 2 * d_state,
    }
}

/// Gated DeltaNet sizes (fla layout, arch-spec §1.12): heads `ceil(int(0.75n)/256)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GdnDims {
    pub heads: usize,
    pub key_dim: usize,
    pub value_dim: usize,
}

pub fn gdn_dims(n_embd: usize) -> GdnDims {
    let heads = ((n_embd as f64 * 0.75).trunc() as usize).div_ceil(256);
    GdnDims {
        heads,
        key_dim: 256 * heads,
        value_dim: 512 * heads,
    }
}

const DT_BIAS: InitRule = InitRule::MambaDtBias {
    dt_min: 0.001,
    dt_max: 0.1,
    dt_floor: 1e-4,
};

struct Builder<'a> {
    cfg: &'a ModelConfig,
    w_init0: f64,
    out: Vec<ParamSpec>,
}

impl Builder<'_> {
    fn push(&mut self, name: String, shape: Vec<usize>, kind: Kind, layer: Option<usize>) {
        let init = init_rule(self.cfg, self.w_init0, kind);
        self.out.push(ParamSpec {
            name,
            aliases: Vec::new(),
            shape,
            init,
            group: 0,
            layer,
        });
    }

    fn linear(
        &mut self,
        prefix: &str,
        out_f: usize,
        in_f: usize,
        bias: bool,
        out_proj: bool,
        layer: usize,
    ) {
        self.push(
            format!("{prefix}.weight"),
            vec![out_f, in_f],
            Kind::Linear {
                fan_in: in_f,
                out_proj,
            },
            Some(layer),
        );
        if bias {
            self.push(
                format!("{prefix}.bias"),
                vec![out_f],
                Kind::Fixed(InitRule::Zeros),
                Some(layer),
            );
        }
    }

    fn norm(&mut self, prefix: &str, width: usize, kind: NormKind, layer: Option<usize>) {
        self.push(
            format!("{prefix}.weight"),
            vec![width],
            Kind::Fixed(InitRule::Ones),
            layer,
        );
        if kind == NormKind::LayerNorm {
            self.push(
                format!("{prefix}.bias"),
                vec![width],
                Kind::Fixed(InitRule::Zeros),
                layer,
            );
        }
    }

    /// Depthwise `nn.Conv1d` with PyTorch's default init: U(±1/sqrt(kernel)) for weight and bias.
    fn conv1d(&mut self, prefix: &str, channels: usize, kernel: usize, bias: bool, layer: usize) {
        let bound = 1.0 / (kernel as f64).sqrt();
        self.push(
            format!("{prefix}.weight"),
            vec![channels, 1, kernel],
            Kind::Fixed(InitRule::Uniform { bound }),
            Some(layer),
        );
        if bias {
            self.push(
                format!("{prefix}.bias"),
                vec![channels],
                Kind::Fixed(InitRule::Uniform { bound }),
                Some(layer),
            );
        }
    }
}

fn init_rule(cfg: &ModelConfig, w_init0: f64, kind: Kind) -> InitRule {
    let mup = cfg.parametrization != Parametrization::Sp;
    let residual_div = (2.0 * cfg.n_layer as f64).sqrt();
    match kind {
        Kind::Linear { fan_in, out_proj } => {
            // GPT-2 rule: SP and tied μP divide output projections by sqrt(2L); untied μP
            // zeroes the readout instead (model.py:96-136).
            let rescale = out_proj && (!mup || cfg.tied_embeddings);
            if mup {
                let mut bound = (1.0 / (fan_in as f64).sqrt()) * w_init0;
                if rescale {
                    bound /= residual_div;
                }
                InitRule::Uniform { bound }
            } else {
                let mut std = 0.02 * w_init0;
                if rescale {
                    std /= residual_div;
                }
                InitRule::Normal { std }
            }
        }
        Kind::DtProjWeight { dt_rank } => {
            if mup {
                InitRule::Uniform {
                    bound: (dt_rank as f64).powf(-0.5) * w_init0,
                }
            } else {
                InitRule::Normal {
                    std: 0.02 * w_init0,
                }
            }
        }
        Kind::Fixed(rule) => rule,
    }
}

/// Builds every parameter of the model. `cfg.mamba` must be set when a Mamba layer exists.
pub fn build_params(
    cfg: &ModelConfig,
    layers: &[crate::plan::LayerPlan],
    w_init0: f64,
) -> Result<Vec<ParamSpec>, String> {
    let (n, v) = (cfg.n_embd, cfg.padded_vocab_size);
    let mut b = Builder {
        cfg,
        w_init0,
        out: Vec::new(),
    };
    let mup = cfg.parametrization != Parametrization::Sp;

    // lm_head first (registration order). Tied: the shared tensor keeps this name and the
    // embedding's N(0, 0.02) draw, which runs after the Linear init.
    let head_init = if cfg.tied_embeddings {
        Kind::Fixed(InitRule::Normal { std: 0.02 })
    } else if mup {
        Kind::Fixed(InitRule::Zeros)
    } else {
        Kind::Linear {
            fan_in: n,
            out_proj: false,
        }
    };
    b.push("lm_head.weight".into(), vec![v, n], head_init, None);
    if cfg.tied_embeddings {
        b.out[0].aliases.push("transformer.wte.weight".into());
    } else {
        b.push(
            "transformer.wte.weight".into(),
            vec![v, n],
            Kind::Fixed(InitRule::Normal { std: 1e-4 }),
            None,
        );
    }

    let (heads, groups, hs) = (cfg.n_head, cfg.n_query_groups, cfg.head_size);
    for layer in layers {
        let i = layer.index;
        let p = format!("transformer.h.{i}");
        b.norm(&format!("{p}.norm_1"), n, cfg.norm, Some(i));
        let a = format!("{p}.attn");
        match &layer.mixer {
            Mixer::Attention(at) => {
                let qkv_out = if at.kv_from.is_some() {
                    heads * hs
                } else {
                    (heads + 2 * groups) * hs
                };
                b.linear(&format!("{a}.attn"), qkv_out, n, cfg.attn_bias, false, i);
                if at.differential.is_some() {
                    for lam in ["lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"] {
                        b.push(
                            format!("{a}.da.{lam}"),
                            vec![hs],
                            Kind::Fixed(InitRule::Normal { std: 0.1 }),
                            Some(i),
                        );
                    }
                    b.push(
                        format!("{a}.da.subln.weight"),
                        vec![2 * hs],
                        Kind::Fixed(InitRule::Ones),
                        Some(i),
                    );
                }
                b.linear(
                    &format!("{a}.proj"),
                    n,
                    heads * hs,
                    cfg.attn_out_bias,
                    true,
                    i,
                );
            }
            Mixer::Mamba(_) => {
                let m = cfg.mamba.ok_or_else(|| {
                    format!("layer {i} is a Mamba layer but the architecture has no Mamba sizes")
                })?;
                let (d_in, r, ds) = (m.d_inner, m.dt_rank, m.d_state);
                b.push(
                    format!("{a}.A_log"),
                    vec![d_in, ds],
                    Kind::Fixed(InitRule::MambaALog),
                    Some(i),
                );
                b.push(
                    format!("{a}.D"),
                    vec![d_in],
                    Kind::Fixed(InitRule::Ones),
                    Some(i),
                );
                b.linear(&format!("{a}.in_proj"), 2 * d_in, n, false, false, i);
                b.conv1d(&format!("{a}.conv1d"), d_in, m.d_conv, true, i);
                b.linear(&format!("{a}.x_proj"), r + 2 * ds, d_in, false, false, i);
                b.push(
                    format!("{a}.dt_proj.weight"),
                    vec![d_in, r],
                    Kind::DtProjWeight { dt_rank: r },
                    Some(i),
                );
                b.push(
                    format!("{a}.dt_proj.bias"),
                    vec![d_in],
                    Kind::Fixed(DT_BIAS),
                    Some(i),
                );
                b.linear(&format!("{a}.out_proj"), n, d_in, false, true, i);
            }
            // Mamba-2 and Gated DeltaNet follow the mamba_ssm / fla layouts of arch-spec
            // §1.11-1.12; no oracle table covers them, so their counts are unverified.
            Mixer::Mamba2 { .. } => {
                let m = mamba2_dims(n);
                if !m.d_inner.is_multiple_of(64) {
                    return Err(format!(
                        "Mamba-2 inner width {} at n_embd {n} is not a multiple of its head dim 64",
                        m.d_inner
                    ));
                }
                b.push(
                    format!("{a}.dt_bias"),
                    vec![m.nheads],
                    Kind::Fixed(DT_BIAS),
                    Some(i),
                );
                b.push(
                    format!("{a}.A_log"),
                    vec![m.nheads],
                    Kind::Fixed(InitRule::LogUniform {
                        low: 1.0,
                        high: 16.0,
                    }),
                    Some(i),
                );
                b.push(
                    format!("{a}.D"),
                    vec![m.nheads],
                    Kind::Fixed(InitRule::Ones),
                    Some(i),
                );
                b.linear(
                    &format!("{a}.in_proj"),
                    2 * m.d_inner + 2 * m.d_state + m.nheads,
                    n,
                    false,
                    false,
                    i,
                );
                b.conv1d(&format!("{a}.conv1d"), m.conv_dim, 4, true, i);
                b.norm(&format!("{a}.norm"), m.d_inner, NormKind::RmsNorm, Some(i));
                b.linear(&format!("{a}.out_proj"), n, m.d_inner, false, true, i);
            }
            Mixer::GatedDeltaNet { .. } => {
                let g = gdn_dims(n);
                b.push(
                    format!("{a}.A_log"),
                    vec![g.heads],
                    Kind::Fixed(InitRule::LogUniform {
                        low: 0.0,
                        high: 16.0,
                    }),
                    Some(i),
                );
                b.push(
                    format!("{a}.dt_bias"),
                    vec![g.heads],
                    Kind::Fixed(DT_BIAS),
                    Some(i),
                );
                b.linear(&format!("{a}.q_proj"), g.key_dim, n, false, false, i);
                b.linear(&format!("{a}.k_proj"), g.key_dim, n, false, false, i);
                b.linear(&format!("{a}.v_proj"), g.value_dim, n, false, false, i);
                b.linear(&format!("{a}.a_proj"), g.heads, n, false, false, i);
                b.linear(&format!("{a}.b_proj"), g.heads, n, false, false, i);
                b.conv1d(&format!("{a}.q_conv1d"), g.key_dim, 4, false, i);
                b.conv1d(&format!("{a}.k_conv1d"), g.key_dim, 4, false, i);
                b.conv1d(&format!("{a}.v_conv1d"), g.value_dim, 4, false, i);
                b.linear(&format!("{a}.g_proj"), g.value_dim, n, false, false, i);
                b.norm(
                    &format!("{a}.norm"),
                    g.value_dim,
                    NormKind::RmsNorm,
                    Some(i),
                );
                b.linear(&format!("{a}.o_proj"), n, g.value_dim, false, true, i);
            }
            Mixer::Gmu(g) => {
                b.linear(&format!("{a}.gmu.in_proj"), g.d_mem, n, cfg.bias, false, i);
                b.linear(&format!("{a}.gmu.out_proj"), n, g.d_mem, cfg.bias, true, i);
                if g.gated_norm {
                    b.norm(
                        &format!("{a}.gmu.norm"),
                        g.d_mem,
                        NormKind::RmsNorm,
                        Some(i),
                    );
                }
            }
        }
        b.norm(&format!("{p}.norm_2"), n, cfg.norm, Some(i));
        let inter = cfg.intermediate_size;
        b.linear(&format!("{p}.mlp.w1"), 2 * inter, n, cfg.bias, false, i);
        b.linear(&format!("{p}.mlp.w3"), n, inter, cfg.bias, true, i);
    }
    b.norm("transformer.ln_f", n, cfg.norm, None);
    Ok(b.out)
}

/// ArchScale's `vector_names` (pretrain.py:337).
const VECTOR_NAMES: [&str; 6] = ["conv1d", "wte", "lm_head", "norm", "ln", "layernorm"];

/// μP grouping (hp-spec §8.1): vectors are names (lower-cased) without `weight`, or with
/// any vector name; everything else is a weight matrix.
pub fn is_vector(name: &str) -> bool {
    let lower = name.to_lowercase();
    !lower.contains("weight") || VECTOR_NAMES.iter().any(|v| lower.contains(v))
}

/// Parameters counted once (a tied head once), as ArchScale's `num_parameters`.
pub fn count_total(params: &[ParamSpec]) -> u64 {
    params.iter().map(|p| p.numel() as u64).sum()
}

/// Total minus `wte` and an untied `lm_head` (hp-spec §10.1 "non-embedding").
pub fn count_non_embedding(params: &[ParamSpec]) -> u64 {
    params
        .iter()
        .filter(|p| p.name != "lm_head.weight" && p.name != "transformer.wte.weight")
        .map(|p| p.numel() as u64)
        .sum()
}
