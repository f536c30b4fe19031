//! Decoder logits against the CPU reference model's losses, decoding determinism.

use super::decoder::{Decoder, Logits};
use super::sampling::{generate, log_prob, Sampler, SamplingOptions};
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
