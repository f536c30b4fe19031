//! `archscale plot RUN_DIRS... [--out-dir DIR]`: loss against tokens for every run and,
//! when runs of one model differ only in peak LR, final loss against LR. SVG and PNG.

use archscale_analysis::plot::{save, Figure, LossCurve, ScalingSeries};
use archscale_analysis::runs::{expand_run_dirs, load_run, trained_tokens, Run};
use archscale_analysis::AnalysisError;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct Args {
    /// Run directories (holding plan.json and metrics.jsonl), or directories of runs.
    #[arg(required = true)]
    pub runs: Vec<PathBuf>,
    /// Where `loss_curves.{svg,png}` and `lr_sweep.{svg,png}` are written.
    #[arg(long, default_value = ".")]
    pub out_dir: PathBuf,
    /// Exponential moving average of the training loss, 0 (raw) to below 1.
    #[arg(long, default_value_t = 0.0)]
    pub smooth: f64,
    /// Title prefix of the figures.
    #[arg(long)]
    pub title: Option<String>,
}

fn exit_for(e: AnalysisError) -> miette::Result<ExitCode> {
    let input = e.is_input_error();
    eprintln!("{:?}", miette::Report::new(e));
    Ok(ExitCode::from(if input { 2 } else { 1 }))
}

/// `246k`, `1.97M`.
fn human(n: f64) -> String {
    if n >= 1e6 {
        format!("{:.3}M", n / 1e6)
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_string()
    } else if n >= 1e3 {
        format!("{:.0}k", n / 1e3)
    } else {
        format!("{n:.0}")
    }
}

/// Exponential moving average, debiased as Adam's moments (`v / (1 − αᵗ)`, `v₀ = 0`).
fn ema(points: &[(f64, f64)], alpha: f64) -> Vec<(f64, f64)> {
    let mut v = 0.0;
    let mut decay = 1.0;
    points
        .iter()
        .map(|&(x, y)| {
            v = alpha * v + (1.0 - alpha) * y;
            decay *= alpha;
            (x, v / (1.0 - decay))
        })
        .collect()
}

pub fn run(args: Args) -> miette::Result<ExitCode> {
    if !(0.0..1.0).contains(&args.smooth) {
        eprintln!("error: --smooth must be in [0, 1)");
        return Ok(ExitCode::from(2));
    }
    let dirs = match expand_run_dirs(&args.runs) {
        Ok(d) => d,
        Err(e) => return exit_for(e),
    };
    let mut runs: Vec<Run> = Vec::with_capacity(dirs.len());
    for dir in &dirs {
        match load_run(dir) {
            Ok(r) => runs.push(r),
            Err(e) => return exit_for(e),
        }
    }
    runs.sort_by(|a, b| {
        let key = |r: &Run| {
            (
                r.family.clone(),
                r.depth,
                trained_tokens(r) as u64,
                r.peak_lr.to_bits(),
            )
        };
        key(a).cmp(&key(b))
    });
    let prefix = args
        .title
        .clone()
        .map(|t| format!("{t}: "))
        .unwrap_or_default();

    // Runs that share a model and budget are an LR sweep: label them with their LR.
    let mut sweeps: BTreeMap<(String, usize, usize, u64), Vec<&Run>> = BTreeMap::new();
    for r in &runs {
        sweeps
            .entry((
                r.family.clone(),
                r.depth,
                r.n_embd,
                trained_tokens(r).round() as u64,
            ))
            .or_default()
            .push(r);
    }
    let lr_differs = sweeps.values().any(|v| {
        let mut lrs: Vec<u64> = v.iter().map(|r| r.peak_lr.to_bits()).collect();
        lrs.sort();
        lrs.dedup();
        lrs.len() > 1
    });

    // Runs of one model with different budgets get the budget in their label.
    let mut labels: Vec<String> = runs.iter().map(|r| r.label(lr_differs)).collect();
    let repeated = |l: &String, all: &[String]| all.iter().filter(|m| *m == l).count() > 1;
    let snapshot = labels.clone();
    for (label, r) in labels.iter_mut().zip(&runs) {
        if repeated(label, &snapshot) {
            label.push_str(&format!(", {} tokens", human(trained_tokens(r))));
        }
    }
    let curves: Vec<LossCurve> = runs
        .iter()
        .zip(labels)
        .map(|(r, label)| {
            let train: Vec<(f64, f64)> = r.train.iter().map(|p| (p.tokens, p.loss)).collect();
            LossCurve {
                label,
                train: if args.smooth > 0.0 {
                    ema(&train, args.smooth)
                } else {
                    train
                },
                val: r
                    .val
                    .iter()
                    .filter_map(|v| Some((v.tokens, v.loss_at(1)?)))
                    .collect(),
            }
        })
        .collect();
    if curves
        .iter()
        .all(|c| c.train.is_empty() && c.val.is_empty())
    {
        eprintln!("error: the runs have no logged losses to plot");
        return Ok(ExitCode::from(2));
    }
    let mut written = Vec::new();
    let figure = Figure::LossCurves {
        title: format!("{prefix}Loss vs tokens"),
        curves,
    };
    match save(&figure, &args.out_dir.join("loss_curves")) {
        Ok(p) => written.extend(p),
        Err(e) => return exit_for(e),
    }

    if lr_differs {
        let series: Vec<ScalingSeries> = sweeps
            .iter()
            .filter_map(|((family, depth, _, _), members)| {
                let points: Vec<(f64, f64)> = members
                    .iter()
                    .filter_map(|r| Some((r.peak_lr, r.final_val()?.loss_at(1)?)))
                    .collect();
                (points.len() >= 2).then(|| ScalingSeries {
                    label: format!("{family} d{depth}"),
                    points,
                    law: None,
                })
            })
            .collect();
        if !series.is_empty() {
            let figure = Figure::LrSweep {
                title: format!("{prefix}Final validation loss vs peak LR"),
                series,
            };
            match save(&figure, &args.out_dir.join("lr_sweep")) {
                Ok(p) => written.extend(p),
                Err(e) => return exit_for(e),
            }
        }
    } else {
        println!("no LR sweep: no two runs of the same model and budget differ in peak LR");
    }
    for p in written {
        println!("wrote {}", p.display());
    }
    Ok(ExitCode::SUCCESS)
}
