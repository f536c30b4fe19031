//! Single-needle retrieval in the style of RULER's `niah_single_1`: a haystack of repeated
//! filler sentences ("noise") of a target token length, one needle `One of the special
//! magic numbers for {key} is: {value}.` inserted at a relative depth, and a question; the
//! answer is correct when the 7-digit value appears in the greedy continuation (RULER's
//! `string_match_all` for one reference). Keys are `adjective-noun` pairs from built-in
//! lists; every (length, depth, sample) has its own seeded prompt.

use super::eval_model::EvalModel;
use super::names::{ADJECTIVES, NOUNS};
use super::tokenizer::TextTokenizer;
use crate::{Result, RuntimeError};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

/// RULER's noise haystack.
pub const NOISE: &str =
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.";
pub const MAX_NEW_TOKENS: usize = 24;

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NiahPrompt {
    pub prompt: String,
    pub key: String,
    pub value: String,
    /// Haystack sentences before the needle, and in total.
    pub needle_at: usize,
    pub sentences: usize,
}

fn sentences() -> Vec<&'static str> {
    NOISE.split_inclusive('.').map(str::trim).collect()
}

pub(crate) fn render(key: &str, value: &str, n_sentences: usize, depth: f64) -> (String, usize) {
    let base = sentences();
    let at = ((depth.clamp(0.0, 1.0) * n_sentences as f64).round() as usize).min(n_sentences);
    let needle = format!("One of the special magic numbers for {key} is: {value}.");
    let mut parts: Vec<&str> = Vec::with_capacity(n_sentences + 1);
    for i in 0..n_sentences {
        if i == at {
            parts.push(&needle);
        }
        parts.push(base[i % base.len()]);
    }
    if at == n_sentences {
        parts.push(&needle);
    }
    let context = parts.join(" ");
    let prompt = format!(
        "Some special magic numbers are hidden within the following text. Make sure to memorize it. \
         I will quiz you about the numbers afterwards.\n{context}\n\
         What are all the special magic numbers for {key} mentioned in the provided text? \
         The special magic numbers for {key} mentioned in the provided text are"
    );
    (prompt, at)
}

/// SplitMix64 over the prompt's coordinates: distinct prompts get unrelated streams.
fn prompt_seed(seed: u64, length: usize, depth: f64, sample: usize) -> u64 {
    [length as u64, (depth * 1e6).round() as u64, sample as u64]
        .iter()
        .fold(seed, |acc, &v| {
            let mut z = (acc ^ v).wrapping_add(0x9e37_79b9_7f4a_7c15);
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        })
}

/// The prompt of `sample` at `length` tokens and `depth` ∈ [0, 1]: the largest haystack
/// whose prompt fits in `length` tokens (at least one sentence).
pub fn make_prompt(
    tokenizer: &TextTokenizer,
    length: usize,
    depth: f64,
    sample: usize,
    seed: u64,
) -> Result<NiahPrompt> {
    let mut rng = ChaCha8Rng::seed_from_u64(prompt_seed(seed, length, depth, sample));
    let key = format!(
        "{}-{}",
        ADJECTIVES[rng.gen_range(0..ADJECTIVES.len())],
        NOUNS[rng.gen_range(0..NOUNS.len())]
    );
    let value = rng.gen_range(1_000_000..10_000_000u32).to_string();
    let tokens = |n: usize| -> Result<usize> {
        Ok(tokenizer.encode(&render(&key, &value, n, depth).0)?.len())
    };
    // Tokens grow monotonically with sentences: binary search the largest count that fits.
    let (mut lo, mut hi) = (1usize, 2usize);
    while tokens(hi)? <= length {
        lo = hi;
        hi *= 2;
        if hi > 1 << 24 {
            break;
        }
    }
    if tokens(1)? > length {
        return Err(RuntimeError::Message(format!(
            "NIAH length {length} is shorter than the question and one sentence"
        )));
    }
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        if tokens(mid)? <= length {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let (prompt, at) = render(&key, &value, lo, depth);
    Ok(NiahPrompt {
        prompt,
        key,
        value,
        needle_at: at,
        sentences: lo,
    })
}

#[derive(Clone, Debug, Serialize)]
pub struct NiahOptions {
    pub lengths: Vec<usize>,
    pub depths: Vec<f64>,
    pub samples: usize,
    pub seed: u64,
    /// Prompts decoded together (results do not depend on it).
    pub batch_size: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct NiahCell {
    pub length: usize,
    pub depth: f64,
    pub accuracy: f64,
    pub prompt_tokens_mean: f64,
    pub answers: Vec<(String, String, bool)>,
}

/// Every (length, depth, sample) prompt in order, with its tokens.
fn jobs(tokenizer: &TextTokenizer, opts: &NiahOptions) -> Result<Vec<(NiahPrompt, Vec<u32>)>> {
    if !tokenizer.is_text() {
        return Err(RuntimeError::Message(
            "niah needs a text tokenizer; this model reads ids (synthetic corpus)".into(),
        ));
    }
    if let Some(d) = opts.depths.iter().find(|d| !(0.0..=1.0).contains(*d)) {
        return Err(RuntimeError::Message(format!(
            "NIAH depths are fractions in [0, 1], got {d}"
        )));
    }
    if opts.batch_size == 0 {
        return Err(RuntimeError::Message(
            "batch size must be at least 1".into(),
        ));
    }
    let mut jobs = Vec::new();
    for &length in &opts.lengths {
        for &depth in &opts.depths {
            for s in 0..opts.samples {
                let p = make_prompt(tokenizer, length, depth, s, opts.seed)?;
                let ids = tokenizer.encode(&p.prompt)?;
                jobs.push((p, ids));
            }
        }
    }
    Ok(jobs)
}

/// Tokens of the longest prompt [`evaluate`] decodes with `opts` (a device decoder is sized
/// for it).
pub fn longest_prompt(tokenizer: &TextTokenizer, opts: &NiahOptions) -> Result<usize> {
    Ok(jobs(tokenizer, opts)?
        .iter()
        .map(|j| j.1.len())
        .max()
        .unwrap_or(0))
}

pub fn evaluate(
    model: &mut EvalModel,
    tokenizer: &TextTokenizer,
    opts: &NiahOptions,
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<NiahCell>> {
    // decoded batch_size at a time
    let jobs = jobs(tokenizer, opts)?;
    let total = jobs.len();
    let eos = tokenizer.eos();
    let mut results = Vec::with_capacity(total);
    for batch in jobs.chunks(opts.batch_size) {
        let ids: Vec<Vec<u32>> = batch.iter().map(|j| j.1.clone()).collect();
        let generated = model.generate_greedy(&ids, MAX_NEW_TOKENS, eos, |_| false)?;
        for ((p, ids), generated) in batch.iter().zip(generated) {
            let kept: Vec<u32> = generated.into_iter().filter(|&t| Some(t) != eos).collect();
            let text = tokenizer.decode(&kept)?;
            let ok = text.to_lowercase().contains(&p.value.to_lowercase());
            results.push((p.value.clone(), text, ok, ids.len()));
            progress(results.len(), total);
        }
    }
    let mut results = results.into_iter();
    let mut cells = Vec::new();
    for &length in &opts.lengths {
        for &depth in &opts.depths {
            let mut answers = Vec::new();
            let mut tokens_sum = 0usize;
            for (value, text, ok, n_tokens) in results.by_ref().take(opts.samples) {
                tokens_sum += n_tokens;
                answers.push((value, text, ok));
            }
            let n = answers.len().max(1) as f64;
            let accuracy = answers.iter().filter(|a| a.2).count() as f64 / n;
            cells.push(NiahCell {
                length,
                depth,
                accuracy,
                prompt_tokens_mean: tokens_sum as f64 / n,
                answers,
            });
        }
    }
    Ok(cells)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpt2() -> TextTokenizer {
        match tiktoken_rs::r50k_base() {
            Ok(b) => TextTokenizer::Gpt2(Box::new(b)),
            Err(e) => panic!("gpt2 tokenizer: {e}"),
        }
    }

    #[test]
    fn prompts_are_byte_identical_for_a_seed_and_fit_the_length() {
        let tok = gpt2();
        let a = make_prompt(&tok, 300, 0.5, 1, 7).unwrap();
        assert_eq!(a, make_prompt(&tok, 300, 0.5, 1, 7).unwrap());
        assert_ne!(a.prompt, make_prompt(&tok, 300, 0.5, 2, 7).unwrap().prompt);
        let n = tok.encode(&a.prompt).unwrap().len();
        assert!(n <= 300 && n > 250, "{n} tokens");
        assert!(a
            .prompt
            .contains(&format!("magic numbers for {} is: {}.", a.key, a.value)));
        assert_eq!(a.needle_at, (0.5 * a.sentences as f64).round() as usize);
        let first = make_prompt(&tok, 300, 0.0, 0, 7).unwrap();
        let context = first.prompt.lines().nth(1).unwrap();
        assert!(
            context.starts_with("One of the special magic numbers"),
            "{context}"
        );
        let last = make_prompt(&tok, 300, 1.0, 0, 7).unwrap();
        assert!(last
            .prompt
            .lines()
            .nth(1)
            .unwrap()
            .ends_with(&format!("{}.", last.value)));
    }
}
