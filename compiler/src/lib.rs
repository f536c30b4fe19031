//! Compiles validated experiment specs into execution plans.
//!
//! `inputs` is what one run needs after the spec is parsed and expanded; `plan` is what
//! the runtime executes; `compile` turns the first into the second, and `plan_experiment`
//! does it for every run of an experiment.

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
pub use inputs::{
    ArchAtDepth, BaseHyperparameters, Cluster, OptimizerChoice, RunInputs, TokenMult,
};
pub use plan::*;

use archscale_spec::{Experiment, SpecErrors};

/// Expands the experiment and compiles every run, in sweep order. Every run that fails
/// reports an error at the spec key it concerns (with that member's span); nothing is
/// returned unless all runs compile.
pub fn plan_experiment(experiment: &Experiment) -> Result<Vec<Plan>, SpecErrors> {
    let inputs = expand::expand(experiment)?;
    let mut plans = Vec::with_capacity(inputs.len());
    let mut errors = SpecErrors::default();
    for (i, run) in inputs.iter().enumerate() {
        match compile(run) {
            Ok(plan) => plans.push(plan),
            Err(e) => {
                let err = match experiment.runs.get(i) {
                    Some(spec) => spec.error_at(&e.key, e.message.clone()),
                    None => experiment.error_at(&e.key, e.message.clone()),
                };
                errors.push(match e.help {
                    Some(h) => err.help(h),
                    None => err,
                });
            }
        }
    }
    if errors.is_empty() {
        Ok(plans)
    } else {
        errors.dedup();
        Err(errors)
    }
}
