//! Packed token data: LITPKDS files, ArchScale's sampling order, the synthetic corpora
//! (token ids, and English-like text in byte tokens),
//! `archscale prepare`'s tokenization, and varlen document boundaries.

pub mod loader;
pub mod packed;
pub mod prepare;
pub mod rng;
pub mod synthetic;
pub mod synthetic_text;
pub mod varlen;

pub use loader::{LoaderState, SourceState, Split, TrainLoader, ValLoader};
pub use packed::{Dtype, FinalChunk, PackedFile, PackedWriter, WriteSummary};

#[cfg(test)]
mod tests;
