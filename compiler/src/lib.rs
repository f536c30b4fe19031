//! Compiles validated experiment specs into execution plans.
//!
//! `inputs` is what one run needs after the spec is parsed and expanded; `plan` is what
//! the runtime executes.

pub mod inputs;
pub mod plan;

pub use inputs::{ArchAtDepth, BaseHyperparameters, Cluster, OptimizerChoice, RunInputs, TokenMult};
pub use plan::*;
