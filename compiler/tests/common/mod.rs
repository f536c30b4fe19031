//! Hand-built `RunInputs` for ArchScale's families (config.py@1a2e505 as restated in
//! arch-spec §1.1-1.2), so the compiler is tested on its own, independent of the TOML
//! arch specs and their expansion.

#![allow(dead_code)]

use archscale_compiler::plan::*;
use archscale_compiler::{
    ArchAtDepth, BaseHyperparameters, Cluster, OptimizerChoice, RunInputs, TokenMult,
};
use serde_json::Value;

pub struct Family {
    pub name: &'static str,
    pub ar: usize,
    pub head_dim: Option<usize>,
    pub heads: fn(usize) -> usize,
    pub groups: fn(usize) -> usize,
    pub vocab: usize,
    pub window: Option<usize>,
    pub full_per_layer: usize,
    pub rnn_per_layer: Option<usize>,
    pub yoco: bool,
    pub gmu: bool,
    pub da: bool,
    pub nope: bool,
    pub tied: bool,
    pub layer_norm: bool,
    pub attn_bias: bool,
    pub mult: (f64, bool),
}

fn d(x: usize) -> usize {
    x
}
fn q(x: usize) -> usize {
    x / 4
}
fn forty(_: usize) -> usize {
    40
}
fn twenty(_: usize) -> usize {
    20
}

/// ArchScale's `mult` rules (hp-spec §4.3), applied in order, later matches overwriting.
pub fn mult_for(name: &str, ar: usize) -> (f64, bool) {
    let a = ar as f64;
    let mut m = (14.5 * a * a, false);
    if name.contains("samba") {
        m = ((15 * ar * ar + 160 * ar) as f64, true);
    }
    if name.contains("sambay") || name.contains("sambay2") || name.contains("phi4miniflash") {
        m = (14.5 * a * a + 144.0 * a, false);
    }
    if name.contains("sambayoco") || name.contains("sambayattn") {
        m = (13.5 * a * a + 208.0 * a, false);
    }
    if name.contains("mambay") || name.contains("gdny") || name.contains("mambay2") {
        m = ((16 * ar * ar + 64 * ar) as f64, true);
    }
    if name.contains("sambaymlp") {
        m = (15.5 * a * a + 144.0 * a, false);
    }
    m
}

pub fn family(name: &str) -> Family {
    let base = Family {
        name: "transformer",
        ar: 128,
        head_dim: None,
        heads: d,
        groups: q,
        vocab: 32000,
        window: None,
        full_per_layer: 1_000_000,
        rnn_per_layer: None,
        yoco: false,
        gmu: false,
        da: false,
        nope: false,
        tied: false,
        layer_norm: false,
        attn_bias: false,
        mult: (0.0, false),
    };
    let mut f = match name {
        "transformer" => base,
        "transformerls" => Family {
            name: "transformerls",
            window: Some(128),
            full_per_layer: 4,
            ..base
        },
        "samba" => Family {
            name: "samba",
            ar: 122,
            head_dim: Some(128),
            window: Some(2048),
            rnn_per_layer: Some(2),
            ..base
        },
        "sambay" | "sambayda" | "sambayoco" => Family {
            name: match name {
                "sambay" => "sambay",
                "sambayda" => "sambayda",
                _ => "sambayoco",
            },
            ar: if name == "sambayoco" { 126 } else { 124 },
            head_dim: Some(128),
            window: Some(128),
            rnn_per_layer: Some(2),
            yoco: true,
            gmu: name != "sambayoco",
            da: name == "sambayda",
            nope: true,
            ..base
        },
        "phi4miniflash" => Family {
            name: "phi4miniflash",
            ar: 80,
            head_dim: Some(64),
            heads: forty,
            groups: twenty,
            vocab: 200064,
            window: Some(512),
            rnn_per_layer: Some(2),
            yoco: true,
            gmu: true,
            da: true,
            nope: true,
            tied: true,
            layer_norm: true,
            attn_bias: true,
            ..base
        },
        other => panic!("test family {other} not modelled"),
    };
    f.mult = mult_for(f.name, f.ar);
    f
}

pub fn layers(f: &Family, depth: usize) -> Vec<LayerPlan> {
    let attention = |i: usize, window: Option<usize>, kv_from: Option<usize>, exports_kv: bool| {
        Mixer::Attention(AttentionPlan {
            window,
            rope: !f.nope,
            kv_from,
            exports_kv,
            exports_memory: false,
            differential: if f.da {
                Some(DiffAttnPlan {
                    lambda_init: 0.8 - 0.6 * (-0.3 * i as f64).exp(),
                })
            } else {
                None
            },
        })
    };
    let local = |i: usize| {
        if i % f.full_per_layer < f.full_per_layer - 1 {
            f.window
        } else {
            None
        }
    };
    let h = depth / 2;
    (0..depth)
        .map(|i| {
            let mixer = if !f.yoco || i < h {
                match f.rnn_per_layer {
                    Some(r) if i % r == 0 => Mixer::Mamba(MambaPlan {
                        export_memory: false,
                    }),
                    _ => attention(i, local(i), None, false),
                }
            } else if i == h {
                Mixer::Mamba(MambaPlan {
                    export_memory: f.gmu,
                })
            } else if i == h + 1 {
                attention(i, None, None, true)
            } else if f.gmu && i % 2 == 0 {
                Mixer::Gmu(GmuPlan {
                    memory_from: h,
                    d_mem: 2 * f.ar * depth,
                    gated_norm: false,
                })
            } else {
                attention(i, None, Some(h + 1), false)
            };
            LayerPlan {
                index: i,
                mixer,
                mlp_exports_memory: false,
            }
        })
        .collect()
}

pub fn arch(name: &str, depth: usize) -> ArchAtDepth {
    let f = family(name);
    let n = f.ar * depth;
    let heads = (f.heads)(depth);
    let has_mamba = f.rnn_per_layer.is_some();
    ArchAtDepth {
        family: f.name.into(),
        depth,
        aspect_ratio: Some(f.ar),
        n_embd: n,
        n_head: heads,
        n_query_groups: (f.groups)(depth),
        head_size: f.head_dim.unwrap_or(n / heads),
        intermediate_size: 4 * n,
        vocab_size: f.vocab,
        padding_multiple: 64,
        norm: if f.layer_norm {
            NormKind::LayerNorm
        } else {
            NormKind::RmsNorm
        },
        norm_eps: 1e-5,
        mlp: MlpKind::Swiglu,
        tied_embeddings: f.tied,
        bias: false,
        attn_bias: f.attn_bias,
        attn_out_bias: f.attn_bias,
        rope_base: if f.nope { None } else { Some(10000.0) },
        layers: layers(&f, depth),
        mamba: if has_mamba {
            Some(MambaDims {
                d_inner: 2 * n,
                d_state: 16,
                d_conv: 4,
                dt_rank: n.div_ceil(16),
            })
        } else {
            None
        },
        token_mult: TokenMult {
            value: f.mult.0,
            is_int: f.mult.1,
        },
    }
}

/// `scaling_mup` on 1 node x 8 GPUs, ArchScale defaults.
pub fn inputs(name: &str, depth: usize) -> RunInputs {
    RunInputs {
        arch: arch(name, depth),
        train_name: None,
        base: BaseHyperparameters::default(),
        parametrization: Parametrization::MupPlusPlus,
        tied_embeddings: false,
        max_tokens: None,
        ctx_len: None,
        micro_batch: None,
        optimizer: OptimizerChoice::Adamw,
        decay: DecayShape::Linear,
        wsd: false,
        label_smoothing: 0.0,
        varlen: false,
        rope_base: None,
        swa_len: None,
        cluster: Cluster {
            nodes: 1,
            gpus_per_node: 8,
            gpu_memory_gib: 80.0,
        },
        sharding: None,
        seed: 3407,
        out_dir: "runs".into(),
        eval_interval: 1000,
        save_interval: 1000,
        log_interval: 10,
        train_data: vec![],
        val_data: vec![],
    }
}

/// Applies ArchScale `train_name` flags to structured settings, as import-archscale does.
pub fn apply_train_name(inp: &mut RunInputs, name: &str) {
    inp.train_name = Some(name.into());
    let mup = name.contains("mup");
    inp.parametrization = match (mup, name.contains("_ori_mup")) {
        (false, _) => Parametrization::Sp,
        (true, true) => Parametrization::Mup,
        (true, false) => Parametrization::MupPlusPlus,
    };
    inp.tied_embeddings = name.contains("_tie");
    inp.rope_base = if name.contains("_rbase_") {
        Some(640000.0)
    } else {
        None
    };
    inp.varlen = name.contains("_varlen");
    inp.label_smoothing = if name.contains("_ls_") { 0.1 } else { 0.0 };
    inp.optimizer = if mup && name.contains("hadam") {
        OptimizerChoice::Nadam
    } else if mup && name.contains("muon") {
        OptimizerChoice::Muon
    } else {
        OptimizerChoice::Adamw
    };
    inp.wsd = name.contains("wsd");
    inp.decay = if name.contains("cosine") {
        DecayShape::Cosine
    } else {
        DecayShape::Linear
    };
}

/// An ArchScale `pretrain.py` command line (as in archscale-hps.json) as RunInputs.
pub fn from_argv(argv: &[String], nodes: usize, gpus: usize) -> RunInputs {
    let mut model = String::new();
    let mut depth = 16usize;
    let mut name = "scaling_mup_tie_rbase_prolong_varlen".to_string();
    let mut base = BaseHyperparameters::default();
    let mut base_given = false;
    let mut max_tokens = None;
    let mut ctx = None;
    let mut swa = None;
    let mut i = 0;
    while i < argv.len() {
        let (key, value) = match argv[i].split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => {
                i += 1;
                (argv[i - 1].clone(), argv[i].clone())
            }
        };
        i += 1;
        let int = |v: &str| v.replace('_', "").parse::<u64>().unwrap();
        let float = |v: &str| v.replace('_', "").parse::<f64>().unwrap();
        match key.as_str() {
            "--train_model" => model = value,
            "--depth" => depth = int(&value) as usize,
            "--train_name" => name = value,
            "--max_tokens" => max_tokens = Some(float(&value)),
            "--ctx_len" => ctx = Some(int(&value) as usize),
            "--swa_len" => swa = Some(int(&value) as usize),
            k if k.starts_with("--base_hps.") => {
                base_given = true;
                match &k["--base_hps.".len()..] {
                    "eta0" => base.eta0 = float(&value),
                    "b0" => base.b0 = int(&value),
                    "t0" => base.t0 = int(&value),
                    "d0" => base.d0 = int(&value),
                    "warmup_tokens0" => base.warmup_tokens0 = int(&value),
                    "min_lr0" => base.min_lr0 = float(&value),
                    "weight_decay0" => base.weight_decay0 = float(&value),
                    other => panic!("base field {other} not handled in the test"),
                }
            }
            other => panic!("argument {other} not handled in the test"),
        }
    }
    base.n0_mult_is_float = base_given;
    let mut inp = inputs(&model, depth);
    inp.base = base;
    inp.max_tokens = max_tokens;
    inp.ctx_len = ctx;
    inp.cluster.nodes = nodes;
    inp.cluster.gpus_per_node = gpus;
    if let Some(w) = swa {
        inp.swa_len = Some(w);
        let mut f = family(&model);
        f.window = Some(w);
        inp.arch.layers = layers(&f, depth);
    }
    apply_train_name(&mut inp, &name);
    inp
}

/// Integers equal (and still integers), floats within 1e-12 relative (and still floats),
/// everything else equal; `path` names the key in messages.
pub fn compare(path: &str, got: &Value, want: &Value, errors: &mut Vec<String>) {
    match (got, want) {
        (Value::Number(g), Value::Number(w)) => {
            if w.is_f64() != g.is_f64() {
                errors.push(format!("{path}: {g} vs {w} (int/float kind differs)"));
            } else if w.is_f64() {
                let (g, w) = (g.as_f64().unwrap(), w.as_f64().unwrap());
                if (g - w).abs() > 1e-12 * w.abs() {
                    errors.push(format!("{path}: {g:e} vs {w:e}"));
                }
            } else if g.as_i64() != w.as_i64() {
                errors.push(format!("{path}: {g} vs {w}"));
            }
        }
        (Value::Array(g), Value::Array(w)) => {
            if g.len() != w.len() {
                errors.push(format!("{path}: {} items vs {}", g.len(), w.len()));
            }
            for (i, (g, w)) in g.iter().zip(w).enumerate() {
                compare(&format!("{path}[{i}]"), g, w, errors);
            }
        }
        (Value::Object(g), Value::Object(w)) => {
            for k in w.keys().filter(|k| !g.contains_key(*k)) {
                errors.push(format!("{path}.{k}: missing"));
            }
            for k in g.keys().filter(|k| !w.contains_key(*k)) {
                errors.push(format!("{path}.{k}: not in the reference"));
            }
            for (k, w) in w {
                if let Some(g) = g.get(k) {
                    compare(&format!("{path}.{k}"), g, w, errors);
                }
            }
        }
        (g, w) if g == w => {}
        (g, w) => errors.push(format!("{path}: {g} vs {w}")),
    }
}
