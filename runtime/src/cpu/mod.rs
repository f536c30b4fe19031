//! CPU reference backend (placeholder doc, completed below).

pub mod float;
pub mod init;
pub mod model;
pub mod ops;

pub use model::CpuModel;

#[cfg(test)]
pub(crate) mod gradcheck;
#[cfg(test)]
mod model_tests;
