//! Multiple-choice likelihood scoring of local JSONL items `{"context", "choices", "label"}`
//! with lm-eval's conventions (`HFLM.loglikelihood`):
//!
//! * trailing whitespace of the context moves to the front of each continuation; the
//!   continuation tokens are `encode(context + continuation)[len(encode(context)):]`; an
//!   empty context is the end-of-text token;
//! * the score of a choice is the sum of log-softmax probabilities (over the full output)
//!   of its tokens; inputs longer than `max_length` keep their last `max_length` tokens;
//! * `acc`: the highest score is the label; `acc_norm`: score divided by the
//!   continuation's length in characters (lm-eval's byte-free `acc_norm`).
//!
//! Ties go to the lowest index, as `numpy.argmax`.

use super::decoder::{Decoder, Logits};
use super::eval_model::EvalModel;
use super::sampling::log_prob;
use super::tokenizer::TextTokenizer;
use crate::backend::Backend;
use crate::{Result, RuntimeError};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ChoiceItem {
    pub context: String,
    pub choices: Vec<String>,
    pub label: usize,
}

/// Reads and checks a JSONL file of items (blank lines skipped).
pub fn read_items(path: &Path) -> Result<Vec<ChoiceItem>> {
    let text = std::fs::read_to_string(path).map_err(|e| RuntimeError::BadInput {
        path: path.to_path_buf(),
        line: None,
        reason: format!("cannot read: {e}"),
    })?;
    let mut items = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |reason: String| RuntimeError::BadInput {
            path: path.to_path_buf(),
            line: Some(i + 1),
            reason,
        };
        let item: ChoiceItem = serde_json::from_str(line).map_err(|e| {
            bad(format!(
                "expected {{\"context\": str, \"choices\": [str], \"label\": int}}: {e}"
            ))
        })?;
        if item.choices.len() < 2 {
            return Err(bad("an item needs at least two choices".into()));
        }
        if item.label >= item.choices.len() {
            return Err(bad(format!(
                "label {} is not an index into {} choices",
                item.label,
                item.choices.len()
            )));
        }
        if item.choices.iter().any(|c| c.is_empty()) {
            return Err(bad("a choice is empty".into()));
        }
        items.push(item);
    }
    if items.is_empty() {
        return Err(RuntimeError::BadInput {
            path: path.to_path_buf(),
            line: None,
            reason: "no items".into(),
        });
    }
    Ok(items)
}

/// lm-eval's `_encode_pair`: (context tokens, continuation tokens).
pub fn encode_pair(
    tokenizer: &TextTokenizer,
    context: &str,
    continuation: &str,
) -> Result<(Vec<u32>, Vec<u32>)> {
    let trimmed = context.trim_end();
    let (context, continuation) = if trimmed.len() < context.len() {
        (
            trimmed.to_string(),
            format!("{}{continuation}", &context[trimmed.len()..]),
        )
    } else {
        (context.to_string(), continuation.to_string())
    };
    if context.is_empty() {
        let eot = tokenizer.eos().ok_or_else(|| {
            RuntimeError::Message("an empty context needs an end-of-text token".into())
        })?;
        return Ok((vec![eot], tokenizer.encode(&continuation)?));
    }
    let whole = tokenizer.encode(&format!("{context}{continuation}"))?;
    let ctx = tokenizer.encode(&context)?;
    let split = ctx.len().min(whole.len());
    Ok((ctx, whole[split..].to_vec()))
}

#[derive(Clone, Debug, Serialize)]
pub struct ItemScore {
    pub label: usize,
    pub loglikelihoods: Vec<f64>,
    pub pred: usize,
    pub pred_norm: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct ChoiceReport {
    pub items: usize,
    pub acc: f64,
    pub acc_stderr: f64,
    pub acc_norm: f64,
    pub acc_norm_stderr: f64,
    pub max_length: usize,
    pub scores: Vec<ItemScore>,
}

fn first_max(values: impl Iterator<Item = f64>) -> usize {
    let mut best = (0usize, f64::NEG_INFINITY);
    for (i, v) in values.enumerate() {
        if v > best.1 {
            best = (i, v);
        }
    }
    best.0
}

/// The row whose predictions score `cont` after `ctx`: `ctx ++ cont`, left-truncated so the
/// inputs (all but its last token) are at most `max_length`; at least one context token must
/// remain.
fn scored_row(ctx: &[u32], cont: &[u32], max_length: usize) -> Result<Vec<u32>> {
    let full: Vec<u32> = ctx.iter().chain(cont).copied().collect();
    let row = &full[full.len().saturating_sub(max_length + 1)..];
    if row.len() <= cont.len() {
        return Err(RuntimeError::Message(format!(
            "a continuation of {} tokens does not fit max_length {max_length}",
            cont.len()
        )));
    }
    Ok(row.to_vec())
}

/// `score` on a device backend: the continuation's summed cross-entropy from
/// [`Backend::eval_loss`]'s prefix means (the last `cont.len()` predictions of the row).
pub fn score_on_backend(
    backend: &mut dyn Backend,
    ctx: &[u32],
    cont: &[u32],
    max_length: usize,
) -> Result<f64> {
    if cont.is_empty() {
        return Ok(0.0);
    }
    let row = scored_row(ctx, cont, max_length)?;
    let (p, c) = (row.len() - 1, cont.len());
    if p == c {
        let m = backend.eval_loss(&row, 1, row.len(), &[p])?;
        return Ok(-(p as f64) * m[0]);
    }
    let m = backend.eval_loss(&row, 1, row.len(), &[p - c, p])?;
    Ok((p - c) as f64 * m[0] - p as f64 * m[1])
}

/// Sum of log-probabilities of `cont` after `ctx`, the input left-truncated to `max_length`.
fn score(
    decoder: &mut Decoder,
    ctx_state: Option<&(super::decoder::DecoderState, Vec<f32>)>,
    ctx: &[u32],
    cont: &[u32],
    max_length: usize,
) -> Result<f64> {
    if cont.is_empty() {
        return Ok(0.0);
    }
    let inputs_len = ctx.len() + cont.len() - 1;
    let (first_logits, rest) = if inputs_len <= max_length {
        let (state, last) = match ctx_state {
            Some(s) => (s.0.clone(), s.1.clone()),
            None => {
                decoder.reset();
                let last = decoder.feed(ctx, Logits::Last)?;
                (decoder.state().clone(), last)
            }
        };
        decoder.set_state(state);
        let rest = if cont.len() > 1 {
            decoder.feed(&cont[..cont.len() - 1], Logits::All)?
        } else {
            Vec::new()
        };
        (last, rest)
    } else {
        // Keep the last max_length inputs; the continuation's first prediction is at
        // input position len − cont.len().
        let row = scored_row(ctx, cont, max_length)?;
        let inputs = &row[..row.len() - 1];
        let keep_ctx = row.len() - cont.len();
        decoder.reset();
        let last = decoder.feed(&inputs[..keep_ctx], Logits::Last)?;
        let rest = if cont.len() > 1 {
            decoder.feed(&inputs[keep_ctx..], Logits::All)?
        } else {
            Vec::new()
        };
        (last, rest)
    };
    let v = decoder.padded_vocab_size();
    let mut total = log_prob(&first_logits, cont[0]);
    for (row, &t) in rest.chunks(v).zip(&cont[1..]) {
        total += log_prob(row, t);
    }
    Ok(total)
}

/// Log-likelihood of each choice `(context, continuation)` of one item.
fn score_item(
    decoder: &mut Decoder,
    pairs: &[(Vec<u32>, Vec<u32>)],
    max_length: usize,
) -> Result<Vec<f64>> {
    // All choices share the context tokens unless BPE merged across the boundary.
    let shared = pairs.iter().all(|p| p.0 == pairs[0].0);
    let cached = if !pairs.is_empty() && shared && pairs[0].0.len() <= max_length {
        decoder.reset();
        let last = decoder.feed(&pairs[0].0, Logits::Last)?;
        Some((decoder.state().clone(), last))
    } else {
        None
    };
    pairs
        .iter()
        .map(|(ctx, cont)| score(decoder, cached.as_ref(), ctx, cont, max_length))
        .collect()
}

/// Log-likelihoods of every item's choices, `batch_size` items scored together (each with
/// its own cache, rows on the rayon pool); results do not depend on `batch_size`.
pub fn score_items(
    decoder: &Decoder,
    items: &[Vec<(Vec<u32>, Vec<u32>)>],
    max_length: usize,
    batch_size: usize,
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<Vec<f64>>> {
    if batch_size == 0 {
        return Err(RuntimeError::Message(
            "batch size must be at least 1".into(),
        ));
    }
    let mut out = Vec::with_capacity(items.len());
    for batch in items.chunks(batch_size) {
        let lls: Vec<Vec<f64>> = batch
            .par_iter()
            .map(|pairs| score_item(&mut decoder.fork(), pairs, max_length))
            .collect::<Result<_>>()?;
        out.extend(lls);
        progress(out.len(), items.len());
    }
    Ok(out)
}

/// Scores every item with `model` (`batch_size` items at a time on the CPU decoder).
pub fn evaluate(
    model: &mut EvalModel,
    tokenizer: &TextTokenizer,
    items: &[ChoiceItem],
    max_length: usize,
    batch_size: usize,
    progress: impl FnMut(usize, usize),
) -> Result<ChoiceReport> {
    if !tokenizer.is_text() {
        return Err(RuntimeError::Message(
            "choice needs a text tokenizer; this model reads ids (synthetic corpus)".into(),
        ));
    }
    if max_length == 0 {
        return Err(RuntimeError::Message("max_length must be positive".into()));
    }
    let encoded: Vec<Vec<(Vec<u32>, Vec<u32>)>> = items
        .iter()
        .map(|item| {
            item.choices
                .iter()
                .map(|c| encode_pair(tokenizer, &item.context, c))
                .collect::<Result<_>>()
        })
        .collect::<Result<_>>()?;
    let all_lls = model.score_choices(&encoded, max_length, batch_size, progress)?;
    let mut scores = Vec::with_capacity(items.len());
    for (item, lls) in items.iter().zip(all_lls) {
        let lens: Vec<f64> = item
            .choices
            .iter()
            .map(|c| c.chars().count() as f64)
            .collect();
        let pred = first_max(lls.iter().copied());
        let pred_norm = first_max(lls.iter().zip(&lens).map(|(l, n)| l / n));
        scores.push(ItemScore {
            label: item.label,
            loglikelihoods: lls,
            pred,
            pred_norm,
        });
    }
    let n = scores.len() as f64;
    let acc = scores.iter().filter(|s| s.pred == s.label).count() as f64 / n;
    let acc_norm = scores.iter().filter(|s| s.pred_norm == s.label).count() as f64 / n;
    // lm-eval's stderr of a mean of 0/1 values (sample std / sqrt(n)).
    let stderr = |p: f64| {
        if n > 1.0 {
            (p * (1.0 - p) * n / (n - 1.0) / n).sqrt()
        } else {
            f64::NAN
        }
    };
    Ok(ChoiceReport {
        items: scores.len(),
        acc,
        acc_stderr: stderr(acc),
        acc_norm,
        acc_norm_stderr: stderr(acc_norm),
        max_length,
        scores,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_pair_moves_trailing_space_to_the_continuation() {
        let tok = TextTokenizer::Gpt2(Box::new(tiktoken_rs::r50k_base().unwrap()));
        let (ctx, cont) = encode_pair(&tok, "The capital of France is ", "Paris").unwrap();
        assert_eq!(tok.decode(&ctx).unwrap(), "The capital of France is");
        assert_eq!(tok.decode(&cont).unwrap(), " Paris");
        let (ctx, _) = encode_pair(&tok, "", "Paris").unwrap();
        assert_eq!(ctx, vec![crate::eval::tokenizer::GPT2_EOT]);
    }

    #[test]
    fn bad_items_are_errors_with_line_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("items.jsonl");
        std::fs::write(&p, "{\"context\":\"a\",\"choices\":[\"b\",\"c\"],\"label\":0}\n{\"context\":\"a\",\"choices\":[\"b\"],\"label\":0}\n").unwrap();
        let e = read_items(&p).unwrap_err().to_string();
        assert!(e.contains(":2") && e.contains("two choices"), "{e}");
        std::fs::write(
            &p,
            "{\"context\":\"a\",\"choices\":[\"b\",\"c\"],\"label\":2}\n",
        )
        .unwrap();
        assert!(read_items(&p).is_err());
    }
}

#[cfg(test)]
mod score_tests {
    use super::*;
    use crate::eval::test_support::*;

    #[test]
    fn cached_truncated_and_fresh_scores_agree() {
        let spec = TinySpec::default();
        let plan = plan(model_config(&spec, 2, false), transformer_layers(2), vec![]);
        let params = noisy_params(&plan, 12);
        let mut dec = Decoder::new(&plan, &params).unwrap();
        let (ctx, cont) = (vec![3u32, 4, 5, 6, 7], vec![8u32, 9, 10]);
        let fresh = score(&mut dec, None, &ctx, &cont, 64).unwrap();
        dec.reset();
        let last = dec.feed(&ctx, Logits::Last).unwrap();
        let cached = (dec.state().clone(), last);
        let with_cache = score(&mut dec, Some(&cached), &ctx, &cont, 64).unwrap();
        assert!((fresh - with_cache).abs() < 1e-9, "{fresh} vs {with_cache}");
        // Truncation keeps the last max_length inputs: same as scoring the shortened context.
        let truncated = score(&mut dec, None, &ctx, &cont, 5).unwrap();
        let short = score(&mut dec, None, &ctx[2..], &cont, 64).unwrap();
        assert!((truncated - short).abs() < 1e-9, "{truncated} vs {short}");
        assert!(fresh < 0.0);
    }

    #[test]
    fn batched_scores_equal_one_at_a_time() {
        let spec = TinySpec::default();
        let plan = plan(
            model_config(&spec, 8, true),
            with_differential(hybrid_layers(spec.n_embd)),
            vec![],
        );
        let params = noisy_params(&plan, 13);
        let dec = Decoder::new(&plan, &params).unwrap();
        // Shared contexts, differing contexts, and one truncated by max_length 8.
        let items: Vec<Vec<(Vec<u32>, Vec<u32>)>> = (0..7u32)
            .map(|i| {
                let ctx: Vec<u32> = (0..3 + i).map(|t| (t * 5 + i) % 20).collect();
                let other: Vec<u32> = if i % 3 == 0 {
                    ctx[1..].to_vec()
                } else {
                    ctx.clone()
                };
                vec![(ctx, vec![i % 20, 7]), (other, vec![(i + 3) % 20])]
            })
            .collect();
        let mut serial = Vec::new();
        for pairs in &items {
            serial.push(score_item(&mut dec.fork(), pairs, 8).unwrap());
        }
        for batch in [1, 3, 7, 16] {
            let mut calls = 0;
            let got = score_items(&dec, &items, 8, batch, |_, _| calls += 1).unwrap();
            assert_eq!(got, serial, "batch size {batch}");
            assert_eq!(calls, items.len().div_ceil(batch));
        }
    }
}
