//! Compiles validated experiment specs into execution plans.
//!
//! `inputs` is what one run needs after the spec is parsed and expanded; `plan` is what
//! the runtime executes; `compile` turns the first into the second.

pub mod compile;
pub mod estimates;
pub mod expand;
pub mod hparams;
pub mod inputs;
pub mod params;
pub mod plan;
pub mod pynum;
pub mod train_name;

pub use compile::{compile, CompileError};
pub use inputs::{ArchAtDepth, BaseHyperparameters, Cluster, OptimizerChoice, RunInputs, TokenMult};
pub use plan::*;
