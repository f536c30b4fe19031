//! `archscale plan FILE [--set k=v]... [--json] [--run NAME]`: compile an experiment
//! into one plan per run and show them, as tables (tera templates) or as JSON.

use archscale_compiler::plan::{
    Mixer, MlpKind, NormKind, OptimizerKind, Parametrization, Plan, Sharding,
};
use serde::Serialize;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct Args {
    /// Experiment file (TOML).
    pub file: PathBuf,
    /// Override a spec value, e.g. `--set base.lr=1e-3` or `--set depth=[8,12]` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Print `{"runs": [plan, ...]}` as JSON instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Show only the run with this name.
    #[arg(long = "run", value_name = "NAME")]
    pub run: Option<String>,
}

pub fn run(args: Args) -> miette::Result<ExitCode> {
    let experiment = match archscale_spec::load_experiment(&args.file, &args.set) {
        Ok(e) => e,
        Err(errors) => {
            eprint!("{}", errors.render());
            eprintln!("{errors}");
            return Ok(ExitCode::from(2));
        }
    };
    let mut plans = match archscale_compiler::plan_experiment(&experiment) {
        Ok(p) => p,
        Err(errors) => {
            eprint!("{}", errors.render());
            eprintln!("{errors}");
            return Ok(ExitCode::from(2));
        }
    };
    if let Some(name) = &args.run {
        match plans.iter().position(|p| &p.run_name == name) {
            Some(i) => plans = vec![plans.swap_remove(i)],
            None => {
                eprintln!(
                    "error: no run named `{name}` in {}; its runs are:",
                    args.file.display()
                );
                for p in &plans {
                    eprintln!("  {}", p.run_name);
                }
                return Ok(ExitCode::from(2));
            }
        }
    }
    let text = if args.json {
        let mut s = serde_json::to_string_pretty(&serde_json::json!({ "runs": plans }))
            .map_err(|e| miette::miette!("cannot serialise the plans: {e}"))?;
        s.push('\n');
        s
    } else {
        render_text(&plans, &args.file.display().to_string())?
    };
    let mut out = std::io::stdout().lock();
    // A closed pipe (`archscale plan ... | head`) is not an error worth reporting.
    let _ = out.write_all(text.as_bytes());
    Ok(ExitCode::SUCCESS)
}

const SWEEP_TEMPLATE: &str = r#"{{ file }}: {{ runs | length }} runs

{{ header }}
{% for r in rows %}{{ r }}
{% endfor %}
"#;

const RUN_TEMPLATE: &str = r#"== {{ r.run_name }} ==
model        {{ r.model }}
layers       {{ r.pattern }}
params       {{ r.params_total }} total, {{ r.params_non_embedding }} non-embedding, {{ r.tensors }} tensors
scaling      {{ r.parametrization }}: logit x{{ r.logit_scale }}, residual x{{ r.residual_scale }}, attention scale {{ r.attn_scale }}
optimizer    {% for g in r.groups %}{{ g }}{% if not loop.last %}
             {% endif %}{% endfor %}
             grad clip {{ r.grad_clip }}
tokens       {{ r.tokens }}
schedule     {{ r.schedule }}
batch        {{ r.batch }}
layout       {{ r.layout }}
data         {{ r.data }}
FLOPs/token  {{ r.flops }}
memory/GPU   {{ r.memory }}
             {{ r.verdict }}
"#;

#[derive(Serialize)]
struct RunView {
    run_name: String,
    model: String,
    pattern: String,
    params_total: String,
    params_non_embedding: String,
    tensors: usize,
    parametrization: String,
    logit_scale: String,
    residual_scale: String,
    attn_scale: String,
    groups: Vec<String>,
    grad_clip: String,
    tokens: String,
    schedule: String,
    batch: String,
    layout: String,
    data: String,
    flops: String,
    memory: String,
    verdict: String,
}

/// Tables for `plans`: one summary row per run first when there are several.
pub fn render_text(plans: &[Plan], file: &str) -> miette::Result<String> {
    let mut tera = tera::Tera::default();
    tera.add_raw_template("sweep", SWEEP_TEMPLATE)
        .map_err(tera_error)?;
    tera.add_raw_template("run", RUN_TEMPLATE)
        .map_err(tera_error)?;
    let mut out = String::new();
    if plans.len() > 1 {
        let mut ctx = tera::Context::new();
        let (header, rows) = sweep_rows(plans);
        ctx.insert("file", file);
        ctx.insert(
            "runs",
            &plans.iter().map(|p| &p.run_name).collect::<Vec<_>>(),
        );
        ctx.insert("header", &header);
        ctx.insert("rows", &rows);
        out.push_str(&tera.render("sweep", &ctx).map_err(tera_error)?);
    }
    for (i, plan) in plans.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        let mut ctx = tera::Context::new();
        ctx.insert("r", &run_view(plan));
        out.push_str(&tera.render("run", &ctx).map_err(tera_error)?);
    }
    Ok(out)
}

fn tera_error(e: tera::Error) -> miette::Report {
    use std::error::Error;
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        msg.push_str(&format!(": {s}"));
        source = s.source();
    }
    miette::miette!("plan template: {msg}")
}

fn sweep_rows(plans: &[Plan]) -> (String, Vec<String>) {
    let cells: Vec<[String; 10]> = plans
        .iter()
        .map(|p| {
            let m = &p.estimates.memory;
            [
                p.run_name.clone(),
                si(p.estimates.params_total as f64, ""),
                si(p.training.train_tokens, ""),
                format!(
                    "{:.4e}",
                    p.optimizer.groups.first().map_or(0.0, |g| g.peak_lr)
                ),
                group_int(p.training.max_steps),
                si(p.layout.batch_tokens as f64, ""),
                p.layout.gas.to_string(),
                si(p.estimates.flops_per_token_archscale, ""),
                gib(m.total_bytes),
                if m.fits { "yes".into() } else { "NO".into() },
            ]
        })
        .collect();
    let header = [
        "run",
        "params",
        "tokens",
        "peak lr",
        "steps",
        "batch",
        "gas",
        "FLOPs/tok",
        "mem/GPU",
        "fits",
    ];
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cols: Vec<&str>| {
        cols.iter()
            .enumerate()
            .map(|(i, c)| {
                if i == 0 {
                    format!("{c:<w$}", w = widths[i])
                } else {
                    format!("{c:>w$}", w = widths[i])
                }
            })
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let head = line(header.to_vec());
    let rows = cells
        .iter()
        .map(|r| line(r.iter().map(String::as_str).collect()))
        .collect();
    (head, rows)
}

/// `M S M S | M* A | G X G X`: one token per layer, `|` around the YOCO middle.
pub fn layer_pattern(plan: &Plan) -> String {
    let token = |m: &Mixer| -> String {
        match m {
            Mixer::Attention(a) => {
                let mut t = if a.kv_from.is_some() {
                    "X".to_string()
                } else if a.window.is_some() {
                    "S".to_string()
                } else {
                    "A".to_string()
                };
                if a.differential.is_some() {
                    t.push('d');
                }
                if a.exports_memory {
                    t.push('*');
                }
                t
            }
            Mixer::Mamba(m) => if m.export_memory { "M*" } else { "M" }.into(),
            Mixer::Mamba2 { export_memory } => if *export_memory { "M2*" } else { "M2" }.into(),
            Mixer::GatedDeltaNet { export_memory } => {
                if *export_memory { "D*" } else { "D" }.into()
            }
            Mixer::Gmu(_) => "G".into(),
        }
    };
    // The cross-decoder starts at the first consumer; the middle at the first layer it reads.
    let consumer = plan.layers.iter().position(|l| match &l.mixer {
        Mixer::Gmu(_) => true,
        Mixer::Attention(a) => a.kv_from.is_some(),
        _ => false,
    });
    let middle = plan
        .layers
        .iter()
        .filter_map(|l| match &l.mixer {
            Mixer::Gmu(g) => Some(g.memory_from),
            Mixer::Attention(a) => a.kv_from,
            _ => None,
        })
        .min();
    let mut out = String::new();
    for (i, layer) in plan.layers.iter().enumerate() {
        if i > 0 {
            out.push(' ');
            if Some(i) == middle || (Some(i) == consumer && middle != consumer) {
                out.push_str("| ");
            }
        }
        out.push_str(&token(&layer.mixer));
        if layer.mlp_exports_memory {
            out.push('+');
        }
    }
    out
}

fn run_view(p: &Plan) -> RunView {
    let m = &p.model;
    let l = &p.layout;
    let t = &p.training;
    let s = &p.schedule;
    let position = match m.rope_base {
        Some(b) => format!("RoPE base {}", trim_float(b)),
        None => "NoPE".into(),
    };
    let model = format!(
        "{}: {} layers, n_embd {}, {} heads / {} KV groups x {}, MLP {} ({}), vocab {}{}, {} eps {:e}, {}, {}",
        m.name,
        m.n_layer,
        m.n_embd,
        m.n_head,
        m.n_query_groups,
        m.head_size,
        m.intermediate_size,
        match m.mlp {
            MlpKind::Swiglu => "swiglu",
        },
        m.padded_vocab_size,
        if m.padded_vocab_size != m.vocab_size {
            format!(" (padded from {})", m.vocab_size)
        } else {
            String::new()
        },
        match m.norm {
            NormKind::RmsNorm => "rmsnorm",
            NormKind::LayerNorm => "layernorm",
        },
        m.norm_eps,
        position,
        if m.tied_embeddings { "tied embeddings" } else { "untied" },
    );
    let parametrization = match m.parametrization {
        Parametrization::Sp => "standard (sp)",
        Parametrization::Mup => "μP, width only (mup)",
        Parametrization::MupPlusPlus => "μP++ (mup++)",
    }
    .to_string();
    let groups = p
        .optimizer
        .groups
        .iter()
        .enumerate()
        .map(|(index, g)| {
            let members = p.params.iter().filter(|x| x.group == index);
            let (count, numel) = members.fold((0usize, 0u64), |(c, e), x| (c + 1, e + x.numel() as u64));
            let opt = match g.optimizer {
                OptimizerKind::AdamW => "AdamW",
                OptimizerKind::NAdam => "NAdam",
                OptimizerKind::Muon => "Muon",
            };
            let mult = g.lr_mult.map_or(String::new(), |x| format!(" x {}", sig(x)));
            let peak = g.peak_group_lr();
            let moments = match g.muon_beta {
                Some(b) => format!("momentum {b}"),
                None => format!("betas ({}, {}), eps {:e}", g.beta1, g.beta2, g.eps),
            };
            format!(
                "{:<8} {opt:<5} {count:>4} tensors {:>8}  lr {:.4e}{mult} = {:.4e}  wd {}  {moments}",
                g.name,
                si(numel as f64, ""),
                g.peak_lr,
                peak,
                g.weight_decay,
            )
        })
        .collect();
    let tokens = format!(
        "{} tokens ({}), {} per parameter",
        group_int(t.train_tokens as u64),
        if p.archscale_summary
            .get("train_tokens")
            .is_some_and(|v| v.is_f64())
        {
            "given"
        } else {
            "Chinchilla rule"
        },
        trim_float((t.train_tokens / p.estimates.params_total.max(1) as f64 * 10.0).round() / 10.0),
    );
    let warmup_steps = s.warmup_iters as f64 / l.gas.max(1) as f64;
    let schedule = format!(
        "{}{} decay to {}, warmup {} iters ({:.1} steps); {} iters = {} optimizer steps (micro-iterations per device)",
        format!("{:?}", s.decay).to_lowercase(),
        if s.wsd { " wsd (stable 5/7)," } else { "" },
        s.min_lr,
        group_int(s.warmup_iters),
        warmup_steps,
        group_int(s.max_iters),
        group_int(t.max_steps),
    );
    let batch = format!(
        "{} tokens/step = {} GPUs x micro {} x T {} x gas {}",
        group_int(l.batch_tokens),
        l.world,
        l.micro_batch,
        l.seq_len,
        l.gas
    );
    let sharding = match l.sharding {
        Sharding::DataParallel => "data parallel",
        Sharding::Zero1 => "ZeRO-1 (optimizer state sharded)",
        Sharding::Zero3 => "ZeRO-3 (params, grads, optimizer state sharded)",
        Sharding::HybridShard => "hybrid shard (ZeRO-3 within a node)",
    };
    let layout = format!(
        "{} node(s) x {} GPUs = {}, {}",
        l.nodes, l.gpus_per_node, l.world, sharding
    );
    let data = format!(
        "{} train / {} val source(s); block {}, val block {} x {}, {} chunks, seed {}; eval every {} steps ({} iters), save every {}",
        p.data.train.len(),
        p.data.val.len(),
        p.data.block_size,
        p.data.val_block_size,
        p.data.val_micro_batch,
        p.data.n_chunks,
        p.data.seed,
        t.eval_interval,
        t.eval_iters,
        t.save_interval,
    );
    let e = &p.estimates;
    let flops = format!(
        "{} (ArchScale 6N + 12LnT), {} (executed matmuls, causal/window-aware); run total {}",
        si(e.flops_per_token_archscale, "FLOP"),
        si(e.flops_per_token_exact, "FLOP"),
        si(e.flops_per_token_archscale * t.train_tokens, "FLOP"),
    );
    let mem = &e.memory;
    let memory = format!(
        "params {} + grads {} + optimizer {} + {} {} + activations and scratch {} = {}",
        gib(mem.params_bytes),
        gib(mem.grads_bytes),
        gib(mem.optimizer_bytes),
        // ZeRO-3 and hybrid shard gather each unit into slots instead of a bf16 copy
        match p.layout.sharding {
            Sharding::Zero3 | Sharding::HybridShard if p.layout.world > 1 => "gather slots",
            _ => "bf16 copy",
        },
        gib(mem.working_bytes),
        gib(mem.activations_bytes),
        gib(mem.total_bytes),
    );
    let verdict = format!(
        "{} the {} GPU",
        if mem.fits { "fits" } else { "DOES NOT FIT" },
        gib(mem.gpu_bytes)
    );
    RunView {
        run_name: p.run_name.clone(),
        model,
        pattern: layer_pattern(p),
        params_total: group_int(e.params_total),
        params_non_embedding: group_int(e.params_non_embedding),
        tensors: p.params.len(),
        parametrization,
        logit_scale: sig(m.logit_scale),
        residual_scale: sig(m.residual_scale),
        attn_scale: sig(m.attn_scale),
        groups,
        grad_clip: trim_float(p.optimizer.grad_clip),
        tokens,
        schedule,
        batch,
        layout,
        data,
        flops,
        memory,
        verdict,
    }
}

/// `1,234,567`.
fn group_int(x: u64) -> String {
    let s = x.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `190.3M`, `1.05G` (decimal prefixes).
fn si(x: f64, unit: &str) -> String {
    let prefixes = [
        (1e24, "Y"),
        (1e21, "Z"),
        (1e18, "E"),
        (1e15, "P"),
        (1e12, "T"),
        (1e9, "G"),
        (1e6, "M"),
        (1e3, "k"),
    ];
    for (scale, p) in prefixes {
        if x.abs() >= scale {
            let v = x / scale;
            let digits = if v >= 100.0 {
                1
            } else if v >= 10.0 {
                2
            } else {
                3
            };
            let space = if unit.is_empty() { "" } else { " " };
            return format!("{v:.digits$}{space}{p}{unit}");
        }
    }
    format!("{}{unit}", trim_float(x))
}

fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// Six significant digits, trailing zeros dropped: `1.333333`, `0.0883883`.
fn sig(x: f64) -> String {
    if x == 0.0 || !x.is_finite() {
        return trim_float(x);
    }
    let decimals = (5 - x.abs().log10().floor() as i32).clamp(0, 17) as usize;
    let s = format!("{x:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// Shortest float text without a trailing `.0` for integers.
fn trim_float(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{}", x as i64)
    } else {
        format!("{x}")
    }
}
