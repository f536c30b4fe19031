//! Scaling studies: group runs, fit each group, and compare the fitted curves — which
//! group has the lowest predicted loss at each budget, and where curves cross.

use crate::fit::{fit_power_law, FitResult, FitSetup, PowerLaw};
use crate::runs::{x_value, Run, XKind};
use crate::AnalysisError;
use serde::Serialize;
use std::collections::BTreeMap;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupBy {
    /// One curve per architecture family (`plan.model.family`).
    Arch,
    /// One curve per model (family and size, `plan.model.name`): data-scaling studies.
    Model,
    /// One curve through every run.
    None,
}

/// A run as a point of a scaling curve.
#[derive(Clone, Debug, Serialize)]
pub struct Point {
    pub run: String,
    pub dir: String,
    pub x: f64,
    pub loss: f64,
    pub tokens: f64,
    pub peak_lr: f64,
    /// The run logged its final validation (otherwise its last validation is used).
    pub finished: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct GroupFit {
    pub group: String,
    /// Points used in the fit, by increasing x.
    pub points: Vec<Point>,
    /// Runs left out because another run of the same model and budget (an LR sweep) has a lower loss.
    pub superseded: Vec<Point>,
    pub fit: Option<FitResult>,
    /// Why there is no fit (too few points, solver failure).
    pub note: Option<String>,
}

/// A budget range over which one group's curve is lowest.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Segment {
    pub from: f64,
    pub to: f64,
    pub winner: String,
    /// The range lies (partly) beyond the largest observed x.
    pub extrapolated: bool,
}

/// Two fitted curves meet at `x`; below it `lower_before` has the lower loss, above it `lower_after`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Crossover {
    pub x: f64,
    pub loss: f64,
    pub lower_before: String,
    pub lower_after: String,
    pub extrapolated: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct Comparison {
    /// The budgets compared: from the smallest observed x to `extrapolate_decades` past the largest.
    pub from: f64,
    pub to: f64,
    pub max_observed: f64,
    pub segments: Vec<Segment>,
    pub crossovers: Vec<Crossover>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Study {
    pub x: XKind,
    pub x_description: &'static str,
    pub setup: FitSetup,
    pub groups: Vec<GroupFit>,
    /// Present when two or more groups have fits.
    pub comparison: Option<Comparison>,
}

pub struct StudyOptions {
    pub x: XKind,
    pub group_by: GroupBy,
    pub bootstrap: usize,
    pub seed: u64,
    pub extrapolate_decades: f64,
}

fn group_key(run: &Run, by: GroupBy) -> String {
    match by {
        GroupBy::Arch => run.family.clone(),
        GroupBy::Model => run.model.clone(),
        GroupBy::None => "all".to_string(),
    }
}

/// Fits every group of `runs` and compares the fits.
pub fn study(runs: &[Run], opts: &StudyOptions) -> Result<Study, AnalysisError> {
    let setup = match opts.x {
        XKind::Flops | XKind::FlopsPalm | XKind::Params => FitSetup::Compute,
        XKind::Tokens => FitSetup::Data,
    };
    let mut grouped: BTreeMap<String, Vec<&Run>> = BTreeMap::new();
    for run in runs {
        grouped
            .entry(group_key(run, opts.group_by))
            .or_default()
            .push(run);
    }
    let mut groups = Vec::new();
    for (name, members) in grouped {
        // Runs of the same model and budget differ only in hyperparameters: keep the best.
        let mut best: BTreeMap<(usize, usize, u64), Point> = BTreeMap::new();
        let mut superseded = Vec::new();
        for run in members {
            let Some(val) = run.final_val() else {
                return Err(AnalysisError::BadRun {
                    path: run.dir.join("metrics.jsonl"),
                    reason: "no validation line with val_loss@1x".into(),
                });
            };
            let loss = val.loss_at(1).unwrap_or(f64::NAN);
            let point = Point {
                run: run.run_name.clone(),
                dir: run.dir.display().to_string(),
                x: x_value(run, opts.x),
                loss,
                tokens: crate::runs::trained_tokens(run),
                peak_lr: run.peak_lr,
                finished: run.finished(),
            };
            let key = (run.depth, run.n_embd, point.tokens.round() as u64);
            match best.get(&key) {
                Some(prev) if prev.loss <= point.loss => superseded.push(point),
                Some(_) => {
                    if let Some(prev) = best.insert(key, point) {
                        superseded.push(prev);
                    }
                }
                None => {
                    best.insert(key, point);
                }
            }
        }
        let mut points: Vec<Point> = best.into_values().collect();
        points.sort_by(|a, b| a.x.total_cmp(&b.x));
        let xs: Vec<f64> = points.iter().map(|p| p.x).collect();
        let ys: Vec<f64> = points.iter().map(|p| p.loss).collect();
        let (fit, note) = if points.len() < 3 {
            (
                None,
                Some(format!(
                    "{} point(s): a fit of A, b, C needs at least 3",
                    points.len()
                )),
            )
        } else {
            match fit_power_law(&xs, &ys, setup, opts.bootstrap, opts.seed) {
                Ok(f) => (Some(f), None),
                Err(e) => (None, Some(e.to_string())),
            }
        };
        groups.push(GroupFit {
            group: name,
            points,
            superseded,
            fit,
            note,
        });
    }

    let fitted: Vec<(String, PowerLaw)> = groups
        .iter()
        .filter_map(|g| g.fit.as_ref().map(|f| (g.group.clone(), f.law)))
        .collect();
    let comparison = if fitted.len() >= 2 {
        let all_x = groups.iter().flat_map(|g| g.points.iter().map(|p| p.x));
        let lo = all_x.clone().fold(f64::INFINITY, f64::min);
        let hi = all_x.fold(0.0, f64::max);
        Some(compare(&fitted, lo, hi, opts.extrapolate_decades))
    } else {
        None
    };
    Ok(Study {
        x: opts.x,
        x_description: opts.x.describe(),
        setup,
        groups,
        comparison,
    })
}

/// Bisection on `ln x` for the root of `f(x) − g(x)` between `lo` and `hi` (a sign change).
fn meet(f: &PowerLaw, g: &PowerLaw, lo: f64, hi: f64) -> f64 {
    let diff = |x: f64| f.eval(x) - g.eval(x);
    let (mut a, mut b) = (lo.ln(), hi.ln());
    let fa = diff(lo);
    for _ in 0..200 {
        let m = 0.5 * (a + b);
        if (diff(m.exp()) > 0.0) == (fa > 0.0) {
            a = m;
        } else {
            b = m;
        }
    }
    (0.5 * (a + b)).exp()
}

const GRID: usize = 4000;

/// Compares fitted curves on `[lo, hi·10^extrapolate_decades]`.
pub fn compare(
    fits: &[(String, PowerLaw)],
    lo: f64,
    hi: f64,
    extrapolate_decades: f64,
) -> Comparison {
    let to = hi * 10f64.powf(extrapolate_decades.max(0.0));
    let grid: Vec<f64> = (0..GRID)
        .map(|i| (lo.ln() + (to.ln() - lo.ln()) * i as f64 / (GRID - 1) as f64).exp())
        .collect();
    let winner_at = |x: f64| {
        (0..fits.len())
            .min_by(|&i, &j| fits[i].1.eval(x).total_cmp(&fits[j].1.eval(x)))
            .unwrap_or(0)
    };

    let mut segments = Vec::new();
    let mut start = lo;
    let mut current = winner_at(lo);
    for w in grid.windows(2) {
        let next = winner_at(w[1]);
        if next != current {
            let x = meet(&fits[current].1, &fits[next].1, w[0], w[1]);
            segments.push(Segment {
                from: start,
                to: x,
                winner: fits[current].0.clone(),
                extrapolated: x > hi,
            });
            start = x;
            current = next;
        }
    }
    segments.push(Segment {
        from: start,
        to,
        winner: fits[current].0.clone(),
        extrapolated: to > hi,
    });

    let mut crossovers = Vec::new();
    for i in 0..fits.len() {
        for j in i + 1..fits.len() {
            let (f, g) = (&fits[i].1, &fits[j].1);
            for w in grid.windows(2) {
                let (d0, d1) = (f.eval(w[0]) - g.eval(w[0]), f.eval(w[1]) - g.eval(w[1]));
                if d0 != 0.0 && (d0 > 0.0) != (d1 > 0.0) {
                    let x = meet(f, g, w[0], w[1]);
                    let (before, after) = if d0 < 0.0 { (i, j) } else { (j, i) };
                    crossovers.push(Crossover {
                        x,
                        loss: f.eval(x),
                        lower_before: fits[before].0.clone(),
                        lower_after: fits[after].0.clone(),
                        extrapolated: x > hi,
                    });
                }
            }
        }
    }
    crossovers.sort_by(|a, b| a.x.total_cmp(&b.x));
    Comparison {
        from: lo,
        to,
        max_observed: hi,
        segments,
        crossovers,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_crossover_of_two_laws() {
        // Steeper law with a higher floor: loses at small budgets, wins at large ones.
        let a = PowerLaw {
            a: 30.0,
            b: 0.1,
            c: 1.5,
        };
        let b = PowerLaw {
            a: 300.0,
            b: 0.2,
            c: 1.6,
        };
        let cmp = compare(&[("a".into(), a), ("b".into(), b)], 1e10, 1e20, 0.0);
        assert_eq!(cmp.crossovers.len(), 1);
        let x = cmp.crossovers[0].x;
        assert!((a.eval(x) - b.eval(x)).abs() < 1e-9);
        assert_eq!(cmp.segments.len(), 2);
        let below = if a.eval(1e10) < b.eval(1e10) {
            "a"
        } else {
            "b"
        };
        assert_eq!(cmp.segments[0].winner, below);
        assert_eq!(cmp.crossovers[0].lower_before, below);
        assert!((cmp.segments[0].to - x).abs() / x < 1e-9);
    }

    #[test]
    fn no_crossover_when_one_law_dominates() {
        let a = PowerLaw {
            a: 10.0,
            b: 0.1,
            c: 1.0,
        };
        let b = PowerLaw {
            a: 20.0,
            b: 0.1,
            c: 1.2,
        };
        let cmp = compare(&[("a".into(), a), ("b".into(), b)], 1e12, 1e18, 2.0);
        assert!(cmp.crossovers.is_empty());
        assert_eq!(
            cmp.segments,
            vec![Segment {
                from: 1e12,
                to: 1e20,
                winner: "a".into(),
                extrapolated: true
            }]
        );
    }
}
