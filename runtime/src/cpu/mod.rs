//! CPU reference backend (placeholder doc, completed below).

pub mod float;
pub mod ops;

#[cfg(test)]
pub(crate) mod gradcheck;
