//! Whole-model tests: f64 finite-difference checks of tiny Transformer++ and hybrid
//! stacks, causality of prefix evaluation, thread-count independence, and errors.

use super::float::Storage;
use super::gradcheck::{randn, rng, TestRng};
use super::model::CpuModel;
use archscale_compiler::params::build_params;
use archscale_compiler::*;
use rand::Rng;

/// Model settings a test varies.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Tiny {
    pub parametrization: Parametrization,
    pub tied: bool,
    pub norm: NormKind,
    pub bias: bool,
    pub varlen: bool,
    pub rope: bool,
}

impl Default for Tiny {
    fn default() -> Self {
        Tiny {
            parametrization: Parametrization::MupPlusPlus,
            tied: false,
            norm: NormKind::RmsNorm,
            bias: false,
            varlen: false,
            rope: true,
        }
    }
}

pub(crate) const N_EMBD: usize = 8;
pub(crate) const N_HEAD: usize = 4;
pub(crate) const N_GROUPS: usize = 2;
pub(crate) const HEAD_SIZE: usize = 4;
pub(crate) const VOCAB: usize = 20;
pub(crate) const PADDED_VOCAB: usize = 24;

fn attn(window: Option<usize>, rope: bool) -> Mixer {
    Mixer::Attention(AttentionPlan {
        window,
        rope,
        kv_from: None,
        exports_kv: false,
        exports_memory: false,
        differential: None,
    })
}

/// Transformer++ of `depth` layers; layer 1 (if any) uses a sliding window of 3.
pub(crate) fn transformer_layers(depth: usize, rope: bool) -> Vec<LayerPlan> {
    (0..depth)
        .map(|i| LayerPlan {
            index: i,
            mixer: attn(if i == 1 { Some(3) } else { None }, rope),
            mlp_exports_memory: false,
        })
        .collect()
}

/// SambaY with L = 8 (arch-spec §1.2): `M S M S | M* A | G X`, NoPE.
/// `diff`: differential attention on every attention layer; `memory`: which layer exports
/// the GMU memory (`"mamba"` = layer 4's Mamba, `"attn"` = layer 5's attention output,
/// `"mlp"` = layer 5's MLP up-half).
pub(crate) fn sambay_layers(diff: bool, memory: &str) -> Vec<LayerPlan> {
    let da = |i: usize| {
        diff.then(|| DiffAttnPlan {
            lambda_init: 0.8 - 0.6 * (-0.3 * i as f64).exp(),
        })
    };
    let d_mem = match memory {
        "mamba" => 2 * N_EMBD,
        "attn" => N_HEAD * HEAD_SIZE,
        _ => 4 * N_EMBD,
    };
    (0..8)
        .map(|i| {
            let mixer = match i {
                0 | 2 => Mixer::Mamba(MambaPlan {
                    export_memory: false,
                }),
                4 => Mixer::Mamba(MambaPlan {
                    export_memory: memory == "mamba",
                }),
                1 | 3 => Mixer::Attention(AttentionPlan {
                    window: Some(3),
                    rope: false,
                    kv_from: None,
                    exports_kv: false,
                    exports_memory: false,
                    differential: da(i),
                }),
                5 => Mixer::Attention(AttentionPlan {
                    window: None,
                    rope: false,
                    kv_from: None,
                    exports_kv: true,
                    exports_memory: memory == "attn",
                    differential: da(i),
                }),
                6 => Mixer::Gmu(GmuPlan {
                    memory_from: if memory == "mamba" { 4 } else { 5 },
                    d_mem,
                    gated_norm: false,
                }),
                _ => Mixer::Attention(AttentionPlan {
                    window: None,
                    rope: false,
                    kv_from: Some(5),
                    exports_kv: false,
                    exports_memory: false,
                    differential: da(i),
                }),
            };
            LayerPlan {
                index: i,
                mixer,
                mlp_exports_memory: i == 5 && memory == "mlp",
            }
        })
        .collect()
}

pub(crate) fn model_config(t: Tiny, depth: usize, mamba: bool) -> ModelConfig {
    let mup = t.parametrization != Parametrization::Sp;
    let mut attn_scale = 1.0 / (HEAD_SIZE as f64).sqrt();
    if mup {
        attn_scale *= (128f64).sqrt() / (HEAD_SIZE as f64).sqrt();
    }
    ModelConfig {
        name: format!("tiny_d{depth}"),
        family: if mamba {
            "sambay".into()
        } else {
            "transformer".into()
        },
        n_layer: depth,
        n_embd: N_EMBD,
        n_head: N_HEAD,
        n_query_groups: N_GROUPS,
        head_size: HEAD_SIZE,
        intermediate_size: 4 * N_EMBD,
        vocab_size: VOCAB,
        padded_vocab_size: PADDED_VOCAB,
        norm: t.norm,
        norm_eps: 1e-5,
        mlp: MlpKind::Swiglu,
        tied_embeddings: t.tied,
        bias: t.bias,
        attn_bias: t.bias,
        attn_out_bias: t.bias,
        rope_base: t.rope.then_some(10000.0),
        block_size: 7,
        parametrization: t.parametrization,
        logit_scale: if mup { 16.0 / depth as f64 } else { 1.0 },
        residual_scale: if t.parametrization == Parametrization::MupPlusPlus {
            1.0 / (2.0 * depth as f64).sqrt()
        } else {
            1.0
        },
        attn_scale,
        varlen: t.varlen,
        eos_token_id: 2,
        mamba: mamba.then_some(MambaDims {
            d_inner: 2 * N_EMBD,
            d_state: 4,
            d_conv: 4,
            dt_rank: N_EMBD.div_ceil(16),
        }),
    }
}

/// A complete Plan around `model` and `layers` (every field filled; only the model, layers,
/// params and seed matter to the CPU model).
pub(crate) fn plan(model: ModelConfig, layers: Vec<LayerPlan>) -> Plan {
    let params = build_params(&model, &layers, 1.0).expect("tiny params build");
    let (t, micro) = (model.block_size, 2);
    let group = ParamGroup {
        name: "all".into(),
        optimizer: OptimizerKind::AdamW,
        lr_mult: None,
        weight_decay: 0.1,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        muon_beta: None,
        peak_lr: 1e-3,
    };
    let total: u64 = params.iter().map(|p| p.numel() as u64).sum();
    Plan {
        run_name: format!("test_{}_ctx{t}", model.name),
        layers,
        params,
        optimizer: OptimizerPlan {
            groups: vec![group],
            grad_clip: 1.0,
        },
        schedule: Schedule {
            decay: DecayShape::Linear,
            wsd: false,
            warmup_iters: 2,
            max_iters: 20,
            min_lr: 0.0,
        },
        training: TrainingPlan {
            seed: 3407,
            train_tokens: (20 * micro * t) as f64,
            max_iters: 20,
            max_steps: 20,
            label_smoothing: 0.0,
            eval_interval: 10,
            save_interval: 10,
            log_interval: 1,
            eval_iters: 1,
            num_extrapol: 2,
            out_dir: "runs".into(),
        },
        layout: ParallelLayout {
            nodes: 1,
            gpus_per_node: 1,
            world: 1,
            micro_batch: micro,
            seq_len: t,
            gas: 1,
            batch_tokens: (micro * t) as u64,
            sharding: Sharding::DataParallel,
        },
        data: DataPlan {
            train: vec![DataSource::Synthetic {
                seed: 1,
                tokens: 10_000,
                weight: 1.0,
            }],
            val: vec![DataSource::Synthetic {
                seed: 2,
                tokens: 1_000,
                weight: 1.0,
            }],
            block_size: t + 1,
            val_block_size: 2 * t + 1,
            val_micro_batch: 1,
            n_chunks: 1,
            seed: 3407,
        },
        estimates: Estimates {
            params_total: total,
            params_non_embedding: total,
            flops_per_token_archscale: 6.0 * total as f64,
            flops_per_token_exact: 6.0 * total as f64,
            memory: MemoryEstimate {
                params_bytes: 4 * total,
                grads_bytes: 4 * total,
                optimizer_bytes: 8 * total,
                working_bytes: 0,
                activations_bytes: 0,
                total_bytes: 16 * total,
                gpu_bytes: 0,
                fits: true,
            },
        },
        model,
        archscale_summary: serde_json::Value::Null,
    }
}

/// Random rows of `seq + 1` tokens; with `eos`, every fifth token or so is an EOS.
pub(crate) fn random_rows(rng: &mut TestRng, micro: usize, seq: usize, eos: bool) -> Vec<u32> {
    (0..micro * (seq + 1))
        .map(|_| {
            if eos && rng.gen_bool(0.2) {
                2
            } else {
                rng.gen_range(0..VOCAB as u32)
            }
        })
        .collect()
}

/// Init, then noise on every parameter so zero-initialised tensors (μP readout, biases)
/// carry gradient signal through the whole stack. Mamba's Δ bias is moved from its init
/// (Δ ≈ 0.001..0.1, where `A_log` gets almost no gradient) to around softplus(0).
fn noisy_params(model: &CpuModel<f64>, rng: &mut TestRng) -> Vec<Vec<f64>> {
    let mut params = model.init_params();
    for (p, spec) in params.iter_mut().zip(model.param_specs()) {
        if spec.name.ends_with("dt_proj.bias") {
            p.iter_mut().for_each(|v| *v = 0.0);
        }
        let noise = randn(rng, p.len(), 0.15);
        for (v, e) in p.iter_mut().zip(noise) {
            *v += e;
        }
    }
    params
}

/// Finite-difference check of `forward_backward` on sampled elements of every tensor.
/// Returns the worst error: |analytic − numeric| / max |analytic| of that tensor, the
/// denominator floored at 1e-4 of the largest gradient of the model (below that the f64
/// differences of an O(1) loss are noise).
fn check_model(plan: &Plan, smoothing: f64, seed: u64) -> f64 {
    check_model_sampled(plan, smoothing, seed, 6)
}

/// [`check_model`] with `samples` random elements per tensor (plus its largest gradient).
fn check_model_sampled(plan: &Plan, smoothing: f64, seed: u64, samples: usize) -> f64 {
    let model = CpuModel::<f64>::new(plan).expect("tiny model builds");
    let mut rng = rng(seed);
    let params = noisy_params(&model, &mut rng);
    let (micro, seq) = (2, plan.model.block_size);
    let rows = random_rows(&mut rng, micro, seq, plan.model.varlen);
    let grad_scale = 0.5f32;
    let mut grads = model.zero_grads();
    model
        .forward_backward(&params, &mut grads, &rows, micro, grad_scale, smoothing)
        .expect("forward_backward");
    let loss_at = |p: &[Vec<f64>]| model.loss(p, &rows, micro, smoothing).expect("loss");
    let mut g2 = model.zero_grads();
    let fb = model
        .forward_backward(&params, &mut g2, &rows, micro, 1.0, smoothing)
        .unwrap();
    assert_eq!(loss_at(&params), fb);
    let mut params = params;
    let step = 1e-4;
    let mut worst = 0.0f64;
    let global = grads.iter().flatten().fold(0.0f64, |m, v| m.max(v.abs())) / grad_scale as f64;
    for t in 0..params.len() {
        let analytic: Vec<f64> = grads[t].iter().map(|g| g / grad_scale as f64).collect();
        let largest = analytic.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        assert!(
            largest > 1e-9,
            "`{}` receives no gradient",
            plan.params[t].name
        );
        let scale = largest.max(1e-4 * global);
        let mut idx: Vec<usize> = (0..samples.min(params[t].len()))
            .map(|_| rng.gen_range(0..params[t].len()))
            .collect();
        // Always include the largest-gradient element.
        idx.push(analytic.iter().enumerate().fold(0, |b, (i, v)| {
            if v.abs() > analytic[b].abs() {
                i
            } else {
                b
            }
        }));
        let mut err = 0.0f64;
        for i in idx {
            // Five-point stencil: O(step⁴) truncation error.
            let orig = params[t][i];
            let mut at = |d: f64| {
                params[t][i] = orig + d;
                loss_at(&params)
            };
            let numeric =
                (8.0 * (at(step) - at(-step)) - (at(2.0 * step) - at(-2.0 * step))) / (12.0 * step);
            params[t][i] = orig;
            err = err.max((numeric - analytic[i]).abs() / scale);
        }
        assert!(
            err < 1e-6,
            "`{}`: gradient off by {err:.3e} (largest gradient {scale:.3e})",
            plan.params[t].name
        );
        worst = worst.max(err);
    }
    worst
}

fn report(name: &str, err: f64) {
    eprintln!("MODEL-GRADCHECK {name}: worst {err:.3e}");
}

#[test]
fn transformer_gradcheck_mupp_and_sp_tied_and_untied() {
    for parametrization in [Parametrization::MupPlusPlus, Parametrization::Sp] {
        for tied in [false, true] {
            let t = Tiny {
                parametrization,
                tied,
                ..Tiny::default()
            };
            let p = plan(model_config(t, 2, false), transformer_layers(2, true));
            let err = check_model(&p, 0.1, 21);
            report(&format!("transformer {parametrization:?} tied={tied}"), err);
        }
    }
}

#[test]
fn transformer_gradcheck_varlen_layernorm_biases() {
    let t = Tiny {
        varlen: true,
        norm: NormKind::LayerNorm,
        bias: true,
        parametrization: Parametrization::Mup,
        ..Tiny::default()
    };
    let p = plan(model_config(t, 3, false), transformer_layers(3, true));
    report(
        "transformer varlen+layernorm+bias",
        check_model(&p, 0.0, 22),
    );
}

#[test]
fn sambay_gradcheck() {
    let p = plan(
        model_config(
            Tiny {
                rope: false,
                ..Tiny::default()
            },
            8,
            true,
        ),
        sambay_layers(false, "mamba"),
    );
    report("sambay", check_model(&p, 0.1, 23));
}

#[test]
fn sambay_varlen_gradcheck() {
    let t = Tiny {
        rope: false,
        varlen: true,
        parametrization: Parametrization::Sp,
        ..Tiny::default()
    };
    let p = plan(model_config(t, 8, true), sambay_layers(false, "mamba"));
    report("sambay varlen", check_model(&p, 0.0, 24));
}

#[test]
fn sambayda_gradcheck() {
    let p = plan(
        model_config(
            Tiny {
                rope: false,
                ..Tiny::default()
            },
            8,
            true,
        ),
        sambay_layers(true, "mamba"),
    );
    report("sambay-da", check_model(&p, 0.1, 25));
}

#[test]
fn phi4_like_gradcheck() {
    // LayerNorm, tied, attention biases, differential attention, varlen.
    let t = Tiny {
        rope: false,
        tied: true,
        norm: NormKind::LayerNorm,
        bias: true,
        varlen: true,
        parametrization: Parametrization::Sp,
    };
    let p = plan(model_config(t, 8, true), sambay_layers(true, "mamba"));
    report("phi4-like", check_model(&p, 0.0, 26));
}

#[test]
fn gmu_attn_and_gmu_mlp_memory_gradcheck() {
    for memory in ["attn", "mlp"] {
        let p = plan(
            model_config(
                Tiny {
                    rope: false,
                    ..Tiny::default()
                },
                8,
                true,
            ),
            sambay_layers(false, memory),
        );
        report(
            &format!("sambay gmu memory={memory}"),
            check_model(&p, 0.0, 27),
        );
    }
}

/// All mixers are causal: the loss on the first p predictions of long rows equals the loss
/// of rows cut to p + 1 tokens.
#[test]
fn prefix_losses_match_truncated_rows() {
    for (layers, mamba, varlen) in [
        (transformer_layers(2, true), false, false),
        (sambay_layers(true, "mamba"), true, true),
    ] {
        let t = Tiny {
            rope: !mamba,
            varlen,
            ..Tiny::default()
        };
        let p = plan(model_config(t, layers.len(), mamba), layers);
        let model = CpuModel::<f64>::new(&p).unwrap();
        let mut rng = rng(30);
        let params = noisy_params(&model, &mut rng);
        let (rows, len) = (2, 15);
        let tokens = random_rows(&mut rng, rows, len - 1, varlen);
        let full = model
            .forward_loss(&params, &tokens, rows, len, &[4, 9, 14])
            .unwrap();
        for (i, &pref) in [4usize, 9, 14].iter().enumerate() {
            let cut: Vec<u32> = tokens
                .chunks(len)
                .flat_map(|r| r[..pref + 1].to_vec())
                .collect();
            let alone = model
                .forward_loss(&params, &cut, rows, pref + 1, &[pref])
                .unwrap()[0];
            assert!(
                (full[i] - alone).abs() < 1e-12,
                "prefix {pref}: {} vs {alone}",
                full[i]
            );
        }
    }
}

/// f32 and f64 agree, the f32 result does not depend on the thread count, and evaluation
/// without smoothing matches the training loss.
#[test]
fn f32_matches_f64_and_is_thread_count_independent() {
    let p = plan(
        model_config(
            Tiny {
                rope: false,
                varlen: true,
                ..Tiny::default()
            },
            8,
            true,
        ),
        sambay_layers(true, "mamba"),
    );
    let m64 = CpuModel::<f64>::new(&p).unwrap();
    let m32 = CpuModel::<f32>::new(&p).unwrap();
    let mut rng = rng(31);
    let p64 = noisy_params(&m64, &mut rng);
    let p32: Vec<Vec<f32>> = p64
        .iter()
        .map(|t| t.iter().map(|&v| v as f32).collect())
        .collect();
    let rows = random_rows(&mut rng, 3, 7, true);
    let mut g64 = m64.zero_grads();
    let l64 = m64
        .forward_backward(&p64, &mut g64, &rows, 3, 1.0, 0.0)
        .unwrap();
    let run32 = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let mut g = m32.zero_grads();
            let l = m32
                .forward_backward(&p32, &mut g, &rows, 3, 1.0, 0.0)
                .unwrap();
            (l, g)
        })
    };
    let (l1, g1) = run32(1);
    let (l2, g2) = run32(2);
    assert_eq!(l1.to_bits(), l2.to_bits());
    assert!(g1 == g2, "gradients depend on the thread count");
    assert!((l1 - l64).abs() < 1e-5 * l64.abs(), "{l1} vs {l64}");
    for (a, b) in g1.iter().zip(&g64) {
        let scale = b.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-6);
        let err = a
            .iter()
            .zip(b)
            .fold(0.0f64, |m, (x, y)| m.max((*x as f64 - y).abs()))
            / scale;
        assert!(err < 1e-3, "f32 gradient off by {err}");
    }
    let eval = m64.forward_loss(&p64, &rows, 3, 8, &[7]).unwrap();
    assert!((eval[0] - l64).abs() < 1e-12);
}

#[test]
fn plain_sgd_reduces_the_loss() {
    let p = plan(
        model_config(
            Tiny {
                rope: false,
                ..Tiny::default()
            },
            8,
            true,
        ),
        sambay_layers(false, "mamba"),
    );
    let model = CpuModel::<f32>::new(&p).unwrap();
    let mut params = model.init_params();
    let mut rng = rng(32);
    let rows = random_rows(&mut rng, 2, 7, false);
    let mut first = None;
    let mut last = 0.0;
    for _ in 0..30 {
        let mut g = model.zero_grads();
        last = model
            .forward_backward(&params, &mut g, &rows, 2, 1.0, 0.0)
            .unwrap();
        first.get_or_insert(last);
        for (pt, gt) in params.iter_mut().zip(&g) {
            for (v, d) in pt.iter_mut().zip(gt) {
                *v -= 0.05 * d;
            }
        }
    }
    let first = first.unwrap();
    assert!(last < 0.8 * first, "loss {first} -> {last}");
}

#[test]
fn plan_only_mixers_and_bad_input_are_errors() {
    let mut layers = transformer_layers(2, true);
    layers[1].mixer = Mixer::Mamba2 {
        export_memory: false,
    };
    let mut p = plan(
        model_config(Tiny::default(), 2, false),
        transformer_layers(2, true),
    );
    p.layers = layers;
    let e = CpuModel::<f32>::new(&p)
        .err()
        .expect("mamba2 rejected")
        .to_string();
    assert!(e.contains("mamba2 is plan-only"), "{e}");
    p.layers[1].mixer = Mixer::GatedDeltaNet {
        export_memory: false,
    };
    let e = CpuModel::<f32>::new(&p)
        .err()
        .expect("gdn rejected")
        .to_string();
    assert!(e.contains("gated_delta_net is plan-only"), "{e}");

    let p = plan(
        model_config(Tiny::default(), 2, false),
        transformer_layers(2, true),
    );
    let model = CpuModel::<f32>::new(&p).unwrap();
    let params = model.init_params();
    let mut g = model.zero_grads();
    let mut rows = vec![1u32; 2 * 8];
    assert!(model
        .forward_backward(&params, &mut g, &rows[..15], 2, 1.0, 0.0)
        .is_err());
    rows[3] = PADDED_VOCAB as u32;
    let e = model
        .forward_backward(&params, &mut g, &rows, 2, 1.0, 0.0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("outside the vocabulary"), "{e}");
    assert!(model.forward_loss(&params, &[1; 16], 2, 8, &[8]).is_err());
    let mut bad = p.clone();
    bad.params
        .retain(|s| s.name != "transformer.h.1.mlp.w3.weight");
    let e = CpuModel::<f32>::new(&bad)
        .err()
        .expect("missing param")
        .to_string();
    assert!(e.contains("transformer.h.1.mlp.w3.weight"), "{e}");
}

/// Forward+backward throughput of the CPU quickstart shape (Transformer++ n=128, L=4,
/// 4 heads of 32, 2 KV groups, V=512, T=128, micro 8, SP). Run with
/// `cargo test --release -p archscale-runtime quickstart_throughput -- --ignored --nocapture`.
#[test]
#[ignore = "benchmark; run in release mode"]
fn quickstart_throughput() {
    let (n, depth, seq, micro) = (128, 4, 128, 8);
    let mut cfg = model_config(
        Tiny {
            parametrization: Parametrization::Sp,
            ..Tiny::default()
        },
        depth,
        false,
    );
    cfg.n_embd = n;
    cfg.n_head = 4;
    cfg.n_query_groups = 2;
    cfg.head_size = 32;
    cfg.intermediate_size = 4 * n;
    cfg.vocab_size = 512;
    cfg.padded_vocab_size = 512;
    cfg.block_size = seq;
    cfg.attn_scale = 1.0 / (32f64).sqrt();
    let layers = (0..depth)
        .map(|i| LayerPlan {
            index: i,
            mixer: attn(None, true),
            mlp_exports_memory: false,
        })
        .collect();
    let p = plan(cfg, layers);
    let model = CpuModel::<f32>::new(&p).unwrap();
    let params = model.init_params();
    let mut grads = model.zero_grads();
    let mut rng = rng(40);
    let rows: Vec<u32> = (0..micro * (seq + 1))
        .map(|_| rng.gen_range(0..512))
        .collect();
    let n_params: usize = params.iter().map(|t| t.len()).sum();
    model
        .forward_backward(&params, &mut grads, &rows, micro, 1.0, 0.0)
        .unwrap();
    let steps = 20;
    let start = std::time::Instant::now();
    for _ in 0..steps {
        model
            .forward_backward(&params, &mut grads, &rows, micro, 1.0, 0.0)
            .unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    let tokens = (steps * micro * seq) as f64;
    eprintln!(
        "QUICKSTART {n_params} params, {} threads: {:.1} ms per micro-step, {:.0} tokens/s (forward+backward)",
        rayon::current_num_threads(),
        1e3 * secs / steps as f64,
        tokens / secs
    );
}

/// Every builtin family, shrunk (n_embd 16, 4 heads of 4, 2 KV groups, vocab 64, window 4,
/// depth 8, any-depth) and compiled by the real spec → compiler pipeline: the CPU model accepts the
/// compiler's parameter inventory, its whole-model gradients pass a sampled f64 check, and
/// plan-only mixers are rejected by name.
#[test]
fn compiled_families_build_and_gradcheck() {
    let families: &[(&str, &str)] = &[
        (
            "transformer",
            include_str!("../../../experiments/archs/transformer.toml"),
        ),
        (
            "transformerls",
            include_str!("../../../experiments/archs/transformerls.toml"),
        ),
        (
            "samba",
            include_str!("../../../experiments/archs/samba.toml"),
        ),
        (
            "sambay",
            include_str!("../../../experiments/archs/sambay.toml"),
        ),
        (
            "sambayda",
            include_str!("../../../experiments/archs/sambayda.toml"),
        ),
        (
            "sambayoco",
            include_str!("../../../experiments/archs/sambayoco.toml"),
        ),
        (
            "mambay",
            include_str!("../../../experiments/archs/mambay.toml"),
        ),
        (
            "sambaymlp",
            include_str!("../../../experiments/archs/sambaymlp.toml"),
        ),
        (
            "sambayattn",
            include_str!("../../../experiments/archs/sambayattn.toml"),
        ),
        (
            "sambayattnall",
            include_str!("../../../experiments/archs/sambayattnall.toml"),
        ),
        (
            "phi4miniflash",
            include_str!("../../../experiments/archs/phi4miniflash.toml"),
        ),
        (
            "sambay2",
            include_str!("../../../experiments/archs/sambay2.toml"),
        ),
        (
            "mambay2",
            include_str!("../../../experiments/archs/mambay2.toml"),
        ),
        ("gdny", include_str!("../../../experiments/archs/gdny.toml")),
        (
            "sgdny",
            include_str!("../../../experiments/archs/sgdny.toml"),
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    for &(family, text) in families {
        let arch: String = text
            .lines()
            .map(|line| {
                let key = line.split(['=', ' ']).next().unwrap_or("");
                match key {
                    "depths" => String::new(),
                    "width" => "width = { n_embd = 16 }".to_string(),
                    "heads" => "heads = 4".to_string(),
                    "kv_groups" => "kv_groups = 2".to_string(),
                    "head_dim" => "head_dim = 4".to_string(),
                    "vocab_size" => "vocab_size = 64".to_string(),
                    "local_window" => "local_window = 4".to_string(),
                    "token_rule" => {
                        "token_rule = { mult = \"15 * n_embd^2 / depth^2\" }".to_string()
                    }
                    _ => line.to_string(),
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        let arch_path = dir.path().join(format!("{family}.toml"));
        std::fs::write(&arch_path, arch).unwrap();
        let experiment = format!(
            r#"arch = "{arch}"
depth = 8
parametrization = "mup++"

[base]
depth = 8
lr = 1e-3
batch_tokens = 16
warmup_tokens = 16

[train]
tokens = 160
seq_len = 8
micro_batch = 2

[data]
train = [{{ synthetic = {{ seed = 1, tokens = 10_000 }} }}]
val = [{{ synthetic = {{ seed = 2, tokens = 1_000 }} }}]

[cluster]
nodes = 1
gpus_per_node = 1
"#,
            arch = arch_path.display()
        );
        let exp = archscale_spec::parse_experiment("exp.toml", &experiment, dir.path(), &[])
            .unwrap_or_else(|e| panic!("{family}: {}", e.render()));
        let plans = archscale_compiler::plan_experiment(&exp)
            .unwrap_or_else(|e| panic!("{family}: {}", e.render()));
        let plan = &plans[0];
        match family {
            "sambay2" | "mambay2" | "gdny" | "sgdny" => {
                let e = CpuModel::<f32>::new(plan)
                    .err()
                    .unwrap_or_else(|| panic!("{family} must be rejected"))
                    .to_string();
                assert!(e.contains("plan-only"), "{family}: {e}");
            }
            _ => {
                let model = CpuModel::<f32>::new(plan).unwrap_or_else(|e| panic!("{family}: {e}"));
                let n: u64 = model.param_specs().iter().map(|s| s.numel() as u64).sum();
                assert_eq!(n, plan.estimates.params_total, "{family}: parameter count");
                report(
                    &format!("compiled {family}"),
                    check_model_sampled(plan, 0.1, 50, 1),
                );
            }
        }
    }
}

/// Sizes where the products take the parallel GEMM split: gradients are bitwise the same
/// with 1 and 3 rayon threads.
#[test]
fn parallel_gemm_split_is_thread_count_independent() {
    let (n, depth, seq, micro) = (64, 2, 64, 4);
    let mut cfg = model_config(Tiny::default(), depth, false);
    cfg.n_embd = n;
    cfg.n_head = 4;
    cfg.n_query_groups = 2;
    cfg.head_size = 16;
    cfg.intermediate_size = 4 * n;
    cfg.vocab_size = 256;
    cfg.padded_vocab_size = 256;
    cfg.block_size = seq;
    let p = plan(cfg, transformer_layers(depth, true));
    let model = CpuModel::<f32>::new(&p).unwrap();
    let params = model.init_params();
    let mut rng = rng(41);
    let rows: Vec<u32> = (0..micro * (seq + 1))
        .map(|_| rng.gen_range(0..256))
        .collect();
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let mut g = model.zero_grads();
            let l = model
                .forward_backward(&params, &mut g, &rows, micro, 1.0, 0.1)
                .unwrap();
            (l, g)
        })
    };
    let (l1, g1) = run(1);
    let (l3, g3) = run(3);
    assert_eq!(l1.to_bits(), l3.to_bits());
    assert!(g1 == g3, "gradients depend on the thread count");
}

/// Tiny SambaY-DA (attention, Mamba and GMU layers) under SP, without RoPE.
fn sambay_da_sp_plan() -> Plan {
    plan(
        model_config(
            Tiny {
                rope: false,
                parametrization: Parametrization::Sp,
                ..Tiny::default()
            },
            8,
            true,
        ),
        sambay_layers(true, "mamba"),
    )
}

#[test]
fn bf16_storage_rounds_the_gpu_stored_activations_and_nothing_more() {
    // SambaY-DA: Mamba scan inputs and DA's O1/O2 are rounded; the loss moves by bf16
    // rounding (≈ 1e-3 relative), not by more, and an exact model is unchanged.
    let p = sambay_da_sp_plan();
    let exact = CpuModel::<f32>::new(&p).unwrap();
    let bf16 = CpuModel::<f32>::new(&p)
        .unwrap()
        .with_storage(Storage::Bf16);
    let mut rng = rng(5);
    let params = exact.init_params();
    let rows = random_rows(&mut rng, 2, p.model.block_size, false);
    let l_exact = exact.loss(&params, &rows, 2, 0.0).unwrap();
    let l_again = CpuModel::<f32>::new(&p)
        .unwrap()
        .with_storage(Storage::Exact)
        .loss(&params, &rows, 2, 0.0)
        .unwrap();
    let l_bf16 = bf16.loss(&params, &rows, 2, 0.0).unwrap();
    assert_eq!(l_exact, l_again);
    let rel = ((l_bf16 - l_exact) / l_exact).abs();
    assert!(
        rel > 0.0 && rel < 1e-2,
        "bf16 storage moved the loss by {rel:e}"
    );
    let mut v = vec![1.0f32 + 1e-5, -5.3, 0.0];
    Storage::Bf16.store(&mut v);
    assert_eq!(v, [1.0, -5.3125, 0.0]);
    let mut w = vec![1.0f32 + 1e-5];
    Storage::Exact.store(&mut w);
    assert_eq!(w, [1.0 + 1e-5]);
}

#[test]
fn bf16_branches_move_the_loss_at_bf16_level_and_off_is_exact() {
    // SambaY-DA (attention, Mamba and GMU layers): rounding every branch output moves the
    // loss at bf16 level; switched off, the model is the exact one.
    let p = sambay_da_sp_plan();
    let exact = CpuModel::<f32>::new(&p).unwrap();
    let off = CpuModel::<f32>::new(&p).unwrap().with_bf16_branches(false);
    let on = CpuModel::<f32>::new(&p).unwrap().with_bf16_branches(true);
    let mut rng = rng(6);
    let params = exact.init_params();
    let rows = random_rows(&mut rng, 2, p.model.block_size, false);
    let l_exact = exact.loss(&params, &rows, 2, 0.0).unwrap();
    assert_eq!(off.loss(&params, &rows, 2, 0.0).unwrap(), l_exact);
    let rel = ((on.loss(&params, &rows, 2, 0.0).unwrap() - l_exact) / l_exact).abs();
    assert!(
        rel > 0.0 && rel < 1e-2,
        "bf16 branches moved the loss by {rel:e}"
    );
}
