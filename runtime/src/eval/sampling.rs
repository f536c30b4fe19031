//! Next-token choice shared by every decoding path (evals and `generate`): greedy, or
//! temperature with nucleus (top-p) sampling from a seeded ChaCha stream. Only the real
//! vocabulary is eligible (padding rows of the head are never chosen).

use super::decoder::{Decoder, Logits};
use crate::{Result, RuntimeError};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplingOptions {
    /// 0 is greedy (argmax, lowest id on ties).
    pub temperature: f64,
    /// Nucleus mass in (0, 1]; 1 samples from the whole distribution.
    pub top_p: f64,
    pub seed: u64,
}

impl SamplingOptions {
    pub fn greedy() -> Self {
        SamplingOptions {
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
        }
    }
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(RuntimeError::Message(format!(
                "temperature must be ≥ 0, got {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(RuntimeError::Message(format!(
                "top-p must be in (0, 1], got {}",
                self.top_p
            )));
        }
        Ok(())
    }
}

pub struct Sampler {
    opts: SamplingOptions,
    rng: ChaCha8Rng,
}

impl Sampler {
    pub fn new(opts: SamplingOptions) -> Self {
        Sampler {
            opts,
            rng: ChaCha8Rng::seed_from_u64(opts.seed),
        }
    }

    /// Picks a token from `logits` restricted to ids `< vocab`.
    pub fn pick(&mut self, logits: &[f32], vocab: usize) -> u32 {
        let logits = &logits[..vocab.min(logits.len())];
        if self.opts.temperature == 0.0 {
            return argmax(logits);
        }
        let inv_t = 1.0 / self.opts.temperature;
        let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let mut probs: Vec<(u32, f64)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, ((l as f64 - max) * inv_t).exp()))
            .collect();
        let total: f64 = probs.iter().map(|p| p.1).sum();
        probs.iter_mut().for_each(|p| p.1 /= total);
        if self.opts.top_p < 1.0 {
            probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            let mut mass = 0.0;
            let mut keep = probs.len();
            for (i, p) in probs.iter().enumerate() {
                mass += p.1;
                if mass >= self.opts.top_p {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
        }
        let total: f64 = probs.iter().map(|p| p.1).sum();
        let mut u = self.rng.gen::<f64>() * total;
        for &(id, p) in &probs {
            if u < p {
                return id;
            }
            u -= p;
        }
        probs.last().map_or(0, |p| p.0)
    }
}

/// Lowest index of the largest finite value.
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] || values[best].is_nan() {
            best = i;
        }
    }
    best as u32
}

/// Feeds `prompt`, then generates up to `max_new` tokens, stopping after `stop_id` or when
/// `stop(generated)` says so. Returns the generated ids (a stop id included).
pub fn generate(
    decoder: &mut Decoder,
    prompt: &[u32],
    max_new: usize,
    sampler: &mut Sampler,
    stop_id: Option<u32>,
    mut stop: impl FnMut(&[u32]) -> bool,
) -> Result<Vec<u32>> {
    let vocab = decoder.vocab_size();
    let mut out = Vec::with_capacity(max_new);
    if max_new == 0 {
        return Ok(out);
    }
    let mut logits = decoder.feed(prompt, Logits::Last)?;
    loop {
        let next = sampler.pick(&logits, vocab);
        out.push(next);
        if out.len() >= max_new || Some(next) == stop_id || stop(&out) {
            break;
        }
        logits = decoder.feed(&[next], Logits::Last)?;
    }
    Ok(out)
}

/// Greedy decoding of a batch of prompts, each row with its own cache: the rows run
/// together on the rayon pool (each row's ops also split over it), and a row's result does
/// not depend on the batch it is in — it is exactly [`generate`] with a greedy sampler.
pub fn generate_greedy_batch(
    decoder: &Decoder,
    prompts: &[Vec<u32>],
    max_new: usize,
    stop_id: Option<u32>,
    stop: impl Fn(&[u32]) -> bool + Sync,
) -> Result<Vec<Vec<u32>>> {
    prompts
        .par_iter()
        .map(|prompt| {
            let mut row = decoder.fork();
            let mut sampler = Sampler::new(SamplingOptions::greedy());
            generate(&mut row, prompt, max_new, &mut sampler, stop_id, &stop)
        })
        .collect()
}

/// Natural-log softmax probability of `target` over all of `logits` (the padded vocabulary,
/// as the training loss and lm-eval's `log_softmax` over the model output).
pub fn log_prob(logits: &[f32], target: u32) -> f64 {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = max
        + logits
            .iter()
            .map(|&v| (v as f64 - max).exp())
            .sum::<f64>()
            .ln();
    logits
        .get(target as usize)
        .map_or(f64::NEG_INFINITY, |&v| v as f64 - lse)
}
