//! Text <-> token ids for the evals and generation: the GPT-2 BPE (tiktoken `r50k_base`,
//! built in), a Hugging Face `tokenizer.json`, the byte tokenizer of the synthetic text
//! corpus (id = byte + 3, EOS 2), or plain ids for models of the synthetic id corpus (text
//! is a space-separated list of ids; ids decode as numbers).

use crate::data::synthetic_text::{decode_bytes, encode_bytes, TEXT_EOS};
use crate::{Result, RuntimeError};
use archscale_compiler::{DataSource, Plan};
use std::path::{Path, PathBuf};

/// What the user asked for on the command line.
#[derive(Clone, Debug, PartialEq)]
pub enum TokenizerChoice {
    /// From the plan: bytes for the synthetic text corpus, ids for the synthetic id corpus,
    /// GPT-2 for a 50257-token vocabulary.
    Auto,
    Gpt2,
    Bytes,
    Ids,
    HuggingFace(PathBuf),
}

impl TokenizerChoice {
    /// `auto`, `gpt2`, `bytes`, `ids`, or a path to a `tokenizer.json`.
    pub fn parse(s: &str) -> TokenizerChoice {
        match s {
            "auto" => TokenizerChoice::Auto,
            "gpt2" => TokenizerChoice::Gpt2,
            "bytes" => TokenizerChoice::Bytes,
            "ids" => TokenizerChoice::Ids,
            path => TokenizerChoice::HuggingFace(PathBuf::from(path)),
        }
    }
}

pub enum TextTokenizer {
    Gpt2(Box<tiktoken_rs::CoreBPE>),
    HuggingFace(Box<tokenizers::Tokenizer>),
    /// UTF-8 bytes, id = byte + 3 (the synthetic text corpus).
    Bytes,
    Ids,
}

/// GPT-2's `<|endoftext|>`.
pub const GPT2_EOT: u32 = 50256;

fn bad(msg: impl Into<String>) -> RuntimeError {
    RuntimeError::Message(msg.into())
}

impl TextTokenizer {
    pub fn load(choice: &TokenizerChoice, plan: &Plan) -> Result<TextTokenizer> {
        match choice {
            TokenizerChoice::Auto => {
                let sources = || plan.data.train.iter().chain(&plan.data.val);
                let text = sources().any(|s| matches!(s, DataSource::SyntheticText { .. }));
                let ids = sources().any(|s| matches!(s, DataSource::Synthetic { .. }));
                if text {
                    Ok(TextTokenizer::Bytes)
                } else if ids {
                    Ok(TextTokenizer::Ids)
                } else if plan.model.vocab_size == 50257 {
                    Self::load(&TokenizerChoice::Gpt2, plan)
                } else {
                    Err(bad(format!(
                        "cannot tell this model's tokenizer (vocabulary {}): pass --tokenizer gpt2|bytes|ids|PATH/tokenizer.json",
                        plan.model.vocab_size
                    )))
                }
            }
            TokenizerChoice::Gpt2 => tiktoken_rs::r50k_base()
                .map(|b| TextTokenizer::Gpt2(Box::new(b)))
                .map_err(|e| bad(format!("loading the built-in GPT-2 tokenizer: {e}"))),
            TokenizerChoice::Bytes => Ok(TextTokenizer::Bytes),
            TokenizerChoice::Ids => Ok(TextTokenizer::Ids),
            TokenizerChoice::HuggingFace(path) => Self::from_file(path),
        }
    }

    fn from_file(path: &Path) -> Result<TextTokenizer> {
        tokenizers::Tokenizer::from_file(path)
            .map(|t| TextTokenizer::HuggingFace(Box::new(t)))
            .map_err(|e| RuntimeError::BadInput {
                path: path.to_path_buf(),
                line: None,
                reason: format!("not a usable tokenizer.json: {e}"),
            })
    }

    pub fn name(&self) -> &'static str {
        match self {
            TextTokenizer::Gpt2(_) => "gpt2",
            TextTokenizer::HuggingFace(_) => "tokenizer.json",
            TextTokenizer::Bytes => "bytes",
            TextTokenizer::Ids => "ids",
        }
    }

    /// Whether text evals (Phonebook, NIAH, multiple choice) can run: ids are not text.
    pub fn is_text(&self) -> bool {
        !matches!(self, TextTokenizer::Ids)
    }

    /// Encodes without special tokens (special-token text is plain text).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match self {
            TextTokenizer::Gpt2(bpe) => Ok(bpe.encode_ordinary(text)),
            TextTokenizer::HuggingFace(t) => t
                .encode_fast(text, false)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| bad(format!("tokenizing: {e}"))),
            TextTokenizer::Bytes => {
                let mut ids = Vec::with_capacity(text.len());
                encode_bytes(text.as_bytes(), &mut ids);
                Ok(ids)
            }
            TextTokenizer::Ids => text
                .split_whitespace()
                .map(|w| {
                    w.parse::<u32>().map_err(|_| {
                        bad(format!(
                            "`{w}` is not a token id (this model reads ids: pass numbers)"
                        ))
                    })
                })
                .collect(),
        }
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        match self {
            TextTokenizer::Gpt2(bpe) => {
                // Ids past GPT-2's 50257 (vocabulary padding) have no text; the BPE would panic.
                if let Some(id) = ids.iter().find(|&&i| i > GPT2_EOT) {
                    return Err(bad(format!("token {id} is not a GPT-2 token")));
                }
                // Token boundaries may split UTF-8 sequences; show them lossily.
                let bytes: Vec<u8> = bpe
                    ._decode_native_and_split(ids.to_vec())
                    .flatten()
                    .collect();
                Ok(String::from_utf8_lossy(&bytes).into_owned())
            }
            TextTokenizer::HuggingFace(t) => t
                .decode(ids, false)
                .map_err(|e| bad(format!("decoding: {e}"))),
            // Token boundaries may split UTF-8 sequences; show them lossily.
            TextTokenizer::Bytes => Ok(String::from_utf8_lossy(&decode_bytes(ids)).into_owned()),
            TextTokenizer::Ids => Ok(ids
                .iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(" ")),
        }
    }

    /// The end-of-text id, if the tokenizer has one.
    pub fn eos(&self) -> Option<u32> {
        match self {
            TextTokenizer::Gpt2(_) => Some(GPT2_EOT),
            TextTokenizer::HuggingFace(t) => ["</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>"]
                .iter()
                .find_map(|s| t.token_to_id(s)),
            TextTokenizer::Bytes => Some(TEXT_EOS),
            TextTokenizer::Ids => None,
        }
    }
}
