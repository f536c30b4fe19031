//! Reading run directories: `plan.json` (a serialized Plan) and `metrics.jsonl`.
//!
//! The plan is read as JSON by field path rather than through the compiler's types, so
//! plans written by older or newer builds stay readable as long as the fields used here
//! keep their meaning; a missing field is an error that names it.

use crate::AnalysisError;
use serde::Serialize;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// One optimizer-step log line.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TrainPoint {
    pub step: u64,
    pub tokens: f64,
    pub loss: f64,
}

/// One validation line: `val_loss@{k}x` for each extrapolation factor k.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ValPoint {
    pub step: u64,
    pub tokens: f64,
    /// `(k, loss)` sorted by k.
    pub losses: Vec<(usize, f64)>,
    pub is_final: bool,
}

impl ValPoint {
    pub fn loss_at(&self, k: usize) -> Option<f64> {
        self.losses.iter().find(|(kk, _)| *kk == k).map(|(_, l)| *l)
    }
}

/// What the analysis needs from one run.
#[derive(Clone, Debug, Serialize)]
pub struct Run {
    pub dir: PathBuf,
    pub run_name: String,
    /// Architecture family (`plan.model.family`).
    pub family: String,
    /// ArchScale config name, e.g. `transformer_d8`.
    pub model: String,
    pub depth: usize,
    pub n_embd: usize,
    pub seq_len: usize,
    pub params_total: f64,
    pub params_non_embedding: f64,
    /// Token-rule parameter count `mult·d³` (`archscale_summary.n_target`), if the plan has it.
    pub n_target: Option<f64>,
    /// `6N + 12·L·n·T` per token (`estimates.flops_per_token_archscale`).
    pub flops_per_token_archscale: f64,
    /// Planned training tokens.
    pub planned_tokens: f64,
    /// Peak LR of the first optimizer group (before its multiplier).
    pub peak_lr: f64,
    pub train: Vec<TrainPoint>,
    pub val: Vec<ValPoint>,
}

impl Run {
    /// The last validation line that has `val_loss@1x` (the one marked final, if the run finished).
    pub fn final_val(&self) -> Option<&ValPoint> {
        self.val.iter().rev().find(|v| v.loss_at(1).is_some())
    }
    /// Whether the run logged its final validation.
    pub fn finished(&self) -> bool {
        self.val.iter().any(|v| v.is_final)
    }
    /// A short label for legends: family, depth and (when `with_lr`) peak LR.
    pub fn label(&self, with_lr: bool) -> String {
        if with_lr {
            format!(
                "{} d{} lr {}",
                self.family,
                self.depth,
                fmt_lr(self.peak_lr)
            )
        } else {
            format!("{} d{}", self.family, self.depth)
        }
    }
}

/// Three significant digits, scientific outside [1e-3, 1e5).
pub fn fmt_sig(v: f64, digits: usize) -> String {
    if v == 0.0 || !v.is_finite() {
        return format!("{v}");
    }
    let mag = v.abs().log10().floor() as i32;
    if (-3..5).contains(&mag) {
        let decimals = (digits as i32 - 1 - mag).max(0) as usize;
        format!("{v:.decimals$}")
    } else {
        let decimals = digits.saturating_sub(1);
        let m = v / 10f64.powi(mag);
        format!("{m:.decimals$}e{mag}")
    }
}

/// A learning rate as `4e-4`, `1.5e-3`.
pub fn fmt_lr(v: f64) -> String {
    if v <= 0.0 || !v.is_finite() {
        return format!("{v}");
    }
    let exp = v.log10().floor() as i32;
    let m = format!("{:.2}", v / 10f64.powi(exp));
    let m = m.trim_end_matches('0').trim_end_matches('.');
    format!("{m}e{exp}")
}

fn bad_run(path: &Path, reason: impl Into<String>) -> AnalysisError {
    AnalysisError::BadRun {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn field<'a>(v: &'a Value, path: &str, file: &Path) -> Result<&'a Value, AnalysisError> {
    let mut cur = v;
    for key in path.split('.') {
        cur = match key.parse::<usize>() {
            Ok(i) => cur.get(i),
            Err(_) => cur.get(key),
        }
        .ok_or_else(|| bad_run(file, format!("plan has no `{path}`")))?;
    }
    Ok(cur)
}

fn num(v: &Value, path: &str, file: &Path) -> Result<f64, AnalysisError> {
    field(v, path, file)?
        .as_f64()
        .ok_or_else(|| bad_run(file, format!("plan field `{path}` is not a number")))
}

fn text(v: &Value, path: &str, file: &Path) -> Result<String, AnalysisError> {
    Ok(field(v, path, file)?
        .as_str()
        .ok_or_else(|| bad_run(file, format!("plan field `{path}` is not a string")))?
        .to_string())
}

/// Parses `metrics.jsonl`. A last line without a trailing newline that does not parse is a
/// write in progress and is skipped; any other bad line is an error naming its number.
pub fn parse_metrics(
    text: &str,
    file: &Path,
) -> Result<(Vec<TrainPoint>, Vec<ValPoint>), AnalysisError> {
    let mut train = Vec::new();
    let mut val = Vec::new();
    let lines: Vec<&str> = text.split('\n').collect();
    for (i, line) in lines.iter().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let is_partial_tail = i + 1 == lines.len();
        let obj: Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(_) if is_partial_tail => continue,
            Err(e) => return Err(bad_run(file, format!("line {}: not JSON: {e}", i + 1))),
        };
        let Some(map) = obj.as_object() else {
            return Err(bad_run(
                file,
                format!("line {}: expected a JSON object", i + 1),
            ));
        };
        let step = map.get("step").and_then(Value::as_u64).unwrap_or(0);
        let tokens = map
            .get("tokens")
            .and_then(Value::as_f64)
            .unwrap_or(f64::NAN);
        let mut losses: Vec<(usize, f64)> = map
            .iter()
            .filter_map(|(k, v)| {
                let factor = k
                    .strip_prefix("val_loss@")?
                    .strip_suffix('x')?
                    .parse::<usize>()
                    .ok()?;
                Some((factor, v.as_f64()?))
            })
            .collect();
        if !losses.is_empty() {
            losses.sort_by_key(|(k, _)| *k);
            let is_final = map.get("final").and_then(Value::as_bool).unwrap_or(false);
            val.push(ValPoint {
                step,
                tokens,
                losses,
                is_final,
            });
        } else if let Some(loss) = map.get("loss").and_then(Value::as_f64) {
            train.push(TrainPoint { step, tokens, loss });
        }
    }
    Ok((train, val))
}

/// Resolves command-line paths to run directories: a directory with `plan.json` is a run;
/// one without is searched one level down (so `archscale fit out/` takes every run in `out/`).
pub fn expand_run_dirs(paths: &[PathBuf]) -> Result<Vec<PathBuf>, AnalysisError> {
    let mut out = Vec::new();
    for path in paths {
        if path.join("plan.json").is_file() {
            out.push(path.clone());
            continue;
        }
        let entries = std::fs::read_dir(path).map_err(|e| {
            bad_run(
                path,
                format!("not a run directory (no plan.json) and not readable: {e}"),
            )
        })?;
        let mut found: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.join("plan.json").is_file())
            .collect();
        if found.is_empty() {
            return Err(bad_run(path, "no plan.json here or in its subdirectories"));
        }
        found.sort();
        out.extend(found);
    }
    out.dedup();
    Ok(out)
}

/// Reads a run directory.
pub fn load_run(dir: &Path) -> Result<Run, AnalysisError> {
    let plan_path = dir.join("plan.json");
    let plan_text = std::fs::read_to_string(&plan_path)
        .map_err(|e| bad_run(&plan_path, format!("cannot read: {e}")))?;
    let plan: Value = serde_json::from_str(&plan_text)
        .map_err(|e| bad_run(&plan_path, format!("not JSON: {e}")))?;
    let metrics_path = dir.join("metrics.jsonl");
    let metrics_text = std::fs::read_to_string(&metrics_path)
        .map_err(|e| bad_run(&metrics_path, format!("cannot read: {e}")))?;
    let (train, val) = parse_metrics(&metrics_text, &metrics_path)?;
    let p = &plan_path;
    Ok(Run {
        dir: dir.to_path_buf(),
        run_name: text(&plan, "run_name", p)?,
        family: text(&plan, "model.family", p)?,
        model: text(&plan, "model.name", p)?,
        depth: num(&plan, "model.n_layer", p)? as usize,
        n_embd: num(&plan, "model.n_embd", p)? as usize,
        seq_len: num(&plan, "model.block_size", p)? as usize,
        params_total: num(&plan, "estimates.params_total", p)?,
        params_non_embedding: num(&plan, "estimates.params_non_embedding", p)?,
        n_target: plan
            .pointer("/archscale_summary/n_target")
            .and_then(Value::as_f64),
        flops_per_token_archscale: num(&plan, "estimates.flops_per_token_archscale", p)?,
        planned_tokens: num(&plan, "training.train_tokens", p)?,
        peak_lr: num(&plan, "optimizer.groups.0.peak_lr", p)?,
        train,
        val,
    })
}

/// The quantity on a scaling plot's x axis.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum XKind {
    /// `C = 6·N·D`: N the token-rule parameter count `mult·d³` (ArchScale's plot basis,
    /// `14.5·128²·d³` for Transformer++), D the tokens trained at the final validation.
    Flops,
    /// `D · (6N + 12·L·n·T)`: the plan's per-token estimate (all parameters, attention term).
    FlopsPalm,
    /// Tokens trained at the final validation.
    Tokens,
    /// Non-embedding parameters (`estimates.params_non_embedding`).
    Params,
}

impl XKind {
    pub fn axis_label(self) -> &'static str {
        match self {
            XKind::Flops => "Training FLOPs (6·N·D)",
            XKind::FlopsPalm => "Training FLOPs (D·(6N + 12·L·n·T))",
            XKind::Tokens => "Training tokens",
            XKind::Params => "Non-embedding parameters",
        }
    }
    /// How x is computed, for reports.
    pub fn describe(self) -> &'static str {
        match self {
            XKind::Flops => {
                "C = 6·N·D with N = the token-rule parameter count mult·d³ (plan archscale_summary.n_target; \
                 ArchScale's plot_flops_scaling.py basis) and D = tokens trained at the final validation"
            }
            XKind::FlopsPalm => {
                "C = D·(6N + 12·L·n·T) with the plan's estimates.flops_per_token_archscale (all parameters, \
                 attention term) and D = tokens trained at the final validation"
            }
            XKind::Tokens => "D = tokens trained at the final validation",
            XKind::Params => "N = non-embedding parameters (plan estimates.params_non_embedding)",
        }
    }
}

/// Tokens behind a run's final validation (the plan's budget if the line lacks a count).
pub fn trained_tokens(run: &Run) -> f64 {
    match run.final_val() {
        Some(v) if v.tokens.is_finite() && v.tokens > 0.0 => v.tokens,
        _ => run.planned_tokens,
    }
}

/// The x value of a run; `Flops` falls back to non-embedding N when the plan has no `n_target`.
pub fn x_value(run: &Run, kind: XKind) -> f64 {
    let d = trained_tokens(run);
    match kind {
        XKind::Flops => 6.0 * run.n_target.unwrap_or(run.params_non_embedding) * d,
        XKind::FlopsPalm => run.flops_per_token_archscale * d,
        XKind::Tokens => d,
        XKind::Params => run.params_non_embedding,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_lines_split_into_train_and_validation() {
        let text = r#"{"step":1,"tokens":512,"loss":6.2,"lr":0.001,"grad_norm":1.0,"tokens_per_s":10,"elapsed_s":1}
{"step":1,"tokens":512,"val_loss@1x":6.1,"val_ppl@1x":445.8,"val_loss@2x":6.3}

{"step":2,"tokens":1024,"val_loss@2x":5.9,"val_loss@1x":5.8,"final":true}
{"step":3,"tok"#;
        let (train, val) = parse_metrics(text, Path::new("m.jsonl")).unwrap();
        assert_eq!(
            train,
            vec![TrainPoint {
                step: 1,
                tokens: 512.0,
                loss: 6.2
            }]
        );
        assert_eq!(val.len(), 2);
        assert_eq!(val[1].losses, vec![(1, 5.8), (2, 5.9)]);
        assert!(val[1].is_final && !val[0].is_final);
    }

    #[test]
    fn a_bad_line_in_the_middle_is_an_error_with_its_number() {
        let err = parse_metrics(
            "{\"step\":1}\nnot json\n{\"step\":2}\n",
            Path::new("m.jsonl"),
        )
        .unwrap_err();
        assert!(err.to_string().contains("line 2"), "{err}");
    }

    #[test]
    fn significant_digit_formatting() {
        assert_eq!(fmt_sig(0.000123456, 3), "1.23e-4");
        assert_eq!(fmt_sig(4.56789, 3), "4.57");
        assert_eq!(fmt_sig(2.5e17, 3), "2.50e17");
        assert_eq!(fmt_sig(123.4, 3), "123");
        assert_eq!(fmt_lr(4e-4), "4e-4");
        assert_eq!(fmt_lr(0.0015), "1.5e-3");
    }
}
