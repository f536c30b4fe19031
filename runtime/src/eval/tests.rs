//! Decoder logits against the CPU reference model's losses, decoding determinism.

use super::decoder::{Decoder, Logits};
use super::sampling::{generate, generate_greedy_batch, log_prob, Sampler, SamplingOptions};
use super::test_support::*;
use crate::cpu::CpuModel;
use archscale_compiler::{NormKind, Parametrization, Plan};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Per-position cross-entropy of `tokens[1..]` from the reference model's prefix means.
fn reference_losses(plan: &Plan, params: &[Vec<f32>], tokens: &[u32]) -> Vec<f64> {
    let model = CpuModel::<f32>::new(plan).unwrap();
    let seq = tokens.len() - 1;
    let prefixes: Vec<usize> = (1..=seq).collect();
    let means = model
        .forward_loss(params, tokens, 1, tokens.len(), &prefixes)
        .unwrap();
    (0..seq)
        .map(|i| {
            if i == 0 {
                means[0]
            } else {
                means[i] * (i + 1) as f64 - means[i - 1] * i as f64
            }
        })
        .collect()
}

/// Per-position cross-entropy from the decoder fed in chunks of the given sizes.
fn decoder_losses(plan: &Plan, params: &[Vec<f32>], tokens: &[u32], chunks: &[usize]) -> Vec<f64> {
    let mut dec = Decoder::new(plan, params).unwrap();
    let v = plan.model.padded_vocab_size;
    let inputs = &tokens[..tokens.len() - 1];
    let mut out = Vec::new();
    let mut start = 0;
    for &c in chunks.iter().cycle() {
        if start >= inputs.len() {
            break;
        }
        let end = (start + c).min(inputs.len());
        let logits = dec.feed(&inputs[start..end], Logits::All).unwrap();
        for (i, row) in logits.chunks(v).enumerate() {
            out.push(-log_prob(row, tokens[start + i + 1]));
        }
        start = end;
    }
    out
}

fn random_tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.gen_range(0..vocab as u32)).collect()
}

fn assert_close(a: &[f64], b: &[f64], what: &str) {
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() < 2e-4 * (1.0 + y.abs()),
            "{what}: position {i}: decoder {x} vs reference {y}"
        );
    }
}

#[test]
fn transformer_decoder_matches_the_reference_model() {
    for (tied, norm, bias, par) in [
        (
            false,
            NormKind::RmsNorm,
            false,
            Parametrization::MupPlusPlus,
        ),
        (true, NormKind::LayerNorm, true, Parametrization::Sp),
    ] {
        let spec = TinySpec {
            tied,
            norm,
            bias,
            parametrization: par,
            ..TinySpec::default()
        };
        let plan = plan(model_config(&spec, 3, false), transformer_layers(3), vec![]);
        let params = noisy_params(&plan, 5);
        let tokens = random_tokens(15, spec.vocab, 9);
        let want = reference_losses(&plan, &params, &tokens);
        assert_close(
            &decoder_losses(&plan, &params, &tokens, &[14]),
            &want,
            "one chunk",
        );
        assert_close(
            &decoder_losses(&plan, &params, &tokens, &[5, 1]),
            &want,
            "prefill then steps",
        );
        assert_close(
            &decoder_losses(&plan, &params, &tokens, &[1]),
            &want,
            "token by token",
        );
    }
}

#[test]
fn hybrid_decoder_matches_the_reference_model() {
    let spec = TinySpec::default();
    let plan = plan(
        model_config(&spec, 8, true),
        hybrid_layers(spec.n_embd),
        vec![],
    );
    let params = noisy_params(&plan, 6);
    let tokens = random_tokens(13, spec.vocab, 10);
    let want = reference_losses(&plan, &params, &tokens);
    assert_close(
        &decoder_losses(&plan, &params, &tokens, &[12]),
        &want,
        "one chunk",
    );
    assert_close(
        &decoder_losses(&plan, &params, &tokens, &[4, 1, 2]),
        &want,
        "mixed chunks",
    );
}

#[test]
fn differential_attention_decoder_matches_the_reference_model() {
    let spec = TinySpec::default();
    // SambaY-DA-like hybrid (windowed, full, cross-attention DA) and a DA Transformer++ with
    // RoPE and a window.
    let cases = [
        plan(
            model_config(&spec, 8, true),
            with_differential(hybrid_layers(spec.n_embd)),
            vec![],
        ),
        plan(
            model_config(&spec, 3, false),
            with_differential(transformer_layers(3)),
            vec![],
        ),
    ];
    for (seed, plan) in cases.iter().enumerate() {
        let params = noisy_params(plan, 11 + seed as u64);
        let tokens = random_tokens(14, spec.vocab, 12 + seed as u64);
        let want = reference_losses(plan, &params, &tokens);
        assert_close(
            &decoder_losses(plan, &params, &tokens, &[13]),
            &want,
            "one chunk",
        );
        assert_close(
            &decoder_losses(plan, &params, &tokens, &[1]),
            &want,
            "token by token",
        );
        assert_close(
            &decoder_losses(plan, &params, &tokens, &[3, 1]),
            &want,
            "prefill then steps",
        );
    }
}

#[test]
fn batched_greedy_decoding_equals_one_prompt_at_a_time() {
    let spec = TinySpec::default();
    let plan = plan(
        model_config(&spec, 8, true),
        with_differential(hybrid_layers(spec.n_embd)),
        vec![],
    );
    let params = noisy_params(&plan, 14);
    let dec = Decoder::new(&plan, &params).unwrap();
    let prompts: Vec<Vec<u32>> = (0..6)
        .map(|i| random_tokens(2 + 3 * i, spec.vocab, 40 + i as u64))
        .collect();
    // Stop id 5 and a stop rule end some rows early.
    let stop = |g: &[u32]| g.len() >= 3 && g[g.len() - 1] == g[g.len() - 2];
    let serial: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| {
            let mut one = Decoder::new(&plan, &params).unwrap();
            let mut sampler = Sampler::new(SamplingOptions::greedy());
            generate(&mut one, p, 9, &mut sampler, Some(5), stop).unwrap()
        })
        .collect();
    for batch in [1, 2, 4, 6] {
        let got: Vec<Vec<u32>> = prompts
            .chunks(batch)
            .flat_map(|b| generate_greedy_batch(&dec, b, 9, Some(5), stop).unwrap())
            .collect();
        assert_eq!(got, serial, "batch size {batch}");
    }
    assert!(serial.iter().all(|g| !g.is_empty() && g.len() <= 9));
}

#[test]
fn greedy_decoding_on_a_backend_equals_the_cached_decoder() {
    // The device path (one whole forward per new token, no cache) through the CPU backend,
    // against the CPU decoder's cached steps: the same tokens, stops included.
    use super::eval_model::EvalModel;
    use crate::backend::Backend;
    let spec = TinySpec::default();
    let plan = plan(
        model_config(&spec, 8, true),
        with_differential(hybrid_layers(spec.n_embd)),
        vec![],
    );
    let params = noisy_params(&plan, 21);
    let prompts: Vec<Vec<u32>> = (0..4)
        .map(|i| random_tokens(3 + 4 * i, spec.vocab, 60 + i as u64))
        .collect();
    let stop = |g: &[u32]| g.len() >= 3 && g[g.len() - 1] == g[g.len() - 2];
    let dec = Decoder::new(&plan, &params).unwrap();
    let cached = EvalModel::Cpu(&dec)
        .generate_greedy(&prompts, 7, Some(5), stop)
        .unwrap();
    let mut backend = crate::cpu_backend::CpuBackend::new(&plan).unwrap();
    backend.write_params(&params).unwrap();
    let mut device = EvalModel::Device {
        backend: &mut backend,
        vocab: spec.vocab,
    };
    assert_eq!(device.name(), "cpu");
    let uncached = device.generate_greedy(&prompts, 7, Some(5), stop).unwrap();
    assert_eq!(uncached, cached);
    assert!(cached.iter().all(|g| !g.is_empty() && g.len() <= 7));
    // the last position's logits are the decoder's after the whole prompt
    let want = Decoder::new(&plan, &params)
        .unwrap()
        .feed(&prompts[1], Logits::Last)
        .unwrap();
    let got = backend.last_logits(&prompts[1]).unwrap();
    assert_eq!(got.len(), plan.model.padded_vocab_size);
    let worst = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs() / (1.0 + b.abs()))
        .fold(0.0f32, f32::max);
    assert!(worst < 1e-4, "{worst}");
    assert!(backend.last_logits(&[]).is_err());
}

#[test]
fn choice_scores_on_a_backend_equal_the_cached_decoder() {
    // Continuations scored from the backend's prefix losses, against the CPU decoder's cached
    // log-probabilities; short and long contexts, some truncated by max_length.
    use super::eval_model::EvalModel;
    use crate::backend::Backend;
    let spec = TinySpec::default();
    let plan = plan(
        model_config(&spec, 8, true),
        hybrid_layers(spec.n_embd),
        vec![],
    );
    let params = noisy_params(&plan, 23);
    let items: Vec<Vec<(Vec<u32>, Vec<u32>)>> = (0..4)
        .map(|i| {
            let ctx = random_tokens(2 + 9 * i, spec.vocab, 80 + i as u64);
            (0..3)
                .map(|k| {
                    (
                        ctx.clone(),
                        random_tokens(1 + k, spec.vocab, 90 + (4 * i + k) as u64),
                    )
                })
                .collect()
        })
        .collect();
    let max_length = 20;
    let dec = Decoder::new(&plan, &params).unwrap();
    let cached = EvalModel::Cpu(&dec)
        .score_choices(&items, max_length, 2, |_, _| {})
        .unwrap();
    let mut backend = crate::cpu_backend::CpuBackend::new(&plan).unwrap();
    backend.write_params(&params).unwrap();
    let mut seen = 0;
    let device = EvalModel::Device {
        backend: &mut backend,
        vocab: spec.vocab,
    }
    .score_choices(&items, max_length, 2, |done, _| seen = done)
    .unwrap();
    assert_eq!(seen, items.len());
    for (a, b) in device.iter().flatten().zip(cached.iter().flatten()) {
        assert!(a.is_finite() && *a < 0.0);
        assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{a} vs {b}");
    }
    // a continuation longer than max_length is an error on both
    let long = vec![vec![(
        vec![1, 2],
        random_tokens(max_length + 1, spec.vocab, 7),
    )]];
    assert!(EvalModel::Cpu(&dec)
        .score_choices(&long, max_length, 1, |_, _| {})
        .is_err());
    assert!(EvalModel::Device {
        backend: &mut backend,
        vocab: spec.vocab
    }
    .score_choices(&long, max_length, 1, |_, _| {})
    .is_err());
}

#[test]
fn state_snapshots_continue_identically() {
    let spec = TinySpec::default();
    let plan = plan(
        model_config(&spec, 8, true),
        hybrid_layers(spec.n_embd),
        vec![],
    );
    let params = noisy_params(&plan, 7);
    let mut dec = Decoder::new(&plan, &params).unwrap();
    dec.feed(&[3, 4, 5, 6], Logits::Last).unwrap();
    let snap = dec.state().clone();
    let a = dec.feed(&[7, 8], Logits::All).unwrap();
    dec.set_state(snap);
    let b = dec.feed(&[7, 8], Logits::All).unwrap();
    assert_eq!(a, b);
}

#[test]
fn sampling_is_deterministic_for_a_seed_and_greedy_is_argmax() {
    let spec = TinySpec::default();
    let plan = plan(model_config(&spec, 2, false), transformer_layers(2), vec![]);
    let params = noisy_params(&plan, 8);
    let run = |opts: SamplingOptions| {
        let mut dec = Decoder::new(&plan, &params).unwrap();
        generate(
            &mut dec,
            &[1, 2, 3],
            8,
            &mut Sampler::new(opts),
            None,
            |_| false,
        )
        .unwrap()
    };
    let sampled = SamplingOptions {
        temperature: 0.9,
        top_p: 0.9,
        seed: 42,
    };
    assert_eq!(run(sampled), run(sampled));
    let greedy = run(SamplingOptions::greedy());
    let mut dec = Decoder::new(&plan, &params).unwrap();
    let logits = dec.feed(&[1, 2, 3], Logits::Last).unwrap();
    assert_eq!(greedy[0], super::sampling::argmax(&logits[..spec.vocab]));
    assert!(greedy.iter().all(|&t| (t as usize) < spec.vocab));
}

fn loaded(plan: Plan, params: Vec<Vec<f32>>) -> super::LoadedModel {
    super::LoadedModel {
        plan,
        params,
        run_dir: "run".into(),
        checkpoint: "run/checkpoints/step-00000001".into(),
        step: 1,
        tokens: 64,
    }
}

#[test]
fn val_matches_the_reference_loss_on_the_synthetic_corpus() {
    use archscale_compiler::DataSource;
    let spec = TinySpec {
        vocab: 512,
        padded_vocab: 512,
        block_size: 8,
        ..TinySpec::default()
    };
    let val = vec![DataSource::Synthetic {
        seed: 11,
        tokens: 40_000,
        weight: 1.0,
    }];
    let plan = plan(model_config(&spec, 2, false), transformer_layers(2), val);
    let params = noisy_params(&plan, 3);
    let dir = tempfile::tempdir().unwrap();
    let model = loaded(plan.clone(), params.clone());
    // The backend starts from its own init: evaluate must load the checkpoint's parameters.
    let mut backend = crate::cpu_backend::CpuBackend::new(&plan).unwrap();
    let report = super::val::evaluate(&model, &mut backend, dir.path(), None, None).unwrap();
    assert_eq!(report.backend, "cpu");
    assert_eq!(report.at.len(), 2);
    assert_eq!(report.batches, 2);
    // Recompute: the first eval_iters rows of the validation loader, prefix losses averaged.
    let loader = crate::data::ValLoader::new(&plan, 0, 1, dir.path()).unwrap();
    let cpu = CpuModel::<f32>::new(&plan).unwrap();
    let mut sums = [0.0; 2];
    for b in loader.batches(2, 1).unwrap() {
        let l = cpu.forward_loss(&params, &b, 1, 17, &[8, 16]).unwrap();
        sums[0] += l[0] / 2.0;
        sums[1] += l[1] / 2.0;
    }
    assert!(
        (report.at[0].loss - sums[0]).abs() < 1e-9 && (report.at[1].loss - sums[1]).abs() < 1e-9
    );
    assert!((report.at[0].ppl - sums[0].exp()).abs() < 1e-9);
    let longer = super::val::evaluate(&model, &mut backend, dir.path(), Some(3), Some(1)).unwrap();
    assert_eq!(
        longer.at.iter().map(|a| a.context).collect::<Vec<_>>(),
        vec![8, 16, 24]
    );
    // A device backend is built for rows of k·T + 1 tokens.
    assert_eq!(
        super::val::backend_plan(&plan, Some(3)).data.val_block_size,
        25
    );
    assert_eq!(
        super::val::backend_plan(&plan, None).data.val_block_size,
        17
    );
}

#[test]
fn export_writes_both_names_of_a_tied_head_and_a_config() {
    let spec = TinySpec {
        tied: true,
        ..TinySpec::default()
    };
    let plan = plan(model_config(&spec, 2, false), transformer_layers(2), vec![]);
    let params = noisy_params(&plan, 4);
    let dir = tempfile::tempdir().unwrap();
    let model = loaded(plan.clone(), params.clone());
    let paths =
        super::export::export_hf(&model, dir.path(), super::export::ExportDtype::F32).unwrap();
    let bytes = std::fs::read(&paths[0]).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let wte = st.tensor("transformer.wte.weight").unwrap();
    let head = st.tensor("lm_head.weight").unwrap();
    assert_eq!(wte.data(), head.data());
    assert_eq!(st.names().len(), plan.params.len() + 1);
    let idx = plan
        .params
        .iter()
        .position(|p| p.name == "transformer.h.1.attn.attn.weight")
        .unwrap();
    let got: Vec<f32> = st
        .tensor("transformer.h.1.attn.attn.weight")
        .unwrap()
        .data()
        .chunks(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    assert_eq!(got, params[idx]);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&paths[1]).unwrap()).unwrap();
    assert_eq!(cfg["name"], "tiny_d2");
    assert_eq!(cfg["overrides"]["tied_embed"], true);
    assert_eq!(cfg["overrides"]["mup"], true);
    assert_eq!(cfg["overrides"]["mup_d0"], 16);
    assert_eq!(cfg["overrides"]["mup_hd0"], 128);
    assert_eq!(cfg["overrides"]["local_window"], 3);
    assert_eq!(cfg["resolved"]["padded_vocab_size"], 24);
}
