//! Evaluation of trained checkpoints: validation loss/perplexity at 1×..k× the training
//! context, Phonebook (arch-spec §5.2), single-needle retrieval (RULER `niah_single` style),
//! multiple-choice likelihood scoring (lm-eval conventions), on the CPU decoder (the decoding
//! path they share with `archscale generate`) or a device backend (`EvalModel`); plus export
//! for the PyTorch stack.

pub mod choice;
pub mod decoder;
pub mod eval_model;
pub mod export;
pub mod load;
pub mod names;
pub mod niah;
pub mod phonebook;
pub mod sampling;
pub mod tokenizer;
pub mod val;

pub use decoder::{Decoder, DecoderState, Logits};
pub use eval_model::EvalModel;
pub use load::{load_model, LoadedModel};
pub use sampling::{Sampler, SamplingOptions};
pub use tokenizer::{TextTokenizer, TokenizerChoice};

#[cfg(test)]
pub(crate) mod test_support;
#[cfg(test)]
mod tests;
