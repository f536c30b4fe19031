//! Phonebook (ArchScale `eval_phonebook.py`, arch-spec §5.2): a book of `"First Last:
//! dddddddddd"` entries, two example look-ups, then a name whose number the model must
//! complete; greedy decoding of ≤ 20 tokens, the text before the first newline, stripped,
//! must equal the number exactly.
//!
//! Protocol as ArchScale: book sizes `min, min + step, …, ≤ max` with
//! `step = ⌈(max + 1 − min)/num_eval⌉`; per size 4 measurements × `batches/4` batches ×
//! `batch_size` prompts; each batch's RNG is seeded with the decimal concatenation
//! `"{seed}{measurement}{size}{batch}"` (reduced mod 2⁶⁴). Reported per size: mean and
//! population std over the 4 measurements of the accuracy, and the mean prompt length.
//!
//! Differences (deliberate): names come from built-in census lists and a ChaCha8 stream
//! rather than the `names` package and Python's `random` (so prompts differ from
//! ArchScale's in content, not in form); names are distinct within a book; prompts run one
//! at a time with a KV cache instead of left-padded batches with full recompute (same
//! result for exact attention; no padding).

use super::eval_model::EvalModel;
use super::names::{FIRST, LAST};
use super::tokenizer::TextTokenizer;
use crate::{Result, RuntimeError};
use rand::seq::index::sample;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

pub const MEASUREMENTS: usize = 4;
pub const MAX_NEW_TOKENS: usize = 20;

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PhonebookPrompt {
    pub prompt: String,
    /// The ten digits expected.
    pub label: String,
}

/// The seed of batch `batch` of measurement `measurement` for book size `size`.
pub fn batch_seed(seed: u64, measurement: usize, size: usize, batch: usize) -> u64 {
    let digits = format!("{seed}{measurement}{size}{batch}");
    digits.bytes().fold(0u64, |acc, b| {
        acc.wrapping_mul(10).wrapping_add((b - b'0') as u64)
    })
}

/// `"First Last: dddddddddd"` for `n` distinct names, first digit in 6..=9.
fn book(rng: &mut ChaCha8Rng, n: usize) -> Vec<(String, String)> {
    sample(rng, FIRST.len() * LAST.len(), n)
        .into_iter()
        .map(|i| {
            let name = format!("{} {}", FIRST[i / LAST.len()], LAST[i % LAST.len()]);
            let mut number = String::with_capacity(10);
            number.push(char::from(b'0' + rng.gen_range(6..=9u8)));
            for _ in 0..9 {
                number.push(char::from(b'0' + rng.gen_range(0..=9u8)));
            }
            (name, number)
        })
        .collect()
}

/// One prompt for a book of `size` entries: the book, two example entries, then `Name:`.
pub fn make_prompt(rng: &mut ChaCha8Rng, size: usize) -> Result<PhonebookPrompt> {
    if size < 3 {
        return Err(RuntimeError::Message(format!(
            "a phonebook needs at least 3 entries, got {size}"
        )));
    }
    if size > FIRST.len() * LAST.len() {
        return Err(RuntimeError::Message(format!(
            "books are limited to {} entries",
            FIRST.len() * LAST.len()
        )));
    }
    let entries = book(rng, size);
    let picks = sample(rng, size, 3).into_vec();
    let line = |i: usize| format!("{}: {}", entries[i].0, entries[i].1);
    let body: Vec<String> = (0..size).map(line).collect();
    let prompt = format!(
        "{}\n\n{}\n{}\n\n{}:",
        body.join("\n"),
        line(picks[0]),
        line(picks[1]),
        entries[picks[2]].0
    );
    Ok(PhonebookPrompt {
        prompt,
        label: entries[picks[2]].1.clone(),
    })
}

/// The prompts of one batch.
pub fn batch_prompts(
    seed: u64,
    measurement: usize,
    size: usize,
    batch: usize,
    batch_size: usize,
) -> Result<Vec<PhonebookPrompt>> {
    let mut rng = ChaCha8Rng::seed_from_u64(batch_seed(seed, measurement, size, batch));
    (0..batch_size)
        .map(|_| make_prompt(&mut rng, size))
        .collect()
}

#[derive(Clone, Debug, Serialize)]
pub struct PhonebookOptions {
    pub min_size: usize,
    pub max_size: usize,
    pub num_eval: usize,
    /// Batches per size (split over the 4 measurements; ArchScale's default 8).
    pub batches: usize,
    pub batch_size: usize,
    pub seed: u64,
}

impl Default for PhonebookOptions {
    fn default() -> Self {
        PhonebookOptions {
            min_size: 480,
            max_size: 480,
            num_eval: 1,
            batches: 8,
            batch_size: 4,
            seed: 42,
        }
    }
}

impl PhonebookOptions {
    /// Book sizes (`numpy.arange(min, max + 1, ⌈(max + 1 − min)/num_eval⌉)`).
    pub fn sizes(&self) -> Result<Vec<usize>> {
        if self.min_size > self.max_size || self.num_eval == 0 {
            return Err(RuntimeError::Message(
                "phonebook sizes need min ≤ max and num_eval ≥ 1".into(),
            ));
        }
        let step = (self.max_size + 1 - self.min_size)
            .div_ceil(self.num_eval)
            .max(1);
        Ok((self.min_size..=self.max_size).step_by(step).collect())
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct PhonebookSample {
    pub measurement: usize,
    pub batch: usize,
    pub label: String,
    pub answer: String,
    pub correct: bool,
    pub prompt_tokens: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct PhonebookSize {
    pub size: usize,
    pub accuracy_mean: f64,
    pub accuracy_std: f64,
    pub prompt_tokens_mean: f64,
    pub samples: Vec<PhonebookSample>,
}

fn require_text(tokenizer: &TextTokenizer) -> Result<()> {
    if tokenizer.is_text() {
        return Ok(());
    }
    Err(RuntimeError::Message(
        "phonebook needs a text tokenizer; this model reads ids (synthetic corpus)".into(),
    ))
}

/// One batch of prompts the protocol decodes together.
struct PromptBatch {
    size: usize,
    measurement: usize,
    batch: usize,
    prompts: Vec<PhonebookPrompt>,
}

/// Every batch of prompts the protocol decodes, in order.
fn prompt_batches(opts: &PhonebookOptions) -> Result<Vec<PromptBatch>> {
    let per_measurement = (opts.batches / MEASUREMENTS).max(1);
    let mut out = Vec::new();
    for size in opts.sizes()? {
        for measurement in 0..MEASUREMENTS {
            for batch in 0..per_measurement {
                let prompts = batch_prompts(opts.seed, measurement, size, batch, opts.batch_size)?;
                out.push(PromptBatch {
                    size,
                    measurement,
                    batch,
                    prompts,
                });
            }
        }
    }
    Ok(out)
}

/// Tokens of the longest prompt [`evaluate`] decodes with `opts` (a device decoder is sized
/// for it).
pub fn longest_prompt(tokenizer: &TextTokenizer, opts: &PhonebookOptions) -> Result<usize> {
    require_text(tokenizer)?;
    let mut longest = 0;
    for batch in prompt_batches(opts)? {
        for p in batch.prompts {
            longest = longest.max(tokenizer.encode(&p.prompt)?.len());
        }
    }
    Ok(longest)
}

/// Runs the protocol, each batch of prompts decoded together; `progress` is called after
/// each prompt.
pub fn evaluate(
    model: &mut EvalModel,
    tokenizer: &TextTokenizer,
    opts: &PhonebookOptions,
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<PhonebookSize>> {
    require_text(tokenizer)?;
    let batches = prompt_batches(opts)?;
    let total: usize = batches.iter().map(|x| x.prompts.len()).sum();
    let mut done = 0;
    let mut out = Vec::new();
    for size in opts.sizes()? {
        let mut samples = Vec::new();
        let mut accs = Vec::new();
        for m in 0..MEASUREMENTS {
            let mut correct = 0usize;
            let mut count = 0usize;
            for PromptBatch {
                batch: b, prompts, ..
            } in batches
                .iter()
                .filter(|x| x.size == size && x.measurement == m)
            {
                let b = *b;
                let ids: Vec<Vec<u32>> = prompts
                    .iter()
                    .map(|p| tokenizer.encode(&p.prompt))
                    .collect::<Result<_>>()?;
                let eos = tokenizer.eos();
                // The batch is decoded together, each prompt with its own cache.
                let generated = model.generate_greedy(&ids, MAX_NEW_TOKENS, eos, |g| {
                    tokenizer
                        .decode(g)
                        .map(|t| t.contains('\n'))
                        .unwrap_or(false)
                })?;
                for ((p, ids), generated) in prompts.iter().zip(&ids).zip(generated) {
                    let kept: Vec<u32> = generated
                        .iter()
                        .copied()
                        .filter(|&t| Some(t) != eos)
                        .collect();
                    let text = tokenizer.decode(&kept)?;
                    let answer = text.split('\n').next().unwrap_or("").trim().to_string();
                    let ok = answer == p.label;
                    correct += usize::from(ok);
                    count += 1;
                    samples.push(PhonebookSample {
                        measurement: m,
                        batch: b,
                        label: p.label.clone(),
                        answer,
                        correct: ok,
                        prompt_tokens: ids.len(),
                    });
                    done += 1;
                    progress(done, total);
                }
            }
            accs.push(correct as f64 / count.max(1) as f64);
        }
        let mean = accs.iter().sum::<f64>() / accs.len() as f64;
        let std = (accs.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / accs.len() as f64).sqrt();
        let tokens_mean = samples.iter().map(|s| s.prompt_tokens as f64).sum::<f64>()
            / samples.len().max(1) as f64;
        out.push(PhonebookSize {
            size,
            accuracy_mean: mean,
            accuracy_std: std,
            prompt_tokens_mean: tokens_mean,
            samples,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_are_byte_identical_for_a_seed_and_well_formed() {
        let a = batch_prompts(42, 1, 20, 0, 3).unwrap();
        let b = batch_prompts(42, 1, 20, 0, 3).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, batch_prompts(43, 1, 20, 0, 3).unwrap());
        let p = &a[0];
        let (book, tail) = p.prompt.split_once("\n\n").unwrap();
        assert_eq!(book.lines().count(), 20);
        for line in book.lines() {
            let (name, number) = line.split_once(": ").unwrap();
            assert_eq!(name.split(' ').count(), 2);
            assert_eq!(number.len(), 10);
            assert!(
                number.starts_with(['6', '7', '8', '9'])
                    && number.bytes().all(|c| c.is_ascii_digit())
            );
        }
        let (examples, query) = tail.split_once("\n\n").unwrap();
        assert_eq!(examples.lines().count(), 2);
        assert!(examples.lines().all(|l| book.lines().any(|b| b == l)));
        let name = query.strip_suffix(':').unwrap();
        assert!(book.lines().any(|l| l == format!("{name}: {}", p.label)));
    }

    #[test]
    fn seeds_and_sizes_follow_archscale() {
        assert_eq!(batch_seed(42, 3, 480, 1), 4234801);
        let o = PhonebookOptions {
            min_size: 20,
            max_size: 100,
            num_eval: 3,
            ..Default::default()
        };
        assert_eq!(o.sizes().unwrap(), vec![20, 47, 74]);
        assert_eq!(PhonebookOptions::default().sizes().unwrap(), vec![480]);
    }
}
