//! `archscale fit RUN_DIRS... [--x flops|flops-palm|tokens|params] [--group-by arch|none]`:
//! fit `L(x) = A·x^(−b) + C` to each group's final validation losses, compare the groups,
//! and draw the scaling figure (SVG + PNG).

use archscale_analysis::compare::{study, GroupBy, Study, StudyOptions};
use archscale_analysis::plot::{save, Figure, ScalingSeries};
use archscale_analysis::runs::{expand_run_dirs, fmt_sig, load_run, XKind};
use archscale_analysis::AnalysisError;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum XArg {
    /// 6·N·D, N = token-rule params (ArchScale's plot basis), D = tokens trained.
    Flops,
    /// D·(6N + 12·L·n·T), the plan's per-token FLOP estimate.
    FlopsPalm,
    /// Tokens trained.
    Tokens,
    /// Non-embedding parameters.
    Params,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum GroupArg {
    /// One curve per architecture family (plan.model.family).
    Arch,
    /// One curve per model (family and size, plan.model.name): data scaling.
    Model,
    /// One curve through all runs.
    None,
}

#[derive(clap::Args)]
pub struct Args {
    /// Run directories (holding plan.json and metrics.jsonl), or directories of runs.
    #[arg(required = true)]
    pub runs: Vec<PathBuf>,
    /// The budget on the x axis.
    #[arg(long, value_enum, default_value = "flops")]
    pub x: XArg,
    #[arg(long = "group-by", value_enum, default_value = "arch")]
    pub group_by: GroupArg,
    /// Bootstrap resamples for the 95% intervals (0: none).
    #[arg(long, default_value_t = 1000)]
    pub bootstrap: usize,
    /// Seed of the bootstrap.
    #[arg(long, default_value_t = 3407)]
    pub seed: u64,
    /// Compare the fitted curves up to this many decades past the largest observed budget.
    #[arg(long, default_value_t = 1.0)]
    pub extrapolate: f64,
    /// Figure path without extension; `.svg` and `.png` are written.
    #[arg(long, default_value = "scaling")]
    pub figure: PathBuf,
    /// Do not draw the figure.
    #[arg(long)]
    pub no_figure: bool,
    /// Figure title.
    #[arg(long)]
    pub title: Option<String>,
    /// Print the study as JSON instead of tables.
    #[arg(long)]
    pub json: bool,
}

fn exit_for(e: AnalysisError) -> miette::Result<ExitCode> {
    let input = e.is_input_error();
    eprintln!("{:?}", miette::Report::new(e));
    Ok(ExitCode::from(if input { 2 } else { 1 }))
}

pub fn run(args: Args) -> miette::Result<ExitCode> {
    let x = match args.x {
        XArg::Flops => XKind::Flops,
        XArg::FlopsPalm => XKind::FlopsPalm,
        XArg::Tokens => XKind::Tokens,
        XArg::Params => XKind::Params,
    };
    let group_by = match args.group_by {
        GroupArg::Arch => GroupBy::Arch,
        GroupArg::Model => GroupBy::Model,
        GroupArg::None => GroupBy::None,
    };
    if !(args.extrapolate.is_finite() && args.extrapolate >= 0.0) {
        eprintln!("error: --extrapolate must be a non-negative number of decades");
        return Ok(ExitCode::from(2));
    }
    let dirs = match expand_run_dirs(&args.runs) {
        Ok(d) => d,
        Err(e) => return exit_for(e),
    };
    let mut runs = Vec::with_capacity(dirs.len());
    for dir in &dirs {
        match load_run(dir) {
            Ok(r) => runs.push(r),
            Err(e) => return exit_for(e),
        }
    }
    if matches!(x, XKind::Flops) && runs.iter().any(|r| r.n_target.is_none()) {
        eprintln!("note: some plans lack archscale_summary.n_target; those runs use non-embedding parameters as N");
    }
    let opts = StudyOptions {
        x,
        group_by,
        bootstrap: args.bootstrap,
        seed: args.seed,
        extrapolate_decades: args.extrapolate,
    };
    let study = match study(&runs, &opts) {
        Ok(s) => s,
        Err(e) => return exit_for(e),
    };

    let mut figure_paths = Vec::new();
    if !args.no_figure {
        let series: Vec<ScalingSeries> = study
            .groups
            .iter()
            .map(|g| ScalingSeries {
                label: g.group.clone(),
                points: g.points.iter().map(|p| (p.x, p.loss)).collect(),
                law: g.fit.as_ref().map(|f| f.law),
            })
            .collect();
        let symbol = match x {
            XKind::Flops | XKind::FlopsPalm => "C",
            XKind::Tokens => "D",
            XKind::Params => "N",
        };
        let figure = Figure::Scaling {
            title: args
                .title
                .clone()
                .unwrap_or_else(|| "Scaling: final validation loss".to_string()),
            x_label: x.axis_label().to_string(),
            x_symbol: symbol.to_string(),
            series,
        };
        match save(&figure, &args.figure) {
            Ok(p) => figure_paths = p,
            Err(e) => return exit_for(e),
        }
    }

    let text = if args.json {
        let value = serde_json::json!({ "study": study, "figures": figure_paths });
        let mut s = serde_json::to_string_pretty(&value)
            .map_err(|e| miette::miette!("cannot serialise the study: {e}"))?;
        s.push('\n');
        s
    } else {
        let mut s = render(&study);
        for p in &figure_paths {
            s.push_str(&format!("wrote {}\n", p.display()));
        }
        s
    };
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
    Ok(ExitCode::SUCCESS)
}

fn interval(iv: Option<(f64, f64)>) -> String {
    match iv {
        Some((lo, hi)) => format!("[{}, {}]", fmt_sig(lo, 3), fmt_sig(hi, 3)),
        None => "-".to_string(),
    }
}

/// Left-aligned columns separated by two spaces.
fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(c, s)| format!("{s:<w$}", w = widths[c]))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

fn render(study: &Study) -> String {
    let mut out = format!("x: {}\n\n", study.x_description);
    let mut rows = vec![vec![
        "group",
        "run directory",
        "x",
        "val_loss@1x",
        "peak lr",
        "note",
    ]
    .into_iter()
    .map(String::from)
    .collect()];
    for g in &study.groups {
        for p in &g.points {
            rows.push(vec![
                g.group.clone(),
                p.dir.clone(),
                fmt_sig(p.x, 3),
                format!("{:.4}", p.loss),
                fmt_sig(p.peak_lr, 3),
                if p.finished {
                    String::new()
                } else {
                    "unfinished: last validation".into()
                },
            ]);
        }
        for p in &g.superseded {
            rows.push(vec![
                g.group.clone(),
                p.dir.clone(),
                fmt_sig(p.x, 3),
                format!("{:.4}", p.loss),
                fmt_sig(p.peak_lr, 3),
                "not fitted: same model and budget has a lower loss".into(),
            ]);
        }
    }
    out.push_str(&table(&rows));

    out.push_str("\nfits  L(x) = A·x^(−b) + C   (95% bootstrap intervals)\n");
    let mut rows = vec![
        vec!["group", "n", "A", "b", "C", "R²", "A 95%", "b 95%", "C 95%"]
            .into_iter()
            .map(String::from)
            .collect::<Vec<_>>(),
    ];
    let mut notes = Vec::new();
    for g in &study.groups {
        match &g.fit {
            Some(f) => {
                let iv = f.intervals.as_ref();
                rows.push(vec![
                    g.group.clone(),
                    f.points.to_string(),
                    fmt_sig(f.law.a, 4),
                    fmt_sig(f.law.b, 4),
                    fmt_sig(f.law.c, 4),
                    format!("{:.4}", f.r2),
                    interval(iv.map(|i| (i.a.lo, i.a.hi))),
                    interval(iv.map(|i| (i.b.lo, i.b.hi))),
                    interval(iv.map(|i| (i.c.lo, i.c.hi))),
                ]);
                if !f.at_bound.is_empty() {
                    notes.push(format!(
                        "{}: {} at a bound of ArchScale's box",
                        g.group,
                        f.at_bound.join(", ")
                    ));
                }
                if f.intervals.is_none() {
                    notes.push(format!(
                        "{}: no intervals ({} points: residuals carry no spread)",
                        g.group, f.points
                    ));
                }
            }
            None => {
                rows.push(vec![
                    g.group.clone(),
                    g.points.len().to_string(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                ]);
                if let Some(n) = &g.note {
                    notes.push(format!("{}: {n}", g.group));
                }
            }
        }
    }
    out.push_str(&table(&rows));
    for n in notes {
        out.push_str(&format!("  note: {n}\n"));
    }

    if let Some(cmp) = &study.comparison {
        out.push_str(&format!(
            "\nlowest predicted loss, x from {} to {} (observed up to {})\n",
            fmt_sig(cmp.from, 3),
            fmt_sig(cmp.to, 3),
            fmt_sig(cmp.max_observed, 3)
        ));
        let mut rows = vec![vec![
            "from".to_string(),
            "to".to_string(),
            "winner".to_string(),
            String::new(),
        ]];
        for s in &cmp.segments {
            rows.push(vec![
                fmt_sig(s.from, 3),
                fmt_sig(s.to, 3),
                s.winner.clone(),
                if s.extrapolated {
                    "(extrapolated)".into()
                } else {
                    String::new()
                },
            ]);
        }
        out.push_str(&table(&rows));
        if cmp.crossovers.is_empty() {
            out.push_str("no crossover in this range\n");
        }
        for c in &cmp.crossovers {
            out.push_str(&format!(
                "crossover at x = {} (loss {:.4}): {} is lower below, {} above{}\n",
                fmt_sig(c.x, 3),
                c.loss,
                c.lower_before,
                c.lower_after,
                if c.extrapolated {
                    " (extrapolated)"
                } else {
                    ""
                }
            ));
        }
    }
    out
}
