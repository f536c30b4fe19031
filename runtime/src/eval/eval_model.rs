//! What runs a checkpoint for the decoding evals: the CPU decoder (a cache per row, the rows in
//! parallel) or a device backend holding the checkpoint (no cache: one whole forward per new
//! token or per scored continuation; answers and continuations are a few tokens, so the
//! prompt's forward dominates, and the device's bf16 logits may break near-ties differently).

use super::choice;
use super::decoder::Decoder;
use super::sampling::{generate_greedy_batch, Sampler, SamplingOptions};
use crate::backend::Backend;
use crate::Result;

pub enum EvalModel<'d, 'p> {
    Cpu(&'d Decoder<'p>),
    Device {
        backend: &'d mut dyn Backend,
        /// Ids below this are eligible when decoding (the real vocabulary).
        vocab: usize,
    },
}

impl EvalModel<'_, '_> {
    /// `cpu decoder`, or the device backend's name (`cuda:0`).
    pub fn name(&self) -> String {
        match self {
            EvalModel::Cpu(_) => "cpu decoder".into(),
            EvalModel::Device { backend, .. } => backend.name(),
        }
    }

    /// Greedy continuations of `prompts`: up to `max_new` tokens each, stopping after
    /// `stop_id` or when `stop(generated)` says so (a stop id included), as
    /// [`super::sampling::generate`] with a greedy sampler.
    pub fn generate_greedy(
        &mut self,
        prompts: &[Vec<u32>],
        max_new: usize,
        stop_id: Option<u32>,
        stop: impl Fn(&[u32]) -> bool + Sync,
    ) -> Result<Vec<Vec<u32>>> {
        match self {
            EvalModel::Cpu(decoder) => {
                generate_greedy_batch(decoder, prompts, max_new, stop_id, stop)
            }
            EvalModel::Device { backend, vocab } => prompts
                .iter()
                .map(|prompt| {
                    let mut greedy = Sampler::new(SamplingOptions::greedy());
                    let mut row = prompt.clone();
                    let mut out = Vec::with_capacity(max_new);
                    while out.len() < max_new {
                        let next = greedy.pick(&backend.last_logits(&row)?, *vocab);
                        out.push(next);
                        row.push(next);
                        if Some(next) == stop_id || stop(&out) {
                            break;
                        }
                    }
                    Ok(out)
                })
                .collect(),
        }
    }

    /// Log-likelihood of every (context, continuation) pair of every item, the input
    /// left-truncated to `max_length` tokens (lm-eval's rule); `batch_size` items at a time on
    /// the CPU decoder (results do not depend on it), one pair after another on a device.
    pub fn score_choices(
        &mut self,
        items: &[Vec<(Vec<u32>, Vec<u32>)>],
        max_length: usize,
        batch_size: usize,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Vec<Vec<f64>>> {
        match self {
            EvalModel::Cpu(decoder) => {
                choice::score_items(decoder, items, max_length, batch_size, progress)
            }
            EvalModel::Device { backend, .. } => {
                let mut out = Vec::with_capacity(items.len());
                for pairs in items {
                    out.push(
                        pairs
                            .iter()
                            .map(|(ctx, cont)| {
                                choice::score_on_backend(&mut **backend, ctx, cont, max_length)
                            })
                            .collect::<Result<Vec<f64>>>()?,
                    );
                    progress(out.len(), items.len());
                }
                Ok(out)
            }
        }
    }
}
