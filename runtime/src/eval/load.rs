//! Finding and loading a model to evaluate: a checkpoint directory
//! (`<run>/checkpoints/step-N/`) or a run directory (its newest checkpoint).

use crate::checkpoint;
use crate::{Result, RuntimeError};
use archscale_compiler::Plan;
use std::path::{Path, PathBuf};

/// A plan with trained parameters.
pub struct LoadedModel {
    pub plan: Plan,
    pub params: Vec<Vec<f32>>,
    pub run_dir: PathBuf,
    pub checkpoint: PathBuf,
    /// Optimizer steps taken when the checkpoint was written.
    pub step: u64,
    /// Training tokens seen.
    pub tokens: u64,
}

fn bad(path: &Path, reason: impl Into<String>) -> RuntimeError {
    RuntimeError::BadInput {
        path: path.to_path_buf(),
        line: None,
        reason: reason.into(),
    }
}

/// Reads `<run_dir>/plan.json`.
pub fn read_plan(run_dir: &Path) -> Result<Plan> {
    let path = run_dir.join("plan.json");
    let text =
        std::fs::read_to_string(&path).map_err(|e| bad(&path, format!("cannot read: {e}")))?;
    serde_json::from_str(&text).map_err(|e| {
        bad(
            &path,
            format!("not a plan written by this version of archscale: {e}"),
        )
    })
}

/// Resolves `path` (a checkpoint or a run directory) to its run directory and checkpoint.
pub fn locate(path: &Path) -> Result<(PathBuf, PathBuf)> {
    if path.join("state.json").is_file() {
        let run_dir = path
            .parent()
            .and_then(Path::parent)
            .filter(|d| d.join("plan.json").is_file())
            .ok_or_else(|| {
                bad(
                    path,
                    "a checkpoint directory must sit in <run>/checkpoints/ next to <run>/plan.json",
                )
            })?;
        return Ok((run_dir.to_path_buf(), path.to_path_buf()));
    }
    if path.join("plan.json").is_file() {
        let ckpt = checkpoint::latest(path)
            .ok_or_else(|| bad(path, "the run has no complete checkpoint yet"))?;
        return Ok((path.to_path_buf(), ckpt));
    }
    Err(bad(
        path,
        "neither a checkpoint directory (state.json) nor a run directory (plan.json)",
    ))
}

/// Loads the plan and the checkpoint's parameters (checksums verified).
pub fn load_model(path: &Path) -> Result<LoadedModel> {
    let (run_dir, ckpt_dir) = locate(path)?;
    let plan = read_plan(&run_dir)?;
    let ckpt = checkpoint::load_with(&ckpt_dir, &plan, checkpoint::OptimizerRead::Nothing)?;
    Ok(LoadedModel {
        plan,
        params: ckpt.params,
        run_dir,
        checkpoint: ckpt_dir,
        step: ckpt.state.step,
        tokens: ckpt.state.tokens,
    })
}
