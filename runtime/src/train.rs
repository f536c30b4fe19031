//! The training loop: one orchestrating function, as ArchScale's `train()`.
//!
//! Counting follows ArchScale (hp-spec §9): `iter_num` counts per-device micro-iterations,
//! an optimizer step follows every `gas` of them, and the LR of a step is the schedule's
//! value at its last micro-iteration. A single process runs every rank of the plan's
//! world in turn, so a CPU run of an 8-GPU plan computes what the 8 GPUs would.
//! With a [`Collective`] (one process per GPU), this process computes only its own rank's
//! micro-batches and validation batches, the backend reduces gradients over ranks, and
//! rank 0 alone writes the run directory (metrics, events, plan.json, checkpoints); under
//! ZeRO every rank writes its own optimizer shard into the checkpoint.

use crate::checkpoint::{self, TrainState};
use crate::data::{TrainLoader, ValLoader};
use crate::optim::clip_coefficient;
use crate::{Backend, Result, RuntimeError};
use archscale_compiler::Plan;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// Where to continue from.
#[derive(Clone, Debug, PartialEq)]
pub enum Resume {
    /// Start fresh; an existing checkpoint in the run directory is an error.
    No,
    /// Continue from the newest checkpoint of the run directory, or start fresh if none.
    Auto,
    /// Continue from this checkpoint directory.
    From(PathBuf),
}

/// The host-side collective the loop needs when each rank is its own process (the backend
/// reduces gradients itself).
pub trait Collective {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// Sums `values` over all ranks, in place.
    fn sum(&self, values: &mut [f64]) -> Result<()>;
}

pub struct TrainOptions {
    /// Directory relative data paths and synthetic corpora resolve against.
    pub data_root: PathBuf,
    pub resume: Resume,
    /// Set by Ctrl-C: checkpoint at the next step boundary and return.
    pub stop: &'static AtomicBool,
    /// Stop after this many optimizer steps in this invocation (tests, benchmarks).
    pub max_steps_this_run: Option<u64>,
    /// Draw a progress bar (on a terminal).
    pub progress: bool,
    /// One process per rank (data parallel); `None`: this process runs every rank.
    pub collective: Option<Rc<dyn Collective>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TrainSummary {
    pub run_dir: PathBuf,
    pub steps: u64,
    pub first_loss: Option<f64>,
    pub last_loss: Option<f64>,
    pub last_val_loss: Option<f64>,
    pub tokens_per_s: f64,
    pub interrupted: bool,
}

/// The run directory of a plan: `<out_dir>/<run_name>`.
pub fn run_dir(plan: &Plan) -> PathBuf {
    Path::new(&plan.training.out_dir).join(&plan.run_name)
}

fn msg(s: impl Into<String>) -> RuntimeError {
    RuntimeError::Message(s.into())
}

fn io(context: String) -> impl FnOnce(std::io::Error) -> RuntimeError {
    move |source| RuntimeError::Io { context, source }
}

/// Appends lines to `metrics.jsonl` / `events.log`, flushed per line; ranks other than 0
/// hold a disabled log that writes nothing.
struct Log {
    metrics: Option<fs::File>,
    events: Option<fs::File>,
}

impl Log {
    fn open(dir: &Path) -> Result<Self> {
        let open = |name: &str| {
            let p = dir.join(name);
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(&p)
                .map_err(io(format!("opening {}", p.display())))
        };
        Ok(Self {
            metrics: Some(open("metrics.jsonl")?),
            events: Some(open("events.log")?),
        })
    }
    fn disabled() -> Self {
        Self {
            metrics: None,
            events: None,
        }
    }
    fn metric(&mut self, v: serde_json::Value) -> Result<()> {
        match &mut self.metrics {
            Some(f) => writeln!(f, "{v}").map_err(io("writing metrics.jsonl".into())),
            None => Ok(()),
        }
    }
    fn event(&mut self, text: &str) -> Result<()> {
        let Some(events) = &mut self.events else {
            return Ok(());
        };
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        writeln!(events, "[{secs}] {text}").map_err(io("writing events.log".into()))
    }
}

/// Keeps the metric lines before `step`, and the training line of `step` itself: a resumed
/// run re-runs (deterministically) everything after its checkpoint, validation at `step` included.
fn truncate_metrics(dir: &Path, step: u64) -> Result<()> {
    let path = dir.join("metrics.jsonl");
    let Ok(text) = fs::read_to_string(&path) else {
        return Ok(());
    };
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s < step || (s == step && !l.contains("val_loss")))
        })
        .map(|l| format!("{l}\n"))
        .collect();
    let tmp = dir.join("metrics.jsonl.tmp");
    fs::write(&tmp, kept).map_err(io(format!("writing {}", tmp.display())))?;
    fs::rename(&tmp, &path).map_err(io(format!("replacing {}", path.display())))
}

fn write_plan(dir: &Path, plan: &Plan) -> Result<()> {
    let text =
        serde_json::to_string_pretty(plan).map_err(|e| msg(format!("encoding plan.json: {e}")))?;
    let tmp = dir.join("plan.json.tmp");
    fs::write(&tmp, text).map_err(io(format!("writing {}", tmp.display())))?;
    fs::rename(&tmp, dir.join("plan.json"))
        .map_err(io(format!("writing {}", dir.join("plan.json").display())))
}

/// Validation loss at 1x..num_extrapol x the training context, averaged over ranks. With a
/// collective, each process evaluates its own rank's loader and the sums are combined.
fn validate(
    plan: &Plan,
    backend: &mut dyn Backend,
    val: &[ValLoader],
    collective: Option<&dyn Collective>,
) -> Result<Vec<f64>> {
    let t = plan.layout.seq_len;
    let prefixes: Vec<usize> = (1..=plan.training.num_extrapol).map(|k| k * t).collect();
    let rows = plan.data.val_micro_batch;
    let mut sums = vec![0.0; prefixes.len()];
    let mut count = 0usize;
    for loader in val {
        for batch in loader.batches(plan.training.eval_iters as usize, rows)? {
            let losses = backend.eval_loss(&batch, rows, plan.data.val_block_size, &prefixes)?;
            for (s, l) in sums.iter_mut().zip(losses) {
                *s += l;
            }
            count += 1;
        }
    }
    if let Some(c) = collective {
        let mut v: Vec<f64> = sums.clone();
        v.push(count as f64);
        c.sum(&mut v)?;
        count = v.pop().unwrap_or(0.0) as usize;
        sums = v;
    }
    if count == 0 {
        return Err(msg("validation data yielded no batches"));
    }
    Ok(sums.into_iter().map(|s| s / count as f64).collect())
}

/// A `metrics.jsonl` line: `val_loss@kx` and `val_ppl@kx` for k = 1..num_extrapol.
fn validation_record(step: u64, tokens: u64, losses: &[f64], last: bool) -> serde_json::Value {
    let mut rec = json!({ "step": step, "tokens": tokens });
    if last {
        rec["final"] = json!(true);
    }
    for (k, l) in losses.iter().enumerate() {
        rec[format!("val_loss@{}x", k + 1)] = json!(l);
        rec[format!("val_ppl@{}x", k + 1)] = json!(l.exp());
    }
    rec
}

/// Trains `plan` on `backend`, writing the run directory. Returns when the plan's steps are
/// done, `max_steps_this_run` is reached, or `stop` is set (after writing a checkpoint).
pub fn train(plan: &Plan, backend: &mut dyn Backend, opts: &TrainOptions) -> Result<TrainSummary> {
    let dir = run_dir(plan);
    let world = plan.layout.world;
    let gas = plan.layout.gas as u64;
    let micro = plan.layout.micro_batch;
    let max_steps = plan.training.max_steps;
    let collective = opts.collective.as_deref();
    if let Some(c) = collective {
        if c.world() != world {
            return Err(msg(format!(
                "{} processes, but the plan's world is {world}",
                c.world()
            )));
        }
    }
    // `lead` writes the run directory; `computes(r)`: this process runs rank r's batches.
    let rank = collective.map_or(0, |c| c.rank());
    let lead = rank == 0;
    let computes = |r: usize| collective.is_none() || r == rank;
    // checked before anything is written; the watchdog starts with the loop
    let watchdog_limit = match collective {
        Some(_) => crate::distributed::watchdog::timeout_from_env().map_err(msg)?,
        None => None,
    };

    let resume_from = match &opts.resume {
        Resume::No => {
            if let Some(existing) = checkpoint::latest(&dir) {
                return Err(RuntimeError::RunExists {
                    run_dir: dir.clone(),
                    checkpoint: existing,
                });
            }
            None
        }
        Resume::Auto => checkpoint::latest(&dir),
        Resume::From(p) => Some(p.clone()),
    };
    if lead {
        fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
    }

    // Rank 0 keeps every rank's loader (advancing the others without computing) so its
    // checkpoints hold all loader states; other ranks keep only their own.
    let loader_ranks: Vec<usize> = if lead {
        (0..world).collect()
    } else {
        vec![rank]
    };
    let mut loaders: Vec<TrainLoader> = loader_ranks
        .iter()
        .map(|&r| TrainLoader::new(plan, r, world, &opts.data_root))
        .collect::<Result<_>>()?;
    let val: Vec<ValLoader> = if collective.is_some() {
        vec![ValLoader::new(plan, rank, world, &opts.data_root)?]
    } else {
        (0..world)
            .map(|r| ValLoader::new(plan, r, world, &opts.data_root))
            .collect::<Result<_>>()?
    };

    let (mut step, mut tokens) = (0u64, 0u64);
    let mut resharded_from: Option<usize> = None;
    let mut own_shard_read = false;
    if let Some(ckpt_dir) = &resume_from {
        // a sharded backend reads only its own optimizer shard when the checkpoint was cut
        // the same way (same world and layout), else the whole state
        let own = backend.optimizer_shard_layout();
        let read = match &own {
            Some((ours, chunk)) => checkpoint::OptimizerRead::Shard {
                ours,
                chunk: *chunk,
            },
            None => checkpoint::OptimizerRead::All,
        };
        let ck = checkpoint::load_with(ckpt_dir, plan, read)?;
        backend.write_params(&ck.params)?;
        match &ck.optimizer_shard {
            Some(shard) => backend.write_optimizer_shard(shard)?,
            None => backend.write_optimizer_state(&ck.optimizer)?,
        }
        own_shard_read = ck.optimizer_shard.is_some();
        let old_world = ck.state.loaders.len();
        if old_world == world {
            for (loader, &r) in loaders.iter_mut().zip(&loader_ranks) {
                let state = serde_json::from_value(ck.state.loaders[r].clone()).map_err(|e| {
                    msg(format!(
                        "{}: data-loader state is invalid: {e}",
                        ckpt_dir.display()
                    ))
                })?;
                loader.restore(&state)?;
            }
        } else {
            // Another world size partitions the data differently: as ArchScale does on
            // resume, each rank replays its loader past the micro-batches already consumed.
            let skip = ck.state.step * gas;
            for loader in loaders.iter_mut() {
                loader.skip_rows(skip * micro as u64)?;
            }
            resharded_from = Some(old_world);
        }
        step = ck.state.step;
        tokens = ck.state.tokens;
        if lead {
            truncate_metrics(&dir, step)?;
        }
    }
    let mut log = if lead {
        write_plan(&dir, plan)?;
        Log::open(&dir)?
    } else {
        Log::disabled()
    };
    match &resume_from {
        Some(p) => {
            log.event(&format!(
                "resumed from {} at step {step}{}",
                p.display(),
                if own_shard_read {
                    " (each rank read its own optimizer shard)"
                } else {
                    ""
                }
            ))?;
            if let Some(old) = resharded_from {
                log.event(&format!(
                    "checkpoint written by {old} ranks, resumed on {world}: state re-sharded, data loaders replayed past {} micro-batches per rank",
                    step * gas
                ))?;
            }
        }
        None => log.event(&format!("started {} on {}", plan.run_name, backend.name()))?,
    }

    let last_step = match opts.max_steps_this_run {
        Some(n) => (step + n).min(max_steps),
        None => max_steps,
    };
    let pb = if opts.progress && lead {
        ProgressBar::new(max_steps)
    } else {
        ProgressBar::hidden()
    };
    pb.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} steps  {msg}  ETA {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb.set_position(step);

    // Every process calls `save`: a sharded optimizer state is written by each rank, and
    // ZeRO-3 parameters are gathered collectively. Returns the path on the lead rank.
    let save = |step: u64,
                tokens: u64,
                backend: &mut dyn Backend,
                loaders: &[TrainLoader]|
     -> Result<Option<PathBuf>> {
        let sharded = collective.is_some() && backend.optimizer_is_sharded();
        if !sharded && !lead {
            return Ok(None);
        }
        // Only rank 0 writes the parameters; others read them only when that is collective.
        let params = if lead || backend.read_params_is_collective() {
            backend.read_params()?
        } else {
            Vec::new()
        };
        let loader_states = loaders
            .iter()
            .map(|l| {
                serde_json::to_value(l.state())
                    .map_err(|e| msg(format!("encoding data-loader state: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut state = TrainState {
            format: 0,
            run_name: plan.run_name.clone(),
            step,
            iter_num: step * gas,
            tokens,
            optimizer_step: 0,
            loaders: loader_states,
            sha256: Default::default(),
        };
        if sharded {
            let (Some(c), Some(shard)) = (collective, backend.optimizer_shard()?) else {
                return Err(msg("sharded checkpoint: the backend returned no shard"));
            };
            let barrier = || -> Result<()> { c.sum(&mut [0.0]) };
            return checkpoint::save_sharded(
                &dir,
                plan,
                lead.then_some(&params[..]),
                &shard,
                state,
                &barrier,
            );
        }
        let optimizer = backend.read_optimizer_state()?;
        state.optimizer_step = optimizer.step;
        checkpoint::save(&dir, plan, &params, &optimizer, state).map(Some)
    };

    let started = Instant::now();
    let mut summary = TrainSummary {
        run_dir: dir.clone(),
        steps: step,
        first_loss: None,
        last_loss: None,
        last_val_loss: None,
        tokens_per_s: 0.0,
        interrupted: false,
    };
    // One process per rank: a peer that dies leaves this one in a collective forever.
    // Started here, after resuming (a loader replay can take long without a beat).
    let watchdog = watchdog_limit.map(|limit| {
        crate::distributed::watchdog::ProgressWatchdog::start(limit, move |idle| {
            eprintln!(
                "rank {rank}: no training progress for {} s; a peer rank has probably failed \
                 or hangs in a collective. Exiting (ARCHSCALE_COLLECTIVE_TIMEOUT sets the limit, 0 turns it off)",
                idle.as_secs()
            );
            std::process::exit(1);
        })
    });
    let beat = || {
        if let Some(w) = &watchdog {
            w.beat();
        }
    };
    let eval_due = |s: u64| {
        s == 0 || s.is_multiple_of(plan.training.eval_interval.max(1)) || s + 1 == max_steps
    };
    let (mut window_tokens, mut window_start) = (0u64, Instant::now());
    let mut tokens_this_run = 0u64;

    while step < last_step {
        if eval_due(step) {
            let losses = validate(plan, backend, &val, collective)?;
            if lead {
                log.metric(validation_record(step, tokens, &losses, false))?;
                pb.suspend(|| eprintln!("step {step:>6}  val_loss {:.4}", losses[0]));
            }
            summary.last_val_loss = losses.first().copied();
            beat();
        }

        // One optimizer step: gas micro-iterations on every rank.
        let grad_scale = 1.0 / (gas as f32 * world as f32);
        let mut loss_sum = 0.0;
        for m in 0..gas {
            backend.set_gradient_sync(m + 1 == gas);
            for (loader, &r) in loaders.iter_mut().zip(&loader_ranks) {
                let rows = loader.next_batch(micro)?;
                if computes(r) {
                    loss_sum += backend.forward_backward(&rows, micro, grad_scale)?;
                    beat();
                }
            }
        }
        // Every rank must agree on the loss and on stopping at this step.
        let mut stopping = opts.stop.load(Ordering::SeqCst);
        if let Some(c) = collective {
            let mut v = [loss_sum, if stopping { 1.0 } else { 0.0 }];
            c.sum(&mut v)?;
            loss_sum = v[0];
            stopping = v[1] > 0.0;
        }
        let loss = loss_sum / (gas as f64 * world as f64);
        let it = (step + 1) * gas - 1;
        let lrs: Vec<f64> = plan
            .optimizer
            .groups
            .iter()
            .map(|g| g.lr_at(&plan.schedule, it))
            .collect();
        let grad_norm = backend.grad_norm()?;
        if !loss.is_finite() || !grad_norm.is_finite() {
            let last = checkpoint::latest(&dir)
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "none".into());
            log.event(&format!(
                "stopped: non-finite loss {loss} / grad norm {grad_norm} at step {}",
                step + 1
            ))?;
            return Err(msg(format!(
                "training diverged at step {}: loss {loss}, grad norm {grad_norm}. Nothing was saved after the last good checkpoint ({last}); lower the learning rate or check the data",
                step + 1
            )));
        }
        backend.optimizer_step(&lrs, clip_coefficient(grad_norm, plan.optimizer.grad_clip))?;
        beat();
        step += 1;
        let step_tokens = plan.layout.batch_tokens;
        tokens += step_tokens;
        tokens_this_run += step_tokens;
        window_tokens += step_tokens;
        summary.first_loss.get_or_insert(loss);
        summary.last_loss = Some(loss);
        summary.steps = step;
        pb.set_position(step);

        if step % plan.training.log_interval.max(1) == 0 || step == last_step {
            let tps = window_tokens as f64 / window_start.elapsed().as_secs_f64().max(1e-9);
            let mut rec = json!({
                "step": step, "tokens": tokens, "loss": loss, "lr": lrs.first().copied().unwrap_or(0.0),
                "lrs": lrs, "grad_norm": grad_norm, "tokens_per_s": tps, "elapsed_s": started.elapsed().as_secs_f64(),
            });
            if let Some((peak, model_state)) = backend.device_memory() {
                rec["peak_mem_bytes"] = json!(peak);
                rec["model_state_bytes"] = json!(model_state);
            }
            log.metric(rec)?;
            pb.set_message(format!("loss {loss:.4}  {tps:.0} tok/s"));
            if !opts.progress && lead {
                eprintln!("step {step:>6}  loss {loss:.4}  lr {:.3e}  grad_norm {grad_norm:.3}  {tps:.0} tok/s", lrs[0]);
            }
            window_tokens = 0;
            window_start = Instant::now();
        }

        let save_due =
            step % plan.training.save_interval.max(1) == 0 || step == last_step || stopping;
        if save_due {
            if let Some(path) = save(step, tokens, backend, &loaders)? {
                log.event(&format!("checkpoint {}", path.display()))?;
            }
            beat();
        }
        if stopping {
            log.event(&format!("interrupted at step {step}"))?;
            pb.suspend(|| {
                eprintln!(
                    "interrupted: checkpoint written at step {step}; continue with --resume auto"
                )
            });
            summary.interrupted = true;
            break;
        }
    }
    if step >= max_steps && !summary.interrupted {
        let losses = validate(plan, backend, &val, collective)?;
        summary.last_val_loss = losses.first().copied();
        if lead {
            log.metric(validation_record(step, tokens, &losses, true))?;
            log.event(&format!("finished at step {step}"))?;
        }
    }
    pb.finish_and_clear();
    summary.tokens_per_s = tokens_this_run as f64 / started.elapsed().as_secs_f64().max(1e-9);
    Ok(summary)
}
