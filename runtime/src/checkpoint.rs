//! Checkpoints: `checkpoints/step-NNNNNNNN/` holding `model.safetensors` (ArchScale
//! parameter names, f32), `optimizer.safetensors` and `state.json` (step counters, data
//! loader state, a SHA-256 of each tensor file).
//!
//! A checkpoint is written into `step-NNNNNNNN.partial/`, every file is synced, and the
//! directory is renamed into place; a process killed at any moment leaves the previous
//! checkpoint intact and never a half-written one under a final name.
//!
//! Under ZeRO the optimizer state is sharded: each rank writes its own
//! `optimizer.exp_avg.shard-0000r-of-0000W.bin` and `optimizer.exp_avg_sq.shard-…` (raw
//! little-endian f32), and `optimizer.<moment>.manifest.json` says where every tensor's
//! pieces lie, so any world size can load it. `model.safetensors` stays whole (rank 0
//! writes it), so eval and export read sharded and unsharded checkpoints alike.

use crate::distributed::manifest::{shard_file_name, Manifest};
use crate::{OptimizerShard, OptimizerState, Result, RuntimeError};
use archscale_compiler::plan::OptimizerKind;
use archscale_compiler::Plan;
use safetensors::tensor::{Dtype, TensorView};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

const FORMAT_VERSION: u32 = 1;
const MODEL_FILE: &str = "model.safetensors";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const STATE_FILE: &str = "state.json";
const MOMENTS: [&str; 2] = ["exp_avg", "exp_avg_sq"];

fn manifest_file(moment: &str) -> String {
    format!("optimizer.{moment}.manifest.json")
}

fn checksum_sidecar(rank: usize) -> String {
    format!("optimizer.rank-{rank:05}.sha256.json")
}

/// Everything besides tensors that resuming needs.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct TrainState {
    pub format: u32,
    pub run_name: String,
    /// Optimizer steps taken.
    pub step: u64,
    /// Per-device micro-iterations consumed (`step * gas`).
    pub iter_num: u64,
    /// Training tokens consumed across the cluster.
    pub tokens: u64,
    /// Optimizer step counter (bias correction).
    pub optimizer_step: u64,
    /// Training data loader state of each rank, in rank order.
    pub loaders: Vec<serde_json::Value>,
    /// SHA-256 of each tensor file, checked on load.
    pub sha256: BTreeMap<String, String>,
}

/// A loaded checkpoint.
pub struct Checkpoint {
    pub dir: PathBuf,
    pub state: TrainState,
    pub params: Vec<Vec<f32>>,
    /// The whole optimizer state (empty when [`OptimizerRead::Nothing`] was asked, or when
    /// `optimizer_shard` holds this rank's part instead).
    pub optimizer: OptimizerState,
    /// This rank's own shard ([`OptimizerRead::Shard`] and a checkpoint cut the same way).
    pub optimizer_shard: Option<OptimizerShard>,
}

/// What [`load_with`] reads of the optimizer state.
pub enum OptimizerRead<'a> {
    /// Every tensor, whole: any world size and layout resumes from it.
    All,
    /// Nothing: eval and export need the parameters only.
    Nothing,
    /// Only the files of chunk `chunk` when the checkpoint's optimizer state is cut as `ours`
    /// cuts it (the same pieces of every tensor and shard length: a ZeRO resume on the same
    /// world and layout), so a rank reads 1/world of the state; otherwise every tensor.
    Shard { ours: &'a Manifest, chunk: usize },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> RuntimeError {
    let context = context.into();
    move |source| RuntimeError::Io { context, source }
}

fn bad(msg: impl Into<String>) -> RuntimeError {
    RuntimeError::Message(msg.into())
}

pub fn step_dir_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// Little-endian f32 values of `bytes` (a whole number of them).
fn f32_values(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn write_tensors(path: &Path, tensors: &[(String, Vec<usize>, Vec<u8>)]) -> Result<String> {
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(name, shape, data)| {
            TensorView::new(Dtype::F32, shape.clone(), data)
                .map(|v| (name.clone(), v))
                .map_err(|e| bad(format!("tensor {name}: {e}")))
        })
        .collect::<Result<_>>()?;
    let bytes = safetensors::serialize(views, &None)
        .map_err(|e| bad(format!("serialising {}: {e}", path.display())))?;
    write_synced(path, &bytes)?;
    Ok(hex_sha256(&bytes))
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = fs::File::create(path).map_err(io_err(format!("creating {}", path.display())))?;
    f.write_all(bytes)
        .map_err(io_err(format!("writing {}", path.display())))?;
    f.sync_all()
        .map_err(io_err(format!("syncing {}", path.display())))
}

fn hex_sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn sync_dir(dir: &Path) {
    // Directory fsync makes the rename durable; not every filesystem supports it.
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Writes a checkpoint for `state.step` under `run_dir/checkpoints/` and returns its path.
pub fn save(
    run_dir: &Path,
    plan: &Plan,
    params: &[Vec<f32>],
    optimizer: &OptimizerState,
    mut state: TrainState,
) -> Result<PathBuf> {
    let root = run_dir.join("checkpoints");
    fs::create_dir_all(&root).map_err(io_err(format!("creating {}", root.display())))?;
    let final_dir = root.join(step_dir_name(state.step));
    let partial = root.join(format!("{}.partial", step_dir_name(state.step)));
    if partial.exists() {
        fs::remove_dir_all(&partial)
            .map_err(io_err(format!("removing stale {}", partial.display())))?;
    }
    fs::create_dir(&partial).map_err(io_err(format!("creating {}", partial.display())))?;

    if params.len() != plan.params.len() {
        return Err(bad(format!(
            "checkpoint: {} tensors given, the plan has {}",
            params.len(),
            plan.params.len()
        )));
    }
    let model: Vec<(String, Vec<usize>, Vec<u8>)> = plan
        .params
        .iter()
        .zip(params)
        .map(|(p, v)| (p.name.clone(), p.shape.clone(), f32_bytes(v)))
        .collect();
    let opt: Vec<(String, Vec<usize>, Vec<u8>)> = optimizer
        .tensors
        .iter()
        .map(|(n, v)| (n.clone(), vec![v.len()], f32_bytes(v)))
        .collect();
    state.format = FORMAT_VERSION;
    state.optimizer_step = optimizer.step;
    state.sha256.clear();
    state.sha256.insert(
        MODEL_FILE.into(),
        write_tensors(&partial.join(MODEL_FILE), &model)?,
    );
    state.sha256.insert(
        OPTIMIZER_FILE.into(),
        write_tensors(&partial.join(OPTIMIZER_FILE), &opt)?,
    );
    let json =
        serde_json::to_vec_pretty(&state).map_err(|e| bad(format!("encoding state.json: {e}")))?;
    write_synced(&partial.join(STATE_FILE), &json)?;
    sync_dir(&partial);
    // Re-saving the same step (resume then interrupt) replaces it only once complete.
    publish(&root, &partial, &final_dir, state.step)?;
    Ok(final_dir)
}

/// Writes a checkpoint whose optimizer state is sharded. Every rank calls it with its own
/// `shard`; rank 0 also passes the full `params` (and the `state` that counts). `barrier`
/// returns once every rank has reached it. Returns the final path on rank 0.
pub fn save_sharded(
    run_dir: &Path,
    plan: &Plan,
    params: Option<&[Vec<f32>]>,
    shard: &OptimizerShard,
    mut state: TrainState,
    barrier: &dyn Fn() -> Result<()>,
) -> Result<Option<PathBuf>> {
    let root = run_dir.join("checkpoints");
    let final_dir = root.join(step_dir_name(state.step));
    let partial = root.join(format!("{}.partial", step_dir_name(state.step)));
    let lead = shard.rank == 0;
    if lead {
        fs::create_dir_all(&root).map_err(io_err(format!("creating {}", root.display())))?;
        if partial.exists() {
            fs::remove_dir_all(&partial)
                .map_err(io_err(format!("removing stale {}", partial.display())))?;
        }
        fs::create_dir(&partial).map_err(io_err(format!("creating {}", partial.display())))?;
    }
    barrier()?;
    // every rank: its shard files, and their checksums in a sidecar for rank 0
    let m = &shard.manifest;
    let count = m.files.len();
    let mine: Vec<usize> = m
        .files
        .iter()
        .filter(|f| f.rank == shard.rank)
        .map(|f| f.shard)
        .collect();
    let mut sums = BTreeMap::new();
    for &idx in &mine {
        for (moment, data) in MOMENTS.iter().zip([&shard.exp_avg, &shard.exp_avg_sq]) {
            if data.len() != m.shard_len {
                return Err(bad(format!(
                    "optimizer shard {idx}: {} values, the manifest says {}",
                    data.len(),
                    m.shard_len
                )));
            }
            let file = shard_file_name(&format!("optimizer.{moment}"), idx, count);
            let bytes = f32_bytes(data);
            write_synced(&partial.join(&file), &bytes)?;
            sums.insert(file, hex_sha256(&bytes));
        }
    }
    // replicas (hybrid shard's other nodes) hold no chunk of their own and write nothing
    if !mine.is_empty() {
        let json =
            serde_json::to_vec(&sums).map_err(|e| bad(format!("encoding checksums: {e}")))?;
        write_synced(&partial.join(checksum_sidecar(shard.rank)), &json)?;
    }
    barrier()?;
    let mut out = None;
    if lead {
        let params =
            params.ok_or_else(|| bad("sharded checkpoint: rank 0 needs the parameters"))?;
        if params.len() != plan.params.len() {
            return Err(bad(format!(
                "checkpoint: {} tensors given, the plan has {}",
                params.len(),
                plan.params.len()
            )));
        }
        state.format = FORMAT_VERSION;
        state.optimizer_step = shard.step;
        state.sha256.clear();
        let writers: std::collections::BTreeSet<usize> = m.files.iter().map(|f| f.rank).collect();
        for r in writers {
            let side = partial.join(checksum_sidecar(r));
            let text = fs::read(&side).map_err(io_err(format!("reading {}", side.display())))?;
            let part: BTreeMap<String, String> = serde_json::from_slice(&text)
                .map_err(|e| bad(format!("{}: {e}", side.display())))?;
            state.sha256.extend(part);
            fs::remove_file(&side).map_err(io_err(format!("removing {}", side.display())))?;
        }
        for moment in MOMENTS {
            let mut mm = m.clone();
            for f in &mut mm.files {
                f.file = shard_file_name(&format!("optimizer.{moment}"), f.shard, count);
                if !state.sha256.contains_key(&f.file) {
                    return Err(bad(format!("sharded checkpoint: no rank wrote {}", f.file)));
                }
            }
            let text = serde_json::to_vec_pretty(&mm)
                .map_err(|e| bad(format!("encoding manifest: {e}")))?;
            write_synced(&partial.join(manifest_file(moment)), &text)?;
        }
        let model: Vec<(String, Vec<usize>, Vec<u8>)> = plan
            .params
            .iter()
            .zip(params)
            .map(|(p, v)| (p.name.clone(), p.shape.clone(), f32_bytes(v)))
            .collect();
        state.sha256.insert(
            MODEL_FILE.into(),
            write_tensors(&partial.join(MODEL_FILE), &model)?,
        );
        let json = serde_json::to_vec_pretty(&state)
            .map_err(|e| bad(format!("encoding state.json: {e}")))?;
        write_synced(&partial.join(STATE_FILE), &json)?;
        sync_dir(&partial);
        publish(&root, &partial, &final_dir, state.step)?;
        out = Some(final_dir);
    }
    barrier()?;
    Ok(out)
}

/// Renames a complete `partial` directory to `final_dir` (replacing an older one only once
/// the new one is complete).
fn publish(root: &Path, partial: &Path, final_dir: &Path, step: u64) -> Result<()> {
    if final_dir.exists() {
        let old = root.join(format!("{}.old", step_dir_name(step)));
        let _ = fs::remove_dir_all(&old);
        fs::rename(final_dir, &old)
            .map_err(io_err(format!("moving aside {}", final_dir.display())))?;
        fs::rename(partial, final_dir)
            .map_err(io_err(format!("renaming into {}", final_dir.display())))?;
        let _ = fs::remove_dir_all(&old);
    } else {
        fs::rename(partial, final_dir)
            .map_err(io_err(format!("renaming into {}", final_dir.display())))?;
    }
    sync_dir(root);
    Ok(())
}

/// Complete checkpoints of a run, oldest first (partial directories are ignored).
pub fn list(run_dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut out = Vec::new();
    if let Ok(entries) = fs::read_dir(run_dir.join("checkpoints")) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(n) = name.strip_prefix("step-") {
                if let Ok(step) = n.parse::<u64>() {
                    if e.path().join(STATE_FILE).is_file() {
                        out.push((step, e.path()));
                    }
                }
            }
        }
    }
    out.sort();
    out
}

/// The newest complete checkpoint of a run, if any.
pub fn latest(run_dir: &Path) -> Option<PathBuf> {
    list(run_dir).pop().map(|(_, p)| p)
}

fn read_checked(dir: &Path, file: &str, state: &TrainState) -> Result<Vec<u8>> {
    let path = dir.join(file);
    let bytes = fs::read(&path).map_err(io_err(format!(
        "reading checkpoint file {}",
        path.display()
    )))?;
    let want = state.sha256.get(file).ok_or_else(|| {
        bad(format!(
            "{}: state.json has no checksum for {file}",
            dir.display()
        ))
    })?;
    let got = hex_sha256(&bytes);
    if &got != want {
        return Err(bad(format!(
            "checkpoint file {} is corrupt: SHA-256 {got} does not match {want} recorded in state.json",
            path.display()
        )));
    }
    Ok(bytes)
}

fn tensor_f32(
    st: &safetensors::SafeTensors,
    name: &str,
    path: &Path,
) -> Result<(Vec<usize>, Vec<f32>)> {
    let t = st
        .tensor(name)
        .map_err(|_| bad(format!("{}: tensor `{name}` is missing", path.display())))?;
    if t.dtype() != Dtype::F32 {
        return Err(bad(format!(
            "{}: tensor `{name}` is {:?}, expected F32",
            path.display(),
            t.dtype()
        )));
    }
    Ok((t.shape().to_vec(), f32_values(t.data())))
}

/// Loads and verifies a checkpoint directory against `plan`, with the whole optimizer state.
pub fn load(dir: &Path, plan: &Plan) -> Result<Checkpoint> {
    load_with(dir, plan, OptimizerRead::All)
}

/// [`load`], reading of the optimizer state what `read` says.
pub fn load_with(dir: &Path, plan: &Plan, read: OptimizerRead) -> Result<Checkpoint> {
    let state_path = dir.join(STATE_FILE);
    let text = fs::read_to_string(&state_path)
        .map_err(io_err(format!("reading {}", state_path.display())))?;
    let state: TrainState = serde_json::from_str(&text).map_err(|e| {
        bad(format!(
            "{} is not a valid checkpoint state: {e}",
            state_path.display()
        ))
    })?;
    if state.format != FORMAT_VERSION {
        return Err(bad(format!(
            "{}: checkpoint format {} is not supported (expected {FORMAT_VERSION})",
            state_path.display(),
            state.format
        )));
    }
    if state.run_name != plan.run_name {
        return Err(bad(format!(
            "{} belongs to run `{}`, not `{}`",
            dir.display(),
            state.run_name,
            plan.run_name
        )));
    }
    let model_path = dir.join(MODEL_FILE);
    let bytes = read_checked(dir, MODEL_FILE, &state)?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| bad(format!("{}: {e}", model_path.display())))?;
    let mut params = Vec::with_capacity(plan.params.len());
    for p in &plan.params {
        let (shape, data) = tensor_f32(&st, &p.name, &model_path)?;
        if shape != p.shape {
            return Err(bad(format!(
                "{}: `{}` has shape {shape:?}, the plan expects {:?}",
                model_path.display(),
                p.name,
                p.shape
            )));
        }
        params.push(data);
    }
    let sharded = dir.join(manifest_file(MOMENTS[0])).is_file();
    let empty = OptimizerState {
        step: state.optimizer_step,
        tensors: Vec::new(),
    };
    let (optimizer, optimizer_shard) = match read {
        OptimizerRead::Nothing => (empty, None),
        OptimizerRead::Shard { ours, chunk } if sharded => {
            match load_own_shard(dir, &state, ours, chunk)? {
                Some(shard) => (empty, Some(shard)),
                None => (load_sharded_optimizer(dir, &state, plan)?, None),
            }
        }
        _ if sharded => (load_sharded_optimizer(dir, &state, plan)?, None),
        _ => (load_whole_optimizer(dir, &state)?, None),
    };
    Ok(Checkpoint {
        dir: dir.to_path_buf(),
        state,
        params,
        optimizer,
        optimizer_shard,
    })
}

/// The optimizer state of an unsharded checkpoint (`optimizer.safetensors`).
fn load_whole_optimizer(dir: &Path, state: &TrainState) -> Result<OptimizerState> {
    let opt_path = dir.join(OPTIMIZER_FILE);
    let bytes = read_checked(dir, OPTIMIZER_FILE, state)?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| bad(format!("{}: {e}", opt_path.display())))?;
    let mut names: Vec<String> = st.names().into_iter().cloned().collect();
    names.sort();
    let mut tensors = Vec::with_capacity(names.len());
    for n in names {
        let (_, data) = tensor_f32(&st, &n, &opt_path)?;
        tensors.push((n, data));
    }
    Ok(OptimizerState {
        step: state.optimizer_step,
        tensors,
    })
}

/// Chunk `chunk` of both moments, when the checkpoint's manifests cut the state as `ours`
/// does; `None` when they do not (another world size or layout).
fn load_own_shard(
    dir: &Path,
    state: &TrainState,
    ours: &Manifest,
    chunk: usize,
) -> Result<Option<OptimizerShard>> {
    let mut moments = Vec::with_capacity(MOMENTS.len());
    for moment in MOMENTS {
        let path = dir.join(manifest_file(moment));
        let text = fs::read(&path).map_err(io_err(format!("reading {}", path.display())))?;
        let theirs: Manifest = serde_json::from_slice(&text)
            .map_err(|e| bad(format!("{} is not a valid manifest: {e}", path.display())))?;
        if theirs.shard_len != ours.shard_len || theirs.tensors != ours.tensors {
            return Ok(None);
        }
        let Some(f) = theirs.files.iter().find(|f| f.shard == chunk) else {
            return Ok(None);
        };
        let bytes = read_checked(dir, &f.file, state)?;
        if bytes.len() != 4 * ours.shard_len {
            return Err(bad(format!(
                "{}: {} bytes, the manifest says {} f32",
                dir.join(&f.file).display(),
                bytes.len(),
                ours.shard_len
            )));
        }
        moments.push(f32_values(&bytes));
    }
    let exp_avg_sq = moments.pop().unwrap_or_default();
    let exp_avg = moments.pop().unwrap_or_default();
    Ok(Some(OptimizerShard {
        step: state.optimizer_step,
        // the chunk, not the writer's rank (they differ for hybrid shard's replicas)
        rank: chunk,
        manifest: ours.clone(),
        exp_avg,
        exp_avg_sq,
    }))
}

/// The full optimizer state of a sharded checkpoint, rebuilt from every rank's files. A
/// Muon matrix's momentum is sharded in the `exp_avg` files; it comes back named
/// `<name>.momentum_buffer`, as a one-GPU or CPU checkpoint names it, and its `exp_avg_sq`
/// slot in the files (zeros: the runtime keeps none) is dropped.
fn load_sharded_optimizer(dir: &Path, state: &TrainState, plan: &Plan) -> Result<OptimizerState> {
    let muon: std::collections::BTreeSet<&str> = plan
        .params
        .iter()
        .filter(|p| plan.optimizer.groups[p.group].optimizer == OptimizerKind::Muon)
        .map(|p| p.name.as_str())
        .collect();
    let mut tensors = Vec::new();
    for moment in MOMENTS {
        let path = dir.join(manifest_file(moment));
        let text = fs::read(&path).map_err(io_err(format!("reading {}", path.display())))?;
        let manifest: Manifest = serde_json::from_slice(&text)
            .map_err(|e| bad(format!("{} is not a valid manifest: {e}", path.display())))?;
        let mut shards = Vec::with_capacity(manifest.files.len());
        for f in &manifest.files {
            let bytes = read_checked(dir, &f.file, state)?;
            if bytes.len() % 4 != 0 {
                return Err(bad(format!(
                    "{}: {} bytes is not a whole number of f32",
                    dir.join(&f.file).display(),
                    bytes.len()
                )));
            }
            shards.push(f32_values(&bytes));
        }
        for t in manifest
            .gather(&shards)
            .map_err(|e| bad(format!("{}: {e}", path.display())))?
        {
            if !muon.contains(t.name.as_str()) {
                tensors.push((format!("{}.{moment}", t.name), t.data));
            } else if moment == "exp_avg" {
                tensors.push((format!("{}.momentum_buffer", t.name), t.data));
            }
        }
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(OptimizerState {
        step: state.optimizer_step,
        tensors,
    })
}
