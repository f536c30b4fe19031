//! Typed launch wrappers. Pointers are raw device addresses (`u64`); shapes are checked
//! here where a kernel relies on them.

use crate::error::{KernelError, Result};
use crate::gpu::{Args, Gpu, Kernel};
use crate::tensor_map::TensorMap;
use std::sync::Arc;

const FLASH_BR: usize = 64;
const FLASH_BC: usize = 64;
/// Keys per backward CTA (8 warps of 16 keys; the Hopper backward: 2 consumer warpgroups).
const FLASH_BWD_BC: usize = 128;
/// Query rows per CTA and keys per tile of the Hopper forward (flash_sm90_ws.cu).
const FLASH9_BR: usize = 128;
const FLASH9_BC: usize = 128;
/// Queries per work item of the Hopper backward (flash_sm90_ws.cu).
const FLASH9_BWD_BR: usize = 64;

/// Which flash attention kernels `Ops` launches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlashVariant {
    /// mma.sync kernels (flash.cu), any sm_80+ device.
    Sm80,
    /// Hopper, the default there: the warp-specialised TMA forward and backward
    /// (flash_sm90_ws.cu; the backward with half of V in registers), the fused delta / dq_acc
    /// zeroing pass and the dQ conversion through shared memory (flash_sm90.cu).
    Sm90WsLeanV,
}

/// `ARCHSCALE_FLASH` values of the variants retired 2026-11-29 (bench/NOTES.md, "Retired
/// kernel variants"): none was faster than `sm90ws-leanv` in the d8 and d16 steps measured.
const RETIRED_FLASH_VARIANTS: [&str; 6] = [
    "sm90",
    "sm90ws",
    "sm90ws-bwd",
    "sm90ws-np",
    "sm90ws-nppp",
    "sm90ws-lean",
];

/// Environment options that chose between flash kernels retired 2026-11-29: (variable, the
/// value that still names what runs, if any; setting it is allowed and changes nothing).
const RETIRED_FLASH_OPTIONS: [(&str, Option<&str>); 5] = [
    ("ARCHSCALE_FLASH_FWD", None),
    ("ARCHSCALE_FLASH_WS", Some("pingpong")),
    ("ARCHSCALE_FLASH_WS_BWD", Some("inline")),
    ("ARCHSCALE_FLASH_PREP", Some("fused")),
    ("ARCHSCALE_FLASH_DQ", Some("smem")),
];

impl FlashVariant {
    /// Every variant, in the order the self-test runs them (index = stored code).
    pub const ALL: [FlashVariant; 2] = [FlashVariant::Sm80, FlashVariant::Sm90WsLeanV];

    /// Runs flash_sm90_ws.cu's and flash_sm90.cu's kernels.
    fn hopper(self) -> bool {
        self != FlashVariant::Sm80
    }

    pub fn name(self) -> &'static str {
        match self {
            FlashVariant::Sm80 => "sm80",
            FlashVariant::Sm90WsLeanV => "sm90ws-leanv",
        }
    }

    /// The variant an `ARCHSCALE_FLASH` value names; `None` for the device's default (unset,
    /// empty or `auto`). A retired or unknown name is an error that lists the valid ones.
    fn from_setting(value: Option<&str>) -> Result<Option<FlashVariant>> {
        let name = match value {
            None | Some("") | Some("auto") => return Ok(None),
            Some(name) => name,
        };
        if let Some(v) = FlashVariant::ALL.into_iter().find(|v| v.name() == name) {
            return Ok(Some(v));
        }
        let valid: Vec<&str> = FlashVariant::ALL.iter().map(|v| v.name()).collect();
        let why = if RETIRED_FLASH_VARIANTS.contains(&name) {
            "was retired 2026-11-29 (bench/NOTES.md, \"Retired kernel variants\")"
        } else {
            "is not a flash variant"
        };
        Err(KernelError::Unsupported(format!(
            "ARCHSCALE_FLASH={name} {why}; expected {} or auto",
            valid.join(", ")
        )))
    }
}

/// Refuses a setting of a retired flash option other than the one value that still names
/// what runs (`get`: the environment lookup).
fn check_retired_flash_options(get: impl Fn(&str) -> Option<String>) -> Result<()> {
    for (var, kept) in RETIRED_FLASH_OPTIONS {
        let Some(value) = get(var).filter(|v| !v.is_empty()) else {
            continue;
        };
        if Some(value.as_str()) == kept {
            continue;
        }
        let expected = match kept {
            Some(k) => format!("the only choice left is {k} (or leave {var} unset)"),
            None => format!("leave {var} unset"),
        };
        return Err(KernelError::Unsupported(format!(
            "{var}={value}: the flash kernels this option chose between were retired \
             2026-11-29 (bench/NOTES.md, \"Retired kernel variants\"); {expected}"
        )));
    }
    Ok(())
}

/// How an attention layer's RoPE backward runs (`ARCHSCALE_ROPE_BWD`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeBackward {
    /// In the flash backward: the dQ conversion and the dK store inverse-rotate (default).
    Fused,
    /// The flash backward, then `rope_qkv` (sign -1) over the fused dQKV in place.
    Separate,
}

impl RopeBackward {
    /// The choice an `ARCHSCALE_ROPE_BWD` value names (unset or empty: `fused`); any other
    /// value is an error that lists the valid ones.
    pub fn from_setting(value: Option<&str>) -> Result<RopeBackward> {
        match value {
            None | Some("") | Some("fused") => Ok(RopeBackward::Fused),
            Some("separate") => Ok(RopeBackward::Separate),
            Some(other) => Err(KernelError::Unsupported(format!(
                "ARCHSCALE_ROPE_BWD={other}: expected `fused` (default) or `separate`"
            ))),
        }
    }
}

/// bf16 RoPE tables `[len, head_dim / 2]` (row t: position t) for the flash backward's fused
/// RoPE backward ([`Ops::flash_bwd`]).
#[derive(Clone, Copy, Debug)]
pub struct RopeTables {
    pub cos: u64,
    pub sin: u64,
    /// Positions the tables hold (at least the layout's `seq`).
    pub len: usize,
}

/// The Hopper-only flash kernels (variant `Sm90WsLeanV`).
struct FlashSm90 {
    /// Warp-specialised forward (producer warpgroup with TMA, two consumer warpgroups).
    fwd_64: Kernel,
    fwd_128: Kernel,
    /// Warp-specialised backward (dQ into the blocked fp32 dq_acc).
    bwd_64: Kernel,
    bwd_128: Kernel,
    /// delta and the dq_acc zeroing in one pass.
    prep: Kernel,
    /// dQ from the backward's blocked dq_acc, through shared memory with 16-byte stores.
    dq: Kernel,
}

/// The register-resident RMSNorm kernels; `[V - 1]` keeps V float4 chunks per thread
/// (see [`rmsnorm_chunks`]).
struct RegisterNorm {
    fwd: [Kernel; 4],
    fwd_add: [Kernel; 4],
    bwd: [Kernel; 4],
    /// Blocks per SM of each backward kernel's grid: one wave of at most 1,024 threads
    /// (every block ends with n atomics into dgamma, so no more blocks than that).
    bwd_per_sm: [usize; 4],
}

/// Every kernel, loaded once per device.
pub struct Ops {
    pub gpu: Arc<Gpu>,
    embedding_fwd: Kernel,
    embedding_bwd: Kernel,
    rmsnorm_fwd: Kernel,
    rmsnorm_bwd: Kernel,
    /// Register-resident RMSNorm; None with ARCHSCALE_RMSNORM=block (the one-block-per-row
    /// kernels, and no fused residual add).
    rmsnorm_regs: Option<RegisterNorm>,
    rope_qkv: Kernel,
    /// `ARCHSCALE_ROPE_BWD`, read once at load.
    rope_bwd: RopeBackward,
    swiglu_fwd: Kernel,
    swiglu_bwd: Kernel,
    cast_f32_bf16: Kernel,
    cast_bf16_f32: Kernel,
    cross_entropy: Kernel,
    adamw: Kernel,
    sum_squares: Kernel,
    grad_sum_squares: Kernel,
    scale_f32: Kernel,
    flash_fwd_64: Kernel,
    flash_fwd_128: Kernel,
    flash_bwd_64: Kernel,
    flash_bwd_128: Kernel,
    flash_delta: Kernel,
    flash_dq: Kernel,
    flash_sm90: Option<FlashSm90>,
    /// The variant `flash_fwd`/`flash_bwd` launch (index into `FlashVariant::ALL`).
    flash_variant: std::sync::atomic::AtomicU8,
}

/// Where attention reads Q, K, V and writes O (element strides, bf16 buffers).
#[derive(Clone, Copy, Debug)]
pub struct AttnLayout {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    /// Query heads per KV group.
    pub qpg: usize,
    pub head_dim: usize,
    pub q_row_stride: usize,
    pub q_group_stride: usize,
    pub kv_row_stride: usize,
    pub kv_group_stride: usize,
    pub o_row_stride: usize,
    /// Softmax scale.
    pub scale: f32,
    /// Sliding window W (query t sees keys t-W+1..t); 0 = full causal.
    pub window: usize,
    /// Varlen (document masking): device pointer to i32 `[batch·seq]`, where `seg[b·T + t]`
    /// is the position in the row at which token t's document starts; query t then sees only
    /// keys j ≥ seg[b·T + t]. 0 = no document masking.
    pub seg: u64,
}

impl AttnLayout {
    /// The lit-gpt grouped fused QKV layout `[rows, G, qpg + 2, hs]` with output `[rows, H·hs]`.
    pub fn fused_qkv(
        batch: usize,
        seq: usize,
        heads: usize,
        groups: usize,
        head_dim: usize,
        scale: f32,
        window: usize,
    ) -> AttnLayout {
        let qpg = heads / groups;
        let row = (heads + 2 * groups) * head_dim;
        AttnLayout {
            batch,
            seq,
            heads,
            qpg,
            head_dim,
            q_row_stride: row,
            q_group_stride: (qpg + 2) * head_dim,
            kv_row_stride: row,
            kv_group_stride: (qpg + 2) * head_dim,
            o_row_stride: heads * head_dim,
            scale,
            window,
            seg: 0,
        }
    }
    /// The same layout with document masking from `seg` (see [`AttnLayout::seg`]).
    pub fn with_seg(self, seg: u64) -> AttnLayout {
        AttnLayout { seg, ..self }
    }
    /// Element offsets of the first K and V vectors from the start of the fused buffer.
    pub fn fused_k_offset(&self) -> usize {
        self.qpg * self.head_dim
    }
    pub fn fused_v_offset(&self) -> usize {
        (self.qpg + 1) * self.head_dim
    }
    pub fn groups(&self) -> usize {
        self.heads / self.qpg
    }
}

/// Device tables of AdamW's work items (chunks of at most 8192 elements of one tensor):
/// i64 offsets, i32 lengths, i32 optimizer groups, optionally (`gbf`, 0 = none) i64
/// offsets in bf16 elements of gradients held in bf16 (−1: the item's gradient is fp32), and
/// optionally (`voff`, 0 = none: at `off`) i64 offsets of the second moments in a buffer
/// with slots for AdamW's tensors only.
#[derive(Clone, Copy, Debug)]
pub struct OptChunkTables {
    pub off: u64,
    pub len: u64,
    pub group: u64,
    pub gbf: u64,
    pub voff: u64,
    pub count: usize,
}

fn grid1(n: usize) -> (u32, u32, u32) {
    (n as u32, 1, 1)
}

fn ew_grid(gpu: &Gpu, n: usize, threads: usize) -> (u32, u32, u32) {
    let blocks = n
        .div_ceil(threads)
        .min(gpu.sm_count.max(1) as usize * 16)
        .max(1);
    (blocks as u32, 1, 1)
}

/// Threads per block of the register-resident RMSNorm forward (one block per row) and
/// backward (grid-stride over rows, more threads per row to hide its longer dependency chain).
pub fn rmsnorm_threads(n: usize, backward: bool) -> u32 {
    if backward || n > 2048 {
        256
    } else {
        128
    }
}

/// Float4 chunks per thread of the register-resident RMSNorm kernels for width `n` and
/// `threads` per block, or None where the one-block-per-row kernels run (n not a multiple of
/// 4, or more than 4 chunks per thread).
pub fn rmsnorm_chunks(n: usize, threads: u32) -> Option<usize> {
    if n == 0 || !n.is_multiple_of(4) {
        return None;
    }
    let v = (n / 4).div_ceil(threads as usize);
    (v <= 4).then_some(v)
}

#[cfg(test)]
mod rmsnorm_regs_tests {
    use super::{rmsnorm_chunks, rmsnorm_threads};

    #[test]
    fn register_rmsnorm_covers_each_width_once_without_idle_chunk_rounds() {
        for backward in [false, true] {
            for n in (4..=4096).step_by(4) {
                let threads = rmsnorm_threads(n, backward);
                let v = rmsnorm_chunks(n, threads).expect("every multiple of 4 up to 4096");
                let per_round = threads as usize * 4;
                assert!((1..=4).contains(&v), "n {n}: v {v}");
                assert!(
                    v * per_round >= n,
                    "n {n}: {v} rounds of {per_round} miss elements"
                );
                assert!((v - 1) * per_round < n, "n {n}: round {v} would be idle");
            }
            for n in [0, 2, 130, 1534, 4100, 8192] {
                assert_eq!(
                    rmsnorm_chunks(n, rmsnorm_threads(n, backward)),
                    None,
                    "n {n}"
                );
            }
        }
    }
}

fn i32_of(name: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| {
        KernelError::Unsupported(format!(
            "{name} = {v} exceeds the 32-bit index range of the kernels"
        ))
    })
}

impl Ops {
    /// Compiles (or loads from the cache) and loads every kernel.
    pub fn new(gpu: Arc<Gpu>) -> Result<Ops> {
        check_retired_flash_options(|var| std::env::var(var).ok())?;
        let load = |module: &str, name: &'static str| gpu.module_kernel(module, name);
        let ops = Ops {
            embedding_fwd: load("elementwise", "embedding_fwd")?,
            embedding_bwd: load("elementwise", "embedding_bwd")?,
            rmsnorm_fwd: load("elementwise", "rmsnorm_fwd")?,
            rmsnorm_bwd: load("elementwise", "rmsnorm_bwd")?,
            rmsnorm_regs: match std::env::var("ARCHSCALE_RMSNORM").as_deref() {
                Ok("block") => None,
                Ok("regs") | Err(_) => {
                    let four = |names: [&'static str; 4]| -> Result<[Kernel; 4]> {
                        Ok([
                            load("elementwise", names[0])?,
                            load("elementwise", names[1])?,
                            load("elementwise", names[2])?,
                            load("elementwise", names[3])?,
                        ])
                    };
                    let bwd = four([
                        "rmsnorm_bwd_r1",
                        "rmsnorm_bwd_r2",
                        "rmsnorm_bwd_r3",
                        "rmsnorm_bwd_r4",
                    ])?;
                    let threads = rmsnorm_threads(0, true);
                    let mut bwd_per_sm = [0; 4];
                    for (per_sm, k) in bwd_per_sm.iter_mut().zip(bwd) {
                        *per_sm =
                            (1024 / threads as usize).min(gpu.resident_blocks(k, threads, 0)?);
                    }
                    Some(RegisterNorm {
                        fwd: four([
                            "rmsnorm_fwd_r1",
                            "rmsnorm_fwd_r2",
                            "rmsnorm_fwd_r3",
                            "rmsnorm_fwd_r4",
                        ])?,
                        fwd_add: four([
                            "rmsnorm_fwd_add_r1",
                            "rmsnorm_fwd_add_r2",
                            "rmsnorm_fwd_add_r3",
                            "rmsnorm_fwd_add_r4",
                        ])?,
                        bwd,
                        bwd_per_sm,
                    })
                }
                Ok(other) => {
                    return Err(KernelError::Unsupported(format!(
                        "ARCHSCALE_RMSNORM={other}: expected `regs` (default) or `block`"
                    )))
                }
            },
            rope_qkv: load("elementwise", "rope_qkv")?,
            rope_bwd: RopeBackward::from_setting(
                std::env::var("ARCHSCALE_ROPE_BWD").ok().as_deref(),
            )?,
            swiglu_fwd: load("elementwise", "swiglu_fwd")?,
            swiglu_bwd: load("elementwise", "swiglu_bwd")?,
            cast_f32_bf16: load("elementwise", "cast_f32_bf16")?,
            cast_bf16_f32: load("elementwise", "cast_bf16_f32")?,
            cross_entropy: load("loss_optim", "cross_entropy")?,
            adamw: load("loss_optim", "adamw_step")?,
            sum_squares: load("loss_optim", "sum_squares")?,
            grad_sum_squares: load("loss_optim", "grad_sum_squares")?,
            scale_f32: load("loss_optim", "scale_f32")?,
            flash_fwd_64: load("flash", "flash_fwd_d64")?,
            flash_fwd_128: load("flash", "flash_fwd_d128")?,
            flash_bwd_64: load("flash", "flash_bwd_d64")?,
            flash_bwd_128: load("flash", "flash_bwd_d128")?,
            flash_delta: load("flash", "flash_bwd_delta")?,
            flash_dq: load("flash", "flash_bwd_dq")?,
            flash_sm90: if gpu.cc.0 == 9 {
                Some(FlashSm90 {
                    fwd_64: load("flash_sm90_ws", "flash_fwd_ws_d64")?,
                    fwd_128: load("flash_sm90_ws", "flash_fwd_ws_d128")?,
                    bwd_64: load("flash_sm90_ws", "flash_bwd_ws_leanv_d64")?,
                    bwd_128: load("flash_sm90_ws", "flash_bwd_ws_leanv_d128")?,
                    prep: load("flash_sm90", "flash_bwd_prep_sm90")?,
                    dq: load("flash_sm90", "flash_bwd_dq2_sm90")?,
                })
            } else {
                None
            },
            flash_variant: 0.into(),
            gpu,
        };
        if let Some(k9) = &ops.flash_sm90 {
            for (k, d) in [(k9.fwd_64, 64), (k9.fwd_128, 128)] {
                ops.gpu.set_max_dynamic_smem(k, Self::flash_ws_smem(d))?;
            }
            for (k, d) in [(k9.bwd_64, 64), (k9.bwd_128, 128)] {
                ops.gpu
                    .set_max_dynamic_smem(k, Self::flash_ws_bwd_smem(d))?;
            }
        }
        // Default on Hopper: the warp-specialised forward and backward (same call, two
        // interleaved rounds: d16 step 210.4-210.7 against 212.6-213.1 ms for the previous
        // backward, d8 72.6-72.7 against 74.0-74.3 ms). ARCHSCALE_FLASH=sm80 runs flash.cu's.
        let want = FlashVariant::from_setting(std::env::var("ARCHSCALE_FLASH").ok().as_deref())?
            .unwrap_or(FlashVariant::Sm90WsLeanV);
        if ops.flash_variants().contains(&want) {
            ops.set_flash_variant(want)?;
        }
        for (k, d) in [(ops.flash_fwd_64, 64), (ops.flash_fwd_128, 128)] {
            ops.gpu.set_max_dynamic_smem(k, Self::flash_fwd_smem(d))?;
        }
        for (k, d) in [(ops.flash_bwd_64, 64), (ops.flash_bwd_128, 128)] {
            ops.gpu.set_max_dynamic_smem(k, Self::flash_bwd_smem(d))?;
        }
        Ok(ops)
    }

    fn flash_fwd_smem(d: usize) -> usize {
        (FLASH_BR + 4 * FLASH_BC) * (d + 8) * 2
    }
    fn flash_bwd_smem(d: usize) -> usize {
        (2 * FLASH_BWD_BC + 4 * FLASH_BR) * (d + 8) * 2
            + FLASH_BWD_BC * (FLASH_BR + 8) * 2
            + 6 * FLASH_BR * 4
    }
    /// Warp-specialised forward: Q tile and STAGES stages of K and V (d128: 2, d64: 3; as
    /// flash_sm90_ws.cu instantiates them), 1 KiB to align the base, and the mbarriers.
    fn flash_ws_smem(d: usize) -> usize {
        let stages = if d == 128 { 2 } else { 3 };
        (1 + 2 * stages) * FLASH9_BC * d * 2 + 1024 + 256
    }
    /// Warp-specialised backward: K, V (128 keys), two stages of Q and dO (64 queries), two of
    /// dS^T, two buffers of both consumers' fp32 64 x 64 dQ parts, two stages of lse, delta and
    /// seg, 1 KiB to align the base and 5 mbarriers (d128: 232,000 of the 232,448 bytes a CTA
    /// may have).
    fn flash_ws_bwd_smem(d: usize) -> usize {
        (2 * FLASH_BWD_BC + 4 * FLASH9_BWD_BR) * d * 2
            + 2 * FLASH_BWD_BC * FLASH9_BWD_BR * 2
            + 4 * FLASH9_BWD_BR * 64 * 4
            + 6 * FLASH9_BWD_BR * 4
            + 1024
            + 64
    }

    /// The flash variants this device can run (`Sm80` always; the others on Hopper).
    pub fn flash_variants(&self) -> Vec<FlashVariant> {
        FlashVariant::ALL
            .into_iter()
            .filter(|v| !v.hopper() || self.flash_sm90.is_some())
            .collect()
    }

    /// The variant `flash_fwd`/`flash_bwd` launch now.
    pub fn flash_variant(&self) -> FlashVariant {
        let code = self
            .flash_variant
            .load(std::sync::atomic::Ordering::Relaxed);
        FlashVariant::ALL[code as usize % FlashVariant::ALL.len()]
    }

    /// Chooses the flash kernels (the self-test checks every variant this way).
    pub fn set_flash_variant(&self, v: FlashVariant) -> Result<()> {
        if !self.flash_variants().contains(&v) {
            return Err(KernelError::Unsupported(format!(
                "flash variant {} needs a Hopper (sm_90) device",
                v.name()
            )));
        }
        let code = FlashVariant::ALL.iter().position(|&x| x == v).unwrap_or(0);
        self.flash_variant
            .store(code as u8, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// `out[t] = wte[idx[t]]` (fp32 rows of width n).
    pub fn embedding_fwd(&self, idx: u64, wte: u64, out: u64, rows: usize, n: usize) -> Result<()> {
        let a = Args::new()
            .ptr(idx)
            .ptr(wte)
            .ptr(out)
            .i32(i32_of("rows", rows)?)
            .i32(i32_of("n", n)?);
        self.gpu
            .launch(self.embedding_fwd, grid1(rows), (256, 1, 1), 0, &a)
    }

    /// `dwte[idx[t]] += dout[t]`.
    pub fn embedding_bwd(
        &self,
        idx: u64,
        dout: u64,
        dwte: u64,
        rows: usize,
        n: usize,
    ) -> Result<()> {
        let a = Args::new()
            .ptr(idx)
            .ptr(dout)
            .ptr(dwte)
            .i32(i32_of("rows", rows)?)
            .i32(i32_of("n", n)?);
        self.gpu
            .launch(self.embedding_bwd, grid1(rows), (256, 1, 1), 0, &a)
    }

    /// `y = bf16(x·rstd·gamma·scale)`; `rstd` may be 0 (not stored).
    #[allow(clippy::too_many_arguments)]
    pub fn rmsnorm_fwd(
        &self,
        x: u64,
        gamma: u64,
        y: u64,
        rstd: u64,
        rows: usize,
        n: usize,
        eps: f32,
        scale: f32,
    ) -> Result<()> {
        let a = Args::new()
            .ptr(x)
            .ptr(gamma)
            .ptr(y)
            .ptr(rstd)
            .i32(i32_of("rows", rows)?)
            .i32(i32_of("n", n)?)
            .f32(eps)
            .f32(scale);
        let threads = rmsnorm_threads(n, false);
        if let (Some(k), Some(v)) = (&self.rmsnorm_regs, rmsnorm_chunks(n, threads)) {
            return self
                .gpu
                .launch(k.fwd[v - 1], grid1(rows), (threads, 1, 1), 0, &a);
        }
        self.gpu
            .launch(self.rmsnorm_fwd, grid1(rows), (256, 1, 1), 0, &a)
    }

    /// Whether [`Ops::rmsnorm_fwd_add`] runs at width `n` (the register-resident kernels).
    pub fn rmsnorm_add_available(&self, n: usize) -> bool {
        self.rmsnorm_regs.is_some() && rmsnorm_chunks(n, rmsnorm_threads(n, false)).is_some()
    }

    /// A branch's residual add and the next RMSNorm in one pass: `x_out = x_in + rs·delta`
    /// (fp32; delta bf16) and `y = bf16(x_out·rstd·gamma·scale)`. `x_out` may be `x_in` and
    /// `y` may be `delta`. Only where [`Ops::rmsnorm_add_available`].
    #[allow(clippy::too_many_arguments)]
    pub fn rmsnorm_fwd_add(
        &self,
        x_in: u64,
        delta: u64,
        rs: f32,
        x_out: u64,
        gamma: u64,
        y: u64,
        rstd: u64,
        rows: usize,
        n: usize,
        eps: f32,
        scale: f32,
    ) -> Result<()> {
        let threads = rmsnorm_threads(n, false);
        let (Some(k), Some(v)) = (&self.rmsnorm_regs, rmsnorm_chunks(n, threads)) else {
            return Err(KernelError::Unsupported(format!(
                "rmsnorm_fwd_add: width {n} (needs a multiple of 4 up to 4096 and the register kernels)"
            )));
        };
        let a = Args::new()
            .ptr(x_in)
            .ptr(delta)
            .f32(rs)
            .ptr(x_out)
            .ptr(gamma)
            .ptr(y)
            .ptr(rstd)
            .i32(i32_of("rows", rows)?)
            .i32(i32_of("n", n)?)
            .f32(eps)
            .f32(scale);
        self.gpu
            .launch(k.fwd_add[v - 1], grid1(rows), (threads, 1, 1), 0, &a)
    }

    /// RMSNorm backward: `dres (+)= dx`, `dres_bf = bf16(dres)`, `dgamma += ...`.
    #[allow(clippy::too_many_arguments)]
    /// RMSNorm backward (see elementwise.cu). `h_out` (0: none; may equal `dy`) receives
    /// the forward output `x·rstd·gamma` again.
    pub fn rmsnorm_bwd(
        &self,
        x: u64,
        gamma: u64,
        rstd: u64,
        dy: u64,
        dres: u64,
        dres_bf: u64,
        dgamma: u64,
        rows: usize,
        n: usize,
        scale: f32,
        accumulate: bool,
        h_out: u64,
    ) -> Result<()> {
        let a = Args::new()
            .ptr(x)
            .ptr(gamma)
            .ptr(rstd)
            .ptr(dy)
            .ptr(dres)
            .ptr(dres_bf)
            .ptr(dgamma)
            .i32(i32_of("rows", rows)?)
            .i32(i32_of("n", n)?)
            .f32(scale)
            .i32(accumulate as i32)
            .ptr(h_out);
        let threads = rmsnorm_threads(n, true);
        if let (Some(k), Some(v)) = (&self.rmsnorm_regs, rmsnorm_chunks(n, threads)) {
            let blocks = rows.min(self.gpu.sm_count.max(1) as usize * k.bwd_per_sm[v - 1]);
            return self
                .gpu
                .launch(k.bwd[v - 1], grid1(blocks), (threads, 1, 1), 0, &a);
        }
        let smem = n * 4;
        if smem > 48 * 1024 {
            return Err(KernelError::Unsupported(format!(
                "rmsnorm_bwd: width {n} exceeds 12288"
            )));
        }
        let blocks = rows.min(self.gpu.sm_count.max(1) as usize * 4);
        self.gpu.launch(
            self.rmsnorm_bwd,
            grid1(blocks),
            (256, 1, 1),
            smem as u32,
            &a,
        )
    }

    /// RoPE (sign +1) or its backward (sign -1) in place on a fused grouped QKV buffer.
    #[allow(clippy::too_many_arguments)]
    pub fn rope_qkv(
        &self,
        qkv: u64,
        cos: u64,
        sin: u64,
        rows: usize,
        seq: usize,
        groups: usize,
        qpg: usize,
        hs: usize,
        sign: f32,
    ) -> Result<()> {
        let a = Args::new()
            .ptr(qkv)
            .ptr(cos)
            .ptr(sin)
            .i32(i32_of("rows", rows)?)
            .i32(i32_of("seq", seq)?)
            .i32(i32_of("groups", groups)?)
            .i32(i32_of("qpg", qpg)?)
            .i32(i32_of("hs", hs)?)
            .f32(sign);
        self.gpu
            .launch(self.rope_qkv, grid1(rows), (256, 1, 1), 0, &a)
    }

    /// How attention layers run the RoPE backward (`ARCHSCALE_ROPE_BWD`): fused into
    /// [`Ops::flash_bwd`] or a separate `rope_qkv` pass.
    pub fn rope_backward(&self) -> RopeBackward {
        self.rope_bwd
    }

    pub fn swiglu_fwd(&self, gu: u64, out: u64, rows: usize, inner: usize) -> Result<()> {
        let a = Args::new()
            .ptr(gu)
            .ptr(out)
            .i32(i32_of("rows", rows)?)
            .i32(i32_of("inner", inner)?);
        self.gpu
            .launch(self.swiglu_fwd, grid1(rows), (256, 1, 1), 0, &a)
    }

    /// In place on both: `gu <- d(gu)` from `da`, and `da <- silu(g)·u` (the forward output,
    /// for W3's weight gradient).
    pub fn swiglu_bwd(&self, gu: u64, da: u64, rows: usize, inner: usize) -> Result<()> {
        let a = Args::new()
            .ptr(gu)
            .ptr(da)
            .i32(i32_of("rows", rows)?)
            .i32(i32_of("inner", inner)?);
        self.gpu
            .launch(self.swiglu_bwd, grid1(rows), (256, 1, 1), 0, &a)
    }

    pub fn cast_f32_bf16(&self, x: u64, y: u64, n: usize) -> Result<()> {
        let a = Args::new().ptr(x).ptr(y).i64(n as i64);
        self.gpu.launch(
            self.cast_f32_bf16,
            ew_grid(&self.gpu, n, 256),
            (256, 1, 1),
            0,
            &a,
        )
    }

    pub fn cast_bf16_f32(&self, x: u64, y: u64, n: usize) -> Result<()> {
        let a = Args::new().ptr(x).ptr(y).i64(n as i64);
        self.gpu.launch(
            self.cast_bf16_f32,
            ew_grid(&self.gpu, n, 256),
            (256, 1, 1),
            0,
            &a,
        )
    }

    pub fn scale_f32(&self, x: u64, n: usize, s: f32) -> Result<()> {
        let a = Args::new().ptr(x).i64(n as i64).f32(s);
        self.gpu.launch(
            self.scale_f32,
            ew_grid(&self.gpu, n, 256),
            (256, 1, 1),
            0,
            &a,
        )
    }

    /// Per-row smoothed cross-entropy of bf16 logits; if `write_grad`, logits become
    /// `grad_scale · dloss/dlogits` (bf16, in place).
    #[allow(clippy::too_many_arguments)]
    pub fn cross_entropy(
        &self,
        logits: u64,
        targets: u64,
        losses: u64,
        rows: usize,
        vocab: usize,
        smoothing: f32,
        grad_scale: f32,
        write_grad: bool,
    ) -> Result<()> {
        let a = Args::new()
            .ptr(logits)
            .ptr(targets)
            .ptr(losses)
            .i32(i32_of("rows", rows)?)
            .i32(i32_of("vocab", vocab)?)
            .f32(smoothing)
            .f32(grad_scale)
            .i32(write_grad as i32);
        self.gpu
            .launch(self.cross_entropy, grid1(rows), (512, 1, 1), 0, &a)
    }

    /// One fused AdamW step over the work items `t` of the flat buffers (`p`, `g`, `m` and
    /// the item offsets relative to the same element; `v` likewise, or the base of the
    /// compact buffer `t.voff` indexes); `hyper` holds 8 floats per group (see
    /// loss_optim.cu). The first `zeroed` items' gradients are zeroed after use, the others
    /// are left for a backward pass that overwrites them.
    #[allow(clippy::too_many_arguments)]
    pub fn adamw(
        &self,
        p: u64,
        g: u64,
        m: u64,
        v: u64,
        p_bf: u64,
        t: &OptChunkTables,
        zeroed: usize,
        hyper: u64,
        grad_mult: f32,
    ) -> Result<()> {
        let a = Args::new()
            .ptr(p)
            .ptr(g)
            .ptr(m)
            .ptr(v)
            .ptr(p_bf)
            .ptr(t.off)
            .ptr(t.len)
            .ptr(t.group)
            .ptr(t.gbf)
            .ptr(t.voff)
            .ptr(hyper)
            .f32(grad_mult)
            .i32(i32_of("AdamW chunks", zeroed.min(t.count))?);
        self.gpu
            .launch(self.adamw, grid1(t.count), (256, 1, 1), 0, &a)
    }

    /// `out[0] += Σ g²` over the gradients of the work items `t` (fp32, or bf16 where
    /// `t.gbf` says so), in fp64 (`out` must be zeroed).
    pub fn grad_sum_squares(&self, g: u64, t: &OptChunkTables, out: u64) -> Result<()> {
        if t.count == 0 {
            return Ok(());
        }
        let a = Args::new()
            .ptr(g)
            .ptr(t.off)
            .ptr(t.len)
            .ptr(t.gbf)
            .i32(i32_of("AdamW chunks", t.count)?)
            .ptr(out);
        // a few blocks per SM: one fp64 atomic per block, not per chunk
        let blocks = t.count.min(self.gpu.sm_count.max(1) as usize * 8);
        self.gpu
            .launch(self.grad_sum_squares, grid1(blocks), (256, 1, 1), 0, &a)
    }

    /// `out[0] += Σ x²` in fp64 (`out` must be zeroed).
    pub fn sum_squares(&self, x: u64, n: usize, out: u64) -> Result<()> {
        let a = Args::new().ptr(x).i64(n as i64).ptr(out);
        self.gpu.launch(
            self.sum_squares,
            ew_grid(&self.gpu, n, 256),
            (256, 1, 1),
            0,
            &a,
        )
    }

    /// Flash attention forward: writes O (bf16) and the log-sum-exp `[B, H, T]` (fp32).
    pub fn flash_fwd(
        &self,
        l: &AttnLayout,
        q: u64,
        k: u64,
        v: u64,
        o: u64,
        lse: u64,
    ) -> Result<()> {
        if let Some(k9) = self.hopper_kernels() {
            return self.flash_fwd_ws(k9, l, q, k, v, o, lse);
        }
        let kernel = by_head_dim(l.head_dim, [self.flash_fwd_64, self.flash_fwd_128])?;
        check_layout(l)?;
        let a = Args::new()
            .ptr(q)
            .ptr(k)
            .ptr(v)
            .ptr(o)
            .ptr(lse)
            .ptr(l.seg)
            .i32(i32_of("seq", l.seq)?)
            .i32(i32_of("heads", l.heads)?)
            .i32(i32_of("qpg", l.qpg)?)
            .i32(i32_of("q_row_stride", l.q_row_stride)?)
            .i32(i32_of("q_group_stride", l.q_group_stride)?)
            .i32(i32_of("kv_row_stride", l.kv_row_stride)?)
            .i32(i32_of("kv_group_stride", l.kv_group_stride)?)
            .i32(i32_of("o_row_stride", l.o_row_stride)?)
            .f32(l.scale * std::f32::consts::LOG2_E)
            .i32(i32_of("window", l.window)?);
        let grid = (
            l.seq.div_ceil(FLASH_BR) as u32,
            l.heads as u32,
            l.batch as u32,
        );
        self.gpu.launch(
            kernel,
            grid,
            (128, 1, 1),
            Self::flash_fwd_smem(l.head_dim) as u32,
            &a,
        )
    }

    /// The Hopper kernels when the current variant runs them.
    fn hopper_kernels(&self) -> Option<&FlashSm90> {
        self.flash_sm90
            .as_ref()
            .filter(|_| self.flash_variant().hopper())
    }

    /// The warp-specialised forward: Q, K and V reach the kernel as TMA tensor maps over the
    /// layout's strides (Q over (D, T, qpg, G, B), K and V over (D, T, G, B)); a layout whose
    /// strides TMA cannot express (not multiples of 16 bytes) is an error naming the stride.
    #[allow(clippy::too_many_arguments)]
    fn flash_fwd_ws(
        &self,
        k9: &FlashSm90,
        l: &AttnLayout,
        q: u64,
        k: u64,
        v: u64,
        o: u64,
        lse: u64,
    ) -> Result<()> {
        let kernel = by_head_dim(l.head_dim, [k9.fwd_64, k9.fwd_128])?;
        check_layout(l)?;
        let a = Args::new()
            .tensor_map(q_tensor_map(l, q, FLASH9_BR)?)
            .tensor_map(kv_tensor_map(l, k, FLASH9_BC)?)
            .tensor_map(kv_tensor_map(l, v, FLASH9_BC)?)
            .ptr(o)
            .ptr(lse)
            .ptr(l.seg)
            .i32(i32_of("seq", l.seq)?)
            .i32(i32_of("heads", l.heads)?)
            .i32(i32_of("qpg", l.qpg)?)
            .i32(i32_of("o_row_stride", l.o_row_stride)?)
            .f32(l.scale * std::f32::consts::LOG2_E)
            .i32(i32_of("window", l.window)?);
        let grid = (
            l.seq.div_ceil(FLASH9_BR) as u32,
            l.heads as u32,
            l.batch as u32,
        );
        self.gpu.launch(
            kernel,
            grid,
            (384, 1, 1),
            Self::flash_ws_smem(l.head_dim) as u32,
            &a,
        )
    }

    /// The warp-specialised backward's main kernel `kernel` (its d64 or d128 instance).
    /// `ptrs`: q, k, v, dout, lse, delta, dq_acc, dk, dv, rope cos, rope sin (0: no RoPE).
    fn flash_bwd_ws(&self, kernel: Kernel, l: &AttnLayout, ptrs: [u64; 11]) -> Result<()> {
        let [q, k, v, dout, lse, delta, dq_acc, dk, dv, cos, sin] = ptrs;
        let (d, t, b, heads) = (
            l.head_dim as u64,
            l.seq as u64,
            l.batch as u64,
            l.heads as u64,
        );
        let tm_do = TensorMap::bf16_swizzle128(
            dout,
            &[d, t, heads, b],
            &[
                bf16_bytes(l.o_row_stride),
                d * 2,
                t * bf16_bytes(l.o_row_stride),
            ],
            &[64, FLASH9_BWD_BR as u32, 1, 1],
        )?;
        let a = Args::new()
            .tensor_map(q_tensor_map(l, q, FLASH9_BWD_BR)?)
            .tensor_map(kv_tensor_map(l, k, FLASH_BWD_BC)?)
            .tensor_map(kv_tensor_map(l, v, FLASH_BWD_BC)?)
            .tensor_map(tm_do)
            .ptr(lse)
            .ptr(delta)
            .ptr(dq_acc)
            .ptr(dk)
            .ptr(dv)
            .ptr(l.seg)
            .i32(i32_of("seq", l.seq)?)
            .i32(i32_of("heads", l.heads)?)
            .i32(i32_of("qpg", l.qpg)?)
            .i32(i32_of("kv_row_stride", l.kv_row_stride)?)
            .i32(i32_of("kv_group_stride", l.kv_group_stride)?)
            .f32(l.scale)
            .f32(l.scale * std::f32::consts::LOG2_E)
            .i32(i32_of("window", l.window)?)
            .ptr(cos)
            .ptr(sin);
        let grid = (
            l.seq.div_ceil(FLASH_BWD_BC) as u32,
            l.groups() as u32,
            l.batch as u32,
        );
        let smem = Self::flash_ws_bwd_smem(l.head_dim) as u32;
        self.gpu.launch(kernel, grid, (384, 1, 1), smem, &a)
    }

    /// Flash attention backward. `dq_acc` is fp32 scratch of `batch·seq·heads·head_dim`;
    /// `delta` fp32 scratch of `batch·heads·seq`. dQ/dK/dV are written in q/k/v's layout at
    /// `dq`, `dk`, `dv` (dK, dV summed over each group's query heads). On Hopper `dq` must be
    /// 16-byte aligned (as q, k, v and dout must be for their TMA maps). With `rope` it also
    /// runs the RoPE backward of Q and K: dQ and dK leave inverse-rotated at position
    /// `row % seq` (as `rope_qkv` with sign -1 would turn them, but rounded to bf16 once
    /// instead of twice). dV is never rotated.
    #[allow(clippy::too_many_arguments)]
    pub fn flash_bwd(
        &self,
        l: &AttnLayout,
        q: u64,
        k: u64,
        v: u64,
        o: u64,
        dout: u64,
        lse: u64,
        dq: u64,
        dk: u64,
        dv: u64,
        dq_acc: u64,
        delta: u64,
        rope: Option<RopeTables>,
    ) -> Result<()> {
        let (cos, sin) = match rope {
            None => (0, 0),
            Some(r) => {
                if r.len < l.seq {
                    return Err(KernelError::Unsupported(format!(
                        "flash attention backward: RoPE tables of {} positions for seq {}",
                        r.len, l.seq
                    )));
                }
                if r.cos == 0 || r.sin == 0 || !(r.cos | r.sin).is_multiple_of(4) {
                    return Err(KernelError::Unsupported(format!(
                        "flash attention backward: RoPE tables at {:#x}, {:#x} are not \
                         4-byte aligned device pointers",
                        r.cos, r.sin
                    )));
                }
                (r.cos, r.sin)
            }
        };
        let sm90 = self.hopper_kernels();
        let kernel = match sm90 {
            None => by_head_dim(l.head_dim, [self.flash_bwd_64, self.flash_bwd_128])?,
            Some(k9) => by_head_dim(l.head_dim, [k9.bwd_64, k9.bwd_128])?,
        };
        check_layout(l)?;
        if sm90.is_some() && !dq.is_multiple_of(16) {
            return Err(KernelError::Unsupported(format!(
                "flash attention backward: dq at {dq:#x} is not 16-byte aligned (the Hopper dQ \
                 conversion writes 16-byte chunks)"
            )));
        }
        let rows = l.batch * l.seq;
        let d = l.head_dim;
        // delta = rowsum(dO ∘ O), dq_acc = 0: in one pass on Hopper (16-byte accesses: needs
        // 16-byte aligned o, dout, dq_acc), else a kernel and a memset.
        let prep = sm90
            .filter(|_| (o | dout | dq_acc).is_multiple_of(16))
            .map(|k9| k9.prep);
        if let Some(prep) = prep {
            let a = Args::new()
                .ptr(o)
                .ptr(dout)
                .ptr(delta)
                .ptr(dq_acc)
                .i32(i32_of("batch", l.batch)?)
                .i32(i32_of("seq", l.seq)?)
                .i32(i32_of("heads", l.heads)?)
                .i32(d as i32)
                .i32(i32_of("o_row_stride", l.o_row_stride)?);
            let threads = rows * l.heads * d / 8;
            self.gpu
                .launch(prep, grid1(threads.div_ceil(256)), (256, 1, 1), 0, &a)?;
        } else {
            let warps = rows * l.heads;
            let a = Args::new()
                .ptr(o)
                .ptr(dout)
                .ptr(delta)
                .i32(i32_of("batch", l.batch)?)
                .i32(i32_of("seq", l.seq)?)
                .i32(i32_of("heads", l.heads)?)
                .i32(d as i32)
                .i32(i32_of("o_row_stride", l.o_row_stride)?);
            self.gpu.launch(
                self.flash_delta,
                grid1(warps.div_ceil(8)),
                (256, 1, 1),
                0,
                &a,
            )?;
            self.gpu.memset_zero(dq_acc, rows * l.heads * d * 4)?;
        }
        if let Some(k9) = sm90 {
            self.flash_bwd_ws(
                kernel,
                l,
                [q, k, v, dout, lse, delta, dq_acc, dk, dv, cos, sin],
            )?;
            // dq_acc in the Hopper backward's blocked layout (flash_sm90.cu, flash_bwd_dq2_sm90).
            let a = Args::new()
                .ptr(dq_acc)
                .ptr(dq)
                .i32(i32_of("seq", l.seq)?)
                .i32(i32_of("heads", l.heads)?)
                .i32(d as i32)
                .i32(i32_of("qpg", l.qpg)?)
                .i32(i32_of("q_row_stride", l.q_row_stride)?)
                .i32(i32_of("q_group_stride", l.q_group_stride)?)
                .f32(l.scale)
                .ptr(cos)
                .ptr(sin);
            // with RoPE one block holds whole rows (both halves of a rotation pair)
            let parts = if cos != 0 { 1 } else { d / 64 };
            let grid = (
                (l.seq.div_ceil(64) * parts) as u32,
                l.heads as u32,
                l.batch as u32,
            );
            return self.gpu.launch(k9.dq, grid, (256, 1, 1), 0, &a);
        }
        let a = Args::new()
            .ptr(q)
            .ptr(k)
            .ptr(v)
            .ptr(dout)
            .ptr(lse)
            .ptr(delta)
            .ptr(dq_acc)
            .ptr(dk)
            .ptr(dv)
            .ptr(l.seg)
            .i32(i32_of("seq", l.seq)?)
            .i32(i32_of("heads", l.heads)?)
            .i32(i32_of("qpg", l.qpg)?)
            .i32(i32_of("q_row_stride", l.q_row_stride)?)
            .i32(i32_of("q_group_stride", l.q_group_stride)?)
            .i32(i32_of("kv_row_stride", l.kv_row_stride)?)
            .i32(i32_of("kv_group_stride", l.kv_group_stride)?)
            .i32(i32_of("o_row_stride", l.o_row_stride)?)
            .f32(l.scale)
            .f32(l.scale * std::f32::consts::LOG2_E)
            .i32(i32_of("window", l.window)?)
            .ptr(cos)
            .ptr(sin);
        let grid = (
            l.seq.div_ceil(FLASH_BWD_BC) as u32,
            l.groups() as u32,
            l.batch as u32,
        );
        self.gpu.launch(
            kernel,
            grid,
            (256, 1, 1),
            Self::flash_bwd_smem(d) as u32,
            &a,
        )?;
        let a = Args::new()
            .ptr(dq_acc)
            .ptr(dq)
            .i32(i32_of("rows", rows)?)
            .i32(i32_of("heads", l.heads)?)
            .i32(d as i32)
            .i32(i32_of("qpg", l.qpg)?)
            .i32(i32_of("q_row_stride", l.q_row_stride)?)
            .i32(i32_of("q_group_stride", l.q_group_stride)?)
            .f32(l.scale)
            .i32(i32_of("seq", l.seq)?)
            .ptr(cos)
            .ptr(sin);
        self.gpu
            .launch(self.flash_dq, grid1(rows), (256, 1, 1), 0, &a)
    }
}

/// The kernel of a (head_dim 64, head_dim 128) pair for `head_dim`.
fn by_head_dim(head_dim: usize, kernels: [Kernel; 2]) -> Result<Kernel> {
    match head_dim {
        64 => Ok(kernels[0]),
        128 => Ok(kernels[1]),
        d => Err(KernelError::Unsupported(format!(
            "flash attention supports head_dim 64 and 128, not {d}"
        ))),
    }
}

fn bf16_bytes(elems: usize) -> u64 {
    elems as u64 * 2
}

/// The TMA map of a layout's Q over (D, T, qpg, G, B), read `rows` queries at a time.
fn q_tensor_map(l: &AttnLayout, q: u64, rows: usize) -> Result<TensorMap> {
    let (d, t, b) = (l.head_dim as u64, l.seq as u64, l.batch as u64);
    TensorMap::bf16_swizzle128(
        q,
        &[d, t, l.qpg as u64, l.groups() as u64, b],
        &[
            bf16_bytes(l.q_row_stride),
            d * 2,
            bf16_bytes(l.q_group_stride),
            t * bf16_bytes(l.q_row_stride),
        ],
        &[64, rows as u32, 1, 1, 1],
    )
}

/// The TMA map of a layout's K or V over (D, T, G, B), read `rows` keys at a time.
fn kv_tensor_map(l: &AttnLayout, p: u64, rows: usize) -> Result<TensorMap> {
    let (d, t, b) = (l.head_dim as u64, l.seq as u64, l.batch as u64);
    TensorMap::bf16_swizzle128(
        p,
        &[d, t, l.groups() as u64, b],
        &[
            bf16_bytes(l.kv_row_stride),
            bf16_bytes(l.kv_group_stride),
            t * bf16_bytes(l.kv_row_stride),
        ],
        &[64, rows as u32, 1, 1],
    )
}

fn check_layout(l: &AttnLayout) -> Result<()> {
    if l.qpg == 0 || !l.heads.is_multiple_of(l.qpg) {
        return Err(KernelError::Unsupported(format!(
            "attention: {} heads not divisible into groups of {}",
            l.heads, l.qpg
        )));
    }
    for (name, s) in [
        ("q_row_stride", l.q_row_stride),
        ("kv_row_stride", l.kv_row_stride),
        ("o_row_stride", l.o_row_stride),
        ("q_group_stride", l.q_group_stride),
        ("kv_group_stride", l.kv_group_stride),
    ] {
        if s % 8 != 0 {
            return Err(KernelError::Unsupported(format!(
                "attention: {name} = {s} must be a multiple of 8 elements"
            )));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Hybrid and SSM families (mamba.cu, hybrid.cu): loaded separately from `Ops` so the
// Transformer++ path compiles none of them.

/// Mamba-1 d_state the scan kernels are built for.
pub const SCAN_D_STATE: usize = 16;
/// Steps the scan kernels stage together (forward chunk, backward interval).
pub const SCAN_CKPT: usize = 32;
/// Spacing (steps) of the scan forward's state checkpoints (mamba.cu `SCAN_CKPT_EVERY`):
/// one per backward sub-chunk, so the backward never walks a sub-chunk only to find its
/// starting state.
pub const SCAN_CKPT_EVERY: usize = 16;
const SCAN_SUB: usize = 16;
/// Channels per block of the split-state scan kernels (4 lanes per channel: 128 threads).
const SCAN_SPLIT_CH: usize = 32;
const SCAN_SPLIT_THREADS: usize = 128;
/// Resident blocks per SM of the 4-lane scan kernels (the backward's 54 KB shared memory,
/// <= 128 registers).
const SCAN_BLOCKS_PER_SM: usize = 4;
/// Default share (percent of the checkpoint intervals) of the first T segment when the scan
/// backward splits T; that segment also walks λ alone over the second one.
const SCAN_TSPLIT_PCT: u32 = 45;
/// Dynamic shared memory of `selective_scan_bwd_split` (must match mamba.cu's carve-up: the
/// states before and after each step of a sub-chunk, B/C of an interval, one float4 per step
/// and channel).
const SCAN_SPLIT_BWD_SMEM: usize = ((SCAN_SUB + 1) * SCAN_SPLIT_CH * SCAN_D_STATE
    + SCAN_CKPT * 2 * SCAN_D_STATE
    + 4 * SCAN_CKPT * SCAN_SPLIT_CH)
    * 4;
/// Rows walked by one warp of the conv kernels (mamba.cu's CONV_RUN) and warps per block.
const CONV_RUN: usize = 64;
const CONV_FWD_WARPS: usize = 4;
const CONV_BWD_WARPS: usize = 8;
/// bf16 elements per thread of the GMU kernels (one 16-byte access; hybrid.cu's GMU_VEC).
const GMU_VEC: usize = 8;
const GMU_ROWS_PER_THREAD: usize = 4;
const BIAS_RUN: usize = 128;
/// Widest differential-attention pair vector (2·head_size) diff_combine handles.
pub const DA_MAX_WIDTH: usize = 512;

/// Every kernel of the hybrid modules: (module, kernel).
pub const HYBRID_KERNELS: &[(&str, &str)] = &[
    ("mamba", "conv1d_silu_fwd"),
    ("mamba", "conv1d_silu_bwd"),
    ("mamba", "scan_bc_grad_out"),
    ("mamba", "selective_scan_fwd_split"),
    ("mamba", "selective_scan_fwd_split8"),
    ("mamba", "selective_scan_bwd_split"),
    ("hybrid", "layernorm_fwd"),
    ("hybrid", "layernorm_bwd"),
    ("hybrid", "gmu_fwd"),
    ("hybrid", "gmu_bwd"),
    ("hybrid", "da_lambda_fwd"),
    ("hybrid", "da_lambda_bwd"),
    ("hybrid", "diff_combine_fwd"),
    ("hybrid", "diff_combine_bwd"),
    ("hybrid", "bias_add_bf16"),
    ("hybrid", "bias_add_f32"),
    ("hybrid", "bias_grad"),
    ("hybrid", "copy_heads"),
    ("mamba", "mamba_pad_weights"),
    ("hybrid", "kv_grad_add"),
];

/// A device tensor of rows: base pointer and row stride in elements.
#[derive(Clone, Copy, Debug)]
pub struct Rows {
    pub ptr: u64,
    pub stride: usize,
}

impl Rows {
    pub fn new(ptr: u64, stride: usize) -> Rows {
        Rows { ptr, stride }
    }
}

/// Every row of a bf16 tensor starts 16-byte aligned (base and row stride).
fn rows_16b_aligned(t: &Rows) -> bool {
    t.ptr.is_multiple_of(16) && t.stride.is_multiple_of(8)
}

/// The conv kernels take two channels per thread (4-byte bf16x2 accesses) when `d` is even
/// and every tensor's base and row stride keep each row 4-byte aligned.
fn conv_pairs(d: usize, tensors: &[Rows]) -> bool {
    d.is_multiple_of(2)
        && tensors
            .iter()
            .all(|t| t.ptr.is_multiple_of(4) && t.stride.is_multiple_of(2))
}

fn opt_rows(r: Option<Rows>) -> (u64, usize) {
    r.map_or((0, 0), |r| (r.ptr, r.stride))
}

/// Scan problem: `batch` rows of `seq` tokens, `d_inner` channels, d_state = [`SCAN_D_STATE`].
#[derive(Clone, Copy, Debug)]
pub struct ScanShape {
    pub batch: usize,
    pub seq: usize,
    pub d_inner: usize,
}

impl ScanShape {
    pub fn rows(&self) -> usize {
        self.batch * self.seq
    }
    /// fp32 elements of the forward's state checkpoints (`[B, ceil(T/SCAN_CKPT_EVERY), D, N]`).
    pub fn ckpt_len(&self) -> usize {
        self.batch * self.seq.div_ceil(SCAN_CKPT_EVERY) * SCAN_D_STATE * self.d_inner
    }
    /// fp32 elements of the backward's dB/dC accumulator (`[rows, 2N]`).
    pub fn bc_acc_len(&self) -> usize {
        self.rows() * 2 * SCAN_D_STATE
    }
}

/// Inputs of the selective scan (bf16 activations, fp32 parameters), as the CPU op's
/// `ScanInputs`: `delta` is before bias and softplus; `z` (optional) is the SiLU gate;
/// `b` and `c` share one row stride (`x_proj`'s output); `seg` the varlen document starts
/// (i32 `[rows]`).
#[derive(Clone, Copy, Debug)]
pub struct ScanTensors {
    pub x: Rows,
    pub delta: Rows,
    pub z: Option<Rows>,
    pub b: Rows,
    pub c: Rows,
    pub delta_bias: u64,
    pub a_log: u64,
    pub d_skip: u64,
    pub seg: Option<u64>,
}

/// Gradients written (bf16 activations) or added (fp32 parameters) by the scan backward.
#[derive(Clone, Copy, Debug)]
pub struct ScanGrads {
    pub x: Rows,
    /// Pre-softplus (the `dt_proj` output's gradient, bias included).
    pub delta: Rows,
    pub z: Option<Rows>,
    pub b: Rows,
    pub c: Rows,
    pub delta_bias: u64,
    pub a_log: u64,
    pub d_skip: u64,
}

/// `ARCHSCALE_SCAN_KERNEL` once chose the scan backward; `split` (forward v3, backward v4)
/// is the only kernel set since the v3 backward (`split3`) was retired 2026-11-29
/// (bench/NOTES.md, "Retired kernel variants"). Any other value is an error.
fn check_scan_kernel_setting(value: Option<&str>) -> Result<()> {
    match value {
        None | Some("") | Some("split") => Ok(()),
        Some(other) => {
            let why = if other == "split3" {
                "the v3 scan backward was retired 2026-11-29 (bench/NOTES.md, \"Retired kernel \
                 variants\")"
            } else {
                "not a scan kernel set"
            };
            Err(KernelError::Unsupported(format!(
                "ARCHSCALE_SCAN_KERNEL={other}: {why}; the only choice left is split (or leave \
                 it unset)"
            )))
        }
    }
}

/// `ARCHSCALE_SCAN_FWD_LANES`: lanes per channel of the scan forward, 4 or 8 (unset: by the
/// grid, [`HybridOps::scan_fwd_lanes`]).
fn scan_fwd_lanes_from_env() -> Result<Option<usize>> {
    match std::env::var("ARCHSCALE_SCAN_FWD_LANES").ok().as_deref() {
        None | Some("") => Ok(None),
        Some("4") => Ok(Some(4)),
        Some("8") => Ok(Some(8)),
        Some(v) => Err(KernelError::Unsupported(format!(
            "ARCHSCALE_SCAN_FWD_LANES={v}: expected 4 or 8 (or unset: chosen by the grid)"
        ))),
    }
}

/// The first T segment's share (percent of the checkpoint intervals) when the scan backward
/// may split T: `ARCHSCALE_SCAN_TSPLIT` (0 = never split, 1..=99), else the default.
fn scan_tsplit_from_env() -> Result<u32> {
    match std::env::var("ARCHSCALE_SCAN_TSPLIT").ok().as_deref() {
        None | Some("") => Ok(SCAN_TSPLIT_PCT),
        Some(v) => match v.parse::<u32>() {
            Ok(p) if p < 100 => Ok(p),
            _ => Err(KernelError::Unsupported(format!(
                "ARCHSCALE_SCAN_TSPLIT={v}: expected a percent 0..=99 (0: no T split)"
            ))),
        },
    }
}

/// What [`HybridOps::kv_grad_add`] does with a YOCO K/V gradient.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvGradMode {
    /// `acc += dqkv` (a cross-attention layer's dK/dV).
    Add = 0,
    /// `acc = dqkv` (the first cross-attention layer of the backward pass).
    Overwrite = 1,
    /// `dqkv = bf16(dqkv + acc)` (the exporter's own dK/dV joins the sum).
    Export = 2,
}

pub struct HybridOps {
    pub gpu: Arc<Gpu>,
    /// First T segment's share (percent of checkpoint intervals) when the default scan
    /// backward splits T; 0 never splits ([`HybridOps::scan_bwd_segments`]).
    pub scan_tsplit_pct: u32,
    /// Lanes per channel of the scan forward forced by `ARCHSCALE_SCAN_FWD_LANES` (4 or 8);
    /// `None`: [`HybridOps::scan_fwd_lanes`] decides by the grid.
    pub scan_fwd_lanes_set: Option<usize>,
    conv_fwd: Kernel,
    conv_bwd: Kernel,
    scan_fwd_split: Kernel,
    scan_fwd_split8: Kernel,
    scan_bwd_split: Kernel,
    scan_bc_out: Kernel,
    layernorm_fwd: Kernel,
    layernorm_bwd: Kernel,
    gmu_fwd: Kernel,
    gmu_bwd: Kernel,
    da_lambda_fwd: Kernel,
    da_lambda_bwd: Kernel,
    diff_fwd: Kernel,
    diff_bwd: Kernel,
    bias_add_bf16: Kernel,
    bias_add_f32: Kernel,
    bias_grad: Kernel,
    copy_heads: Kernel,
    pad_weights: Kernel,
    kv_grad_add: Kernel,
}

impl HybridOps {
    /// Compiles (or loads from the cache) and loads the mamba and hybrid modules.
    pub fn new(gpu: Arc<Gpu>) -> Result<HybridOps> {
        check_scan_kernel_setting(std::env::var("ARCHSCALE_SCAN_KERNEL").ok().as_deref())?;
        let load = |module: &str, name: &'static str| gpu.module_kernel(module, name);
        let ops = HybridOps {
            conv_fwd: load("mamba", "conv1d_silu_fwd")?,
            conv_bwd: load("mamba", "conv1d_silu_bwd")?,
            scan_fwd_split: load("mamba", "selective_scan_fwd_split")?,
            scan_bwd_split: load("mamba", "selective_scan_bwd_split")?,
            scan_tsplit_pct: scan_tsplit_from_env()?,
            scan_fwd_lanes_set: scan_fwd_lanes_from_env()?,
            scan_fwd_split8: load("mamba", "selective_scan_fwd_split8")?,
            scan_bc_out: load("mamba", "scan_bc_grad_out")?,
            layernorm_fwd: load("hybrid", "layernorm_fwd")?,
            layernorm_bwd: load("hybrid", "layernorm_bwd")?,
            gmu_fwd: load("hybrid", "gmu_fwd")?,
            gmu_bwd: load("hybrid", "gmu_bwd")?,
            da_lambda_fwd: load("hybrid", "da_lambda_fwd")?,
            da_lambda_bwd: load("hybrid", "da_lambda_bwd")?,
            diff_fwd: load("hybrid", "diff_combine_fwd")?,
            diff_bwd: load("hybrid", "diff_combine_bwd")?,
            bias_add_bf16: load("hybrid", "bias_add_bf16")?,
            bias_add_f32: load("hybrid", "bias_add_f32")?,
            bias_grad: load("hybrid", "bias_grad")?,
            copy_heads: load("hybrid", "copy_heads")?,
            pad_weights: load("mamba", "mamba_pad_weights")?,
            kv_grad_add: load("hybrid", "kv_grad_add")?,
            gpu,
        };
        ops.gpu
            .set_max_dynamic_smem(ops.scan_bwd_split, SCAN_SPLIT_BWD_SMEM)?;
        Ok(ops)
    }

    fn ew(&self, n: usize) -> (u32, u32, u32) {
        ew_grid(&self.gpu, n, 256)
    }

    /// The Mamba x_proj weight `wx` (bf16 `[r + 2·ns, d]`) and dt_proj weight `wdt` (bf16
    /// `[d, r]`) in the layouts with the dt rank padded to `rp` by zeros: `wx_pad`
    /// `[rp + 2·ns, d]` (zero rows r..rp) and `wdt_pad` `[d, rp]` (zero columns r..rp).
    #[allow(clippy::too_many_arguments)]
    pub fn mamba_pad_weights(
        &self,
        wx: u64,
        wdt: u64,
        wx_pad: u64,
        wdt_pad: u64,
        r: usize,
        rp: usize,
        ns: usize,
        d: usize,
    ) -> Result<()> {
        if rp < r || !rp.is_multiple_of(8) {
            return Err(KernelError::Unsupported(format!(
                "mamba_pad_weights: padded dt rank {rp} must be a multiple of 8 and at least {r}"
            )));
        }
        let n = (rp + 2 * ns) * d + d * rp;
        i32_of("padded x_proj and dt_proj elements", n)?;
        let a = Args::new()
            .ptr(wx)
            .ptr(wdt)
            .ptr(wx_pad)
            .ptr(wdt_pad)
            .i32(i32_of("dt rank", r)?)
            .i32(i32_of("padded dt rank", rp)?)
            .i32(i32_of("d_state", ns)?)
            .i32(i32_of("d_inner", d)?);
        self.gpu
            .launch(self.pad_weights, self.ew(n), (256, 1, 1), 0, &a)
    }

    /// Causal depthwise conv (k = 4) + SiLU: `y = bf16(silu(bias + Σ_j w[:, j]·x[t−3+j]))`.
    /// `w`: fp32 `[d, 4]`; `bias`: fp32 `[d]`; `seg`: varlen document starts (i32 `[rows]`).
    #[allow(clippy::too_many_arguments)]
    pub fn conv1d_silu_fwd(
        &self,
        x: Rows,
        w: u64,
        bias: u64,
        seg: Option<u64>,
        y: Rows,
        batch: usize,
        seq: usize,
        d: usize,
    ) -> Result<()> {
        let rows = batch * seq;
        if rows == 0 || d == 0 {
            return Ok(());
        }
        let pairs = conv_pairs(d, &[x, y]);
        let a = Args::new()
            .ptr(x.ptr)
            .i32(i32_of("x stride", x.stride)?)
            .ptr(w)
            .ptr(bias)
            .ptr(seg.unwrap_or(0))
            .ptr(y.ptr)
            .i32(i32_of("y stride", y.stride)?)
            .i32(i32_of("rows", rows)?)
            .i32(i32_of("seq", seq)?)
            .i32(i32_of("d", d)?)
            .i32(pairs as i32);
        let col_blocks = d.div_ceil(if pairs { 64 } else { 32 });
        let runs = rows.div_ceil(CONV_RUN);
        // A warp per run; past about 64 blocks per SM, runs grid-stride over blockIdx.y.
        let row_blocks = runs
            .div_ceil(CONV_FWD_WARPS)
            .min((self.gpu.sm_count.max(1) as usize * 64).div_ceil(col_blocks))
            .clamp(1, 65535);
        self.gpu.launch(
            self.conv_fwd,
            (col_blocks as u32, row_blocks as u32, 1),
            (32 * CONV_FWD_WARPS as u32, 1, 1),
            0,
            &a,
        )
    }

    /// Backward of [`Self::conv1d_silu_fwd`] from `dy` (the SiLU output's gradient): writes
    /// `dx` (bf16), adds into `dw` `[d, 4]` and `dbias` `[d]` (fp32).
    #[allow(clippy::too_many_arguments)]
    pub fn conv1d_silu_bwd(
        &self,
        x: Rows,
        w: u64,
        bias: u64,
        seg: Option<u64>,
        dy: Rows,
        dx: Rows,
        dw: u64,
        dbias: u64,
        batch: usize,
        seq: usize,
        d: usize,
    ) -> Result<()> {
        let rows = batch * seq;
        if rows == 0 || d == 0 {
            return Ok(());
        }
        let pairs = conv_pairs(d, &[x, dy, dx]);
        let a = Args::new()
            .ptr(x.ptr)
            .i32(i32_of("x stride", x.stride)?)
            .ptr(w)
            .ptr(bias)
            .ptr(seg.unwrap_or(0))
            .ptr(dy.ptr)
            .i32(i32_of("dy stride", dy.stride)?)
            .ptr(dx.ptr)
            .i32(i32_of("dx stride", dx.stride)?)
            .ptr(dw)
            .ptr(dbias)
            .i32(i32_of("rows", rows)?)
            .i32(i32_of("seq", seq)?)
            .i32(i32_of("d", d)?)
            .i32(pairs as i32);
        let col_blocks = d.div_ceil(if pairs { 64 } else { 32 });
        let row_blocks = rows.div_ceil(CONV_BWD_WARPS * CONV_RUN);
        if row_blocks > 65535 {
            return Err(KernelError::Unsupported(format!(
                "conv1d backward: {rows} rows exceed one grid column ({} rows)",
                65535 * CONV_BWD_WARPS * CONV_RUN
            )));
        }
        self.gpu.launch(
            self.conv_bwd,
            (col_blocks as u32, row_blocks as u32, 1),
            (32 * CONV_BWD_WARPS as u32, 1, 1),
            0,
            &a,
        )
    }

    fn scan_args(&self, s: &ScanShape, t: &ScanTensors) -> Result<Args> {
        if t.b.stride != t.c.stride {
            return Err(KernelError::Unsupported(format!(
                "selective scan: B and C need one row stride ({} vs {})",
                t.b.stride, t.c.stride
            )));
        }
        if s.d_inner == 0 || s.seq == 0 {
            return Err(KernelError::Unsupported(
                "selective scan: empty sequence or no channels".into(),
            ));
        }
        i32_of("rows", s.rows())?;
        let (z, sz) = opt_rows(t.z);
        Ok(Args::new()
            .ptr(t.x.ptr)
            .i32(i32_of("x stride", t.x.stride)?)
            .ptr(t.delta.ptr)
            .i32(i32_of("delta stride", t.delta.stride)?)
            .ptr(z)
            .i32(i32_of("z stride", sz)?)
            .ptr(t.b.ptr)
            .ptr(t.c.ptr)
            .i32(i32_of("B/C stride", t.b.stride)?)
            .ptr(t.delta_bias)
            .ptr(t.a_log)
            .ptr(t.d_skip)
            .ptr(t.seg.unwrap_or(0)))
    }

    /// Selective scan forward: `out = y ⊙ silu(z)` (or `y` without `z`), optionally the
    /// pre-gate `y` (GMU memory) and the state checkpoints the backward pass needs
    /// (`ckpt`: fp32 of [`ScanShape::ckpt_len`]).
    pub fn selective_scan_fwd(
        &self,
        s: &ScanShape,
        t: &ScanTensors,
        out: Rows,
        y_out: Option<Rows>,
        ckpt: Option<u64>,
    ) -> Result<()> {
        let lanes = self.scan_fwd_lanes(s);
        self.selective_scan_fwd_with(lanes, s, t, out, y_out, ckpt)
    }

    /// Lanes per channel of the scan forward for shape `s`: 8 (2 states per lane, twice the
    /// warps) when the 4-lane grid would fill at most half of its 4-per-SM block slots (SambaY
    /// d8 at micro 4: 248 blocks on 132 SMs), else 4; `ARCHSCALE_SCAN_FWD_LANES` overrides.
    pub fn scan_fwd_lanes(&self, s: &ScanShape) -> usize {
        if let Some(l) = self.scan_fwd_lanes_set {
            return l;
        }
        if self.scan_grid_is_small(s) {
            8
        } else {
            4
        }
    }

    /// Whether the scan's grid (one block per 32 channels and sequence) fills at most half of
    /// the GPU's block slots at 4 blocks per SM: then the forward takes 8 lanes per channel
    /// and the backward splits T.
    fn scan_grid_is_small(&self, s: &ScanShape) -> bool {
        let blocks = s.d_inner.div_ceil(SCAN_SPLIT_CH) * s.batch;
        2 * blocks <= self.gpu.sm_count.max(1) as usize * SCAN_BLOCKS_PER_SM
    }

    /// [`Self::selective_scan_fwd`] with the lanes per channel (4 or 8) chosen by the caller.
    pub fn selective_scan_fwd_with(
        &self,
        lanes: usize,
        s: &ScanShape,
        t: &ScanTensors,
        out: Rows,
        y_out: Option<Rows>,
        ckpt: Option<u64>,
    ) -> Result<()> {
        let kernel = match lanes {
            4 => self.scan_fwd_split,
            8 => self.scan_fwd_split8,
            _ => {
                return Err(KernelError::Unsupported(format!(
                    "selective scan forward: {lanes} lanes per channel (4 or 8)"
                )))
            }
        };
        let (yp, sy) = opt_rows(y_out);
        let a = self
            .scan_args(s, t)?
            .ptr(out.ptr)
            .i32(i32_of("out stride", out.stride)?)
            .ptr(yp)
            .i32(i32_of("y stride", sy)?)
            .ptr(ckpt.unwrap_or(0))
            .i32(i32_of("seq", s.seq)?)
            .i32(i32_of("d_inner", s.d_inner)?);
        let grid = (s.d_inner.div_ceil(SCAN_SPLIT_CH) as u32, s.batch as u32, 1);
        self.gpu
            .launch(kernel, grid, ((SCAN_SPLIT_CH * lanes) as u32, 1, 1), 0, &a)
    }

    /// Selective scan backward from `dout` (the gated output's gradient) and optionally
    /// `dy_extra` (a gradient on the pre-gate `y`, from GMU layers). Needs the forward's
    /// `ckpt`; `bc_acc` is fp32 scratch of [`ScanShape::bc_acc_len`]. Activation gradients
    /// are written (bf16); parameter gradients added (fp32).
    #[allow(clippy::too_many_arguments)]
    pub fn selective_scan_bwd(
        &self,
        s: &ScanShape,
        t: &ScanTensors,
        ckpt: u64,
        dout: Rows,
        dy_extra: Option<Rows>,
        g: &ScanGrads,
        bc_acc: u64,
    ) -> Result<()> {
        self.selective_scan_bwd_with(self.scan_tsplit_pct, s, t, ckpt, dout, dy_extra, g, bc_acc)
    }

    /// T segments of the scan backward and the first checkpoint interval of the
    /// second (0: one segment). Splits in two when the unsplit grid fills at most half the
    /// resident block slots (SambaY d8: 248 blocks for 528 on an H200), so the idle slots
    /// run the second half of T; `pct` is the first segment's share of the intervals (it
    /// also walks λ over the second one), 0 never splits.
    pub fn scan_bwd_segments(&self, s: &ScanShape, pct: u32) -> (u32, i32) {
        let nck = s.seq.div_ceil(SCAN_CKPT);
        if pct == 0 || nck < 2 || !self.scan_grid_is_small(s) {
            return (1, 0);
        }
        let first = (nck * pct as usize / 100).clamp(1, nck - 1);
        (2, first as i32)
    }

    /// [`Self::selective_scan_bwd`] with the T split share `pct` chosen by the caller (see
    /// [`Self::scan_bwd_segments`]).
    #[allow(clippy::too_many_arguments)]
    pub fn selective_scan_bwd_with(
        &self,
        pct: u32,
        s: &ScanShape,
        t: &ScanTensors,
        ckpt: u64,
        dout: Rows,
        dy_extra: Option<Rows>,
        g: &ScanGrads,
        bc_acc: u64,
    ) -> Result<()> {
        if g.b.stride != g.c.stride {
            return Err(KernelError::Unsupported(
                "selective scan: dB and dC need one row stride".into(),
            ));
        }
        if t.z.is_some() != g.z.is_some() {
            return Err(KernelError::Unsupported(
                "selective scan: z and dz must both be given or both absent".into(),
            ));
        }
        self.gpu.memset_zero(bc_acc, s.bc_acc_len() * 4)?;
        let (ep, se) = opt_rows(dy_extra);
        let (dzp, sdz) = opt_rows(g.z);
        let a = self
            .scan_args(s, t)?
            .ptr(ckpt)
            .ptr(dout.ptr)
            .i32(i32_of("dout stride", dout.stride)?)
            .ptr(ep)
            .i32(i32_of("dy_extra stride", se)?)
            .ptr(g.x.ptr)
            .i32(i32_of("dx stride", g.x.stride)?)
            .ptr(g.delta.ptr)
            .i32(i32_of("ddelta stride", g.delta.stride)?)
            .ptr(dzp)
            .i32(i32_of("dz stride", sdz)?)
            .ptr(bc_acc)
            .ptr(g.a_log)
            .ptr(g.d_skip)
            .ptr(g.delta_bias)
            .i32(i32_of("seq", s.seq)?)
            .i32(i32_of("d_inner", s.d_inner)?);
        let (segments, ck_split) = self.scan_bwd_segments(s, pct);
        let a = a.i32(ck_split);
        let grid = (
            s.d_inner.div_ceil(SCAN_SPLIT_CH) as u32,
            s.batch as u32,
            segments,
        );
        self.gpu.launch(
            self.scan_bwd_split,
            grid,
            (SCAN_SPLIT_THREADS as u32, 1, 1),
            SCAN_SPLIT_BWD_SMEM as u32,
            &a,
        )?;
        let rows = s.rows();
        let a = Args::new()
            .ptr(bc_acc)
            .ptr(g.b.ptr)
            .ptr(g.c.ptr)
            .i32(i32_of("dB/dC stride", g.b.stride)?)
            .i32(i32_of("rows", rows)?);
        self.gpu.launch(
            self.scan_bc_out,
            self.ew(rows * 2 * SCAN_D_STATE),
            (256, 1, 1),
            0,
            &a,
        )
    }

    /// LayerNorm of fp32 rows: `y = bf16((x − μ)·rstd·γ + β)`; saves `mean`, `rstd` (fp32
    /// `[rows]`, either may be 0 = not stored).
    #[allow(clippy::too_many_arguments)]
    pub fn layernorm_fwd(
        &self,
        x: u64,
        gamma: u64,
        beta: u64,
        y: u64,
        mean: u64,
        rstd: u64,
        rows: usize,
        n: usize,
        eps: f32,
    ) -> Result<()> {
        let a = Args::new()
            .ptr(x)
            .ptr(gamma)
            .ptr(beta)
            .ptr(y)
            .ptr(mean)
            .ptr(rstd)
            .i32(i32_of("rows", rows)?)
            .i32(i32_of("n", n)?)
            .f32(eps);
        self.gpu
            .launch(self.layernorm_fwd, grid1(rows), (256, 1, 1), 0, &a)
    }

    /// LayerNorm backward from bf16 `dy`: `dres (+)= dx` (fp32), `dres_bf = bf16(dres)` (0 =
    /// skip), `dgamma += Σ dy·x̂`, `dbeta += Σ dy`.
    #[allow(clippy::too_many_arguments)]
    pub fn layernorm_bwd(
        &self,
        x: u64,
        gamma: u64,
        mean: u64,
        rstd: u64,
        dy: u64,
        dres: u64,
        dres_bf: u64,
        dgamma: u64,
        dbeta: u64,
        rows: usize,
        n: usize,
        accumulate: bool,
    ) -> Result<()> {
        let smem = 2 * n * 4;
        if smem > 48 * 1024 {
            return Err(KernelError::Unsupported(format!(
                "layernorm_bwd: width {n} exceeds 6144"
            )));
        }
        let a = Args::new()
            .ptr(x)
            .ptr(gamma)
            .ptr(mean)
            .ptr(rstd)
            .ptr(dy)
            .ptr(dres)
            .ptr(dres_bf)
            .ptr(dgamma)
            .ptr(dbeta)
            .i32(i32_of("rows", rows)?)
            .i32(i32_of("n", n)?)
            .i32(accumulate as i32);
        let blocks = rows.min(self.gpu.sm_count.max(1) as usize * 4);
        self.gpu.launch(
            self.layernorm_bwd,
            grid1(blocks),
            (256, 1, 1),
            smem as u32,
            &a,
        )
    }

    /// Grid and block of the GMU kernels: a thread per [`GMU_VEC`] consecutive elements of a
    /// row (blockIdx.x), rows strided by gridDim.y: about [`GMU_ROWS_PER_THREAD`] rows per
    /// thread, so blocks are short and the last wave's tail small.
    fn gmu_launch_dims(&self, rows: usize, width: usize) -> ((u32, u32, u32), (u32, u32, u32)) {
        let groups = width.div_ceil(GMU_VEC);
        let threads = groups.next_multiple_of(32).min(128);
        let gx = groups.div_ceil(threads);
        let gy = rows.div_ceil(GMU_ROWS_PER_THREAD).clamp(1, 65535);
        ((gx as u32, gy as u32, 1), (threads as u32, 1, 1))
    }

    /// GMU gate `out = bf16(m ⊙ silu(g))` over `rows × width`.
    pub fn gmu_fwd(&self, m: Rows, g: Rows, out: Rows, rows: usize, width: usize) -> Result<()> {
        if rows == 0 || width == 0 {
            return Ok(());
        }
        let vec = [m, g, out].iter().all(rows_16b_aligned);
        let a = Args::new()
            .ptr(m.ptr)
            .i32(i32_of("m stride", m.stride)?)
            .ptr(g.ptr)
            .i32(i32_of("g stride", g.stride)?)
            .ptr(out.ptr)
            .i32(i32_of("out stride", out.stride)?)
            .i32(i32_of("rows", rows)?)
            .i32(i32_of("width", width)?)
            .i32(vec as i32);
        let (grid, block) = self.gmu_launch_dims(rows, width);
        self.gpu.launch(self.gmu_fwd, grid, block, 0, &a)
    }

    /// GMU backward: `dm += dout ⊙ silu(g)` (fp32 `[rows, width]`, summed over GMU layers),
    /// `dg = bf16(dout ⊙ m ⊙ silu'(g))`.
    #[allow(clippy::too_many_arguments)]
    pub fn gmu_bwd(
        &self,
        m: Rows,
        g: Rows,
        dout: Rows,
        dm: u64,
        dg: Rows,
        rows: usize,
        width: usize,
    ) -> Result<()> {
        if rows == 0 || width == 0 {
            return Ok(());
        }
        // dm's rows (stride width, fp32) start 16-byte aligned when width % 4 == 0.
        let vec = [m, g, dout, dg].iter().all(rows_16b_aligned)
            && dm.is_multiple_of(16)
            && width.is_multiple_of(4);
        let a = Args::new()
            .ptr(m.ptr)
            .i32(i32_of("m stride", m.stride)?)
            .ptr(g.ptr)
            .i32(i32_of("g stride", g.stride)?)
            .ptr(dout.ptr)
            .i32(i32_of("dout stride", dout.stride)?)
            .ptr(dm)
            .ptr(dg.ptr)
            .i32(i32_of("dg stride", dg.stride)?)
            .i32(i32_of("rows", rows)?)
            .i32(i32_of("width", width)?)
            .i32(vec as i32);
        let (grid, block) = self.gmu_launch_dims(rows, width);
        self.gpu.launch(self.gmu_bwd, grid, block, 0, &a)
    }

    /// Differential attention λ: `lam[0..3] = (λ, exp(λq1·λk1), exp(λq2·λk2))`; `lam` holds 4
    /// floats (the 4th is the dλ accumulator of the backward).
    #[allow(clippy::too_many_arguments)]
    pub fn da_lambda_fwd(
        &self,
        q1: u64,
        k1: u64,
        q2: u64,
        k2: u64,
        lam: u64,
        head_size: usize,
        lambda_init: f32,
    ) -> Result<()> {
        let a = Args::new()
            .ptr(q1)
            .ptr(k1)
            .ptr(q2)
            .ptr(k2)
            .ptr(lam)
            .i32(i32_of("head_size", head_size)?)
            .f32(lambda_init);
        self.gpu
            .launch(self.da_lambda_fwd, (1, 1, 1), (128, 1, 1), 0, &a)
    }

    /// Adds the λ-vector gradients from the dλ that [`Self::diff_combine_bwd`] accumulated.
    #[allow(clippy::too_many_arguments)]
    pub fn da_lambda_bwd(
        &self,
        q1: u64,
        k1: u64,
        q2: u64,
        k2: u64,
        lam: u64,
        grads: [u64; 4],
        head_size: usize,
    ) -> Result<()> {
        let a = Args::new()
            .ptr(q1)
            .ptr(k1)
            .ptr(q2)
            .ptr(k2)
            .ptr(lam)
            .ptr(grads[0])
            .ptr(grads[1])
            .ptr(grads[2])
            .ptr(grads[3])
            .i32(i32_of("head_size", head_size)?);
        self.gpu
            .launch(self.da_lambda_bwd, (1, 1, 1), (128, 1, 1), 0, &a)
    }

    fn check_da_width(w: usize) -> Result<()> {
        if w == 0 || w > DA_MAX_WIDTH {
            return Err(KernelError::Unsupported(format!(
                "differential attention: pair width 2·head_size = {w} outside 1..={DA_MAX_WIDTH}"
            )));
        }
        Ok(())
    }

    /// Differential attention combine over `vectors` (row, pair) vectors of width `w = 2hs`
    /// (contiguous, bf16): `out = RMSNorm_w(o1 − λ·o2; γ, eps)·post`, saving `rstd`.
    #[allow(clippy::too_many_arguments)]
    pub fn diff_combine_fwd(
        &self,
        o1: u64,
        o2: u64,
        lam: u64,
        gamma: u64,
        out: u64,
        rstd: u64,
        vectors: usize,
        w: usize,
        eps: f32,
        post: f32,
    ) -> Result<()> {
        Self::check_da_width(w)?;
        let a = Args::new()
            .ptr(o1)
            .ptr(o2)
            .ptr(lam)
            .ptr(gamma)
            .ptr(out)
            .ptr(rstd)
            .i32(i32_of("vectors", vectors)?)
            .i32(w as i32)
            .f32(eps)
            .f32(post);
        self.gpu.launch(
            self.diff_fwd,
            grid1(vectors.div_ceil(8).max(1)),
            (256, 1, 1),
            0,
            &a,
        )
    }

    /// Backward of [`Self::diff_combine_fwd`]: writes `do1`, `do2` (bf16), adds `dgamma`,
    /// and sets `lam[3] = dλ` (zeroed here first).
    #[allow(clippy::too_many_arguments)]
    pub fn diff_combine_bwd(
        &self,
        o1: u64,
        o2: u64,
        lam: u64,
        gamma: u64,
        rstd: u64,
        dout: u64,
        do1: u64,
        do2: u64,
        dgamma: u64,
        vectors: usize,
        w: usize,
        post: f32,
    ) -> Result<()> {
        Self::check_da_width(w)?;
        self.gpu.memset_zero(lam + 12, 4)?;
        let a = Args::new()
            .ptr(o1)
            .ptr(o2)
            .ptr(lam)
            .ptr(gamma)
            .ptr(rstd)
            .ptr(dout)
            .ptr(do1)
            .ptr(do2)
            .ptr(dgamma)
            .i32(i32_of("vectors", vectors)?)
            .i32(w as i32)
            .f32(post);
        let blocks = vectors
            .div_ceil(8)
            .clamp(1, self.gpu.sm_count.max(1) as usize * 8);
        self.gpu
            .launch(self.diff_bwd, grid1(blocks), (256, 1, 1), 0, &a)
    }

    /// Elements per thread of [`Self::kv_grad_add`]: 8 (16-byte accesses) when the row width,
    /// the first K/V column and the K/V width are multiples of 8, else 1.
    pub fn kv_grad_elems_per_thread(n: usize, c0: usize, w: usize) -> usize {
        if (n | c0 | w).is_multiple_of(8) {
            8
        } else {
            1
        }
    }

    /// The YOCO K/V gradient over columns `[c0, c0 + w)` of the fused QKV rows `[rows, n]`
    /// (bf16 `dqkv`, fp32 `acc`, both contiguous).
    #[allow(clippy::too_many_arguments)]
    pub fn kv_grad_add(
        &self,
        dqkv: u64,
        acc: u64,
        n: usize,
        c0: usize,
        w: usize,
        rows: usize,
        mode: KvGradMode,
    ) -> Result<()> {
        if c0 + w > n {
            return Err(KernelError::Unsupported(format!(
                "kv_grad_add: columns {c0}..{} past the row width {n}",
                c0 + w
            )));
        }
        i32_of("K/V gradient elements", rows * n)?;
        let a = Args::new()
            .ptr(dqkv)
            .ptr(acc)
            .i32(i32_of("n", n)?)
            .i32(i32_of("c0", c0)?)
            .i32(i32_of("w", w)?)
            .i32(i32_of("rows", rows)?)
            .i32(mode as i32);
        let per = Self::kv_grad_elems_per_thread(n, c0, w);
        self.gpu.launch(
            self.kv_grad_add,
            self.ew(rows * w / per),
            (256, 1, 1),
            0,
            &a,
        )
    }

    /// `y = bf16(y + bias)` in place (bias fp32 `[n]`).
    pub fn bias_add_bf16(&self, y: Rows, bias: u64, rows: usize, n: usize) -> Result<()> {
        let a = Args::new()
            .ptr(y.ptr)
            .i32(i32_of("y stride", y.stride)?)
            .ptr(bias)
            .i32(i32_of("rows", rows)?)
            .i32(i32_of("n", n)?);
        self.gpu
            .launch(self.bias_add_bf16, self.ew(rows * n), (256, 1, 1), 0, &a)
    }

    /// `y += scale·bias` on contiguous fp32 rows of `n` (the residual stream).
    pub fn bias_add_f32(&self, y: u64, bias: u64, scale: f32, rows: usize, n: usize) -> Result<()> {
        let a = Args::new()
            .ptr(y)
            .ptr(bias)
            .f32(scale)
            .i32(i32_of("rows", rows)?)
            .i32(i32_of("n", n)?);
        self.gpu
            .launch(self.bias_add_f32, self.ew(rows * n), (256, 1, 1), 0, &a)
    }

    /// `dbias += scale·Σ_rows dy` (bf16 `dy`).
    pub fn bias_grad(&self, dy: Rows, dbias: u64, scale: f32, rows: usize, n: usize) -> Result<()> {
        let a = Args::new()
            .ptr(dy.ptr)
            .i32(i32_of("dy stride", dy.stride)?)
            .ptr(dbias)
            .f32(scale)
            .i32(i32_of("rows", rows)?)
            .i32(i32_of("n", n)?);
        let grid = (
            n.div_ceil(32) as u32,
            rows.div_ceil(8 * BIAS_RUN).max(1) as u32,
            1,
        );
        self.gpu.launch(self.bias_grad, grid, (256, 1, 1), 0, &a)
    }

    /// Copies (or, `accumulate`, adds) `width`-element head vectors between layouts: for
    /// every row r and head h, `dst[r·dst.stride + dst_off[h] + e] (+)= src[r·src.stride +
    /// src_off[h] + e]`. `src_off` and `dst_off` are device i32 tables of `heads` element
    /// offsets. One launch must not write an element twice.
    #[allow(clippy::too_many_arguments)]
    pub fn copy_heads(
        &self,
        src: Rows,
        src_off: u64,
        dst: Rows,
        dst_off: u64,
        rows: usize,
        heads: usize,
        width: usize,
        accumulate: bool,
    ) -> Result<()> {
        let a = Args::new()
            .ptr(src.ptr)
            .i32(i32_of("src stride", src.stride)?)
            .ptr(src_off)
            .ptr(dst.ptr)
            .i32(i32_of("dst stride", dst.stride)?)
            .ptr(dst_off)
            .i32(i32_of("rows", rows)?)
            .i32(i32_of("heads", heads)?)
            .i32(i32_of("width", width)?)
            .i32(accumulate as i32);
        self.gpu.launch(
            self.copy_heads,
            self.ew(rows * heads * width),
            (256, 1, 1),
            0,
            &a,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::{
        check_retired_flash_options, check_scan_kernel_setting, FlashVariant, Ops, RopeBackward,
    };

    #[test]
    fn archscale_scan_kernel_accepts_split_and_refuses_the_retired_v3() {
        for ok in [None, Some(""), Some("split")] {
            assert!(check_scan_kernel_setting(ok).is_ok());
        }
        let e = check_scan_kernel_setting(Some("split3"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("retired") && e.contains("only choice left is split"),
            "{e}"
        );
        let e = check_scan_kernel_setting(Some("legacy"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a scan kernel set"), "{e}");
    }

    #[test]
    fn flash_variants_have_distinct_names_and_sm80_alone_is_not_hopper() {
        let names: std::collections::HashSet<&str> =
            FlashVariant::ALL.iter().map(|v| v.name()).collect();
        assert_eq!(names.len(), FlashVariant::ALL.len());
        // code 0 (the atomic's initial value) is the variant every device runs
        assert_eq!(FlashVariant::ALL[0], FlashVariant::Sm80);
        for v in FlashVariant::ALL {
            assert_eq!(v.hopper(), v != FlashVariant::Sm80);
        }
    }

    #[test]
    fn archscale_flash_names_a_variant_and_refuses_retired_ones() {
        for (value, want) in [(None, None), (Some(""), None), (Some("auto"), None)] {
            assert_eq!(FlashVariant::from_setting(value).ok(), Some(want));
        }
        for v in FlashVariant::ALL {
            assert_eq!(
                FlashVariant::from_setting(Some(v.name())).ok(),
                Some(Some(v))
            );
        }
        let e = FlashVariant::from_setting(Some("sm90ws-bwd")).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("retired"), "{msg}");
        assert!(msg.contains("sm80, sm90ws-leanv or auto"), "{msg}");
        let e = FlashVariant::from_setting(Some("fast")).unwrap_err();
        assert!(e.to_string().contains("not a flash variant"), "{e}");
    }

    #[test]
    fn retired_flash_options_are_refused_except_the_value_that_runs() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |var: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == var)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert!(check_retired_flash_options(env(&[])).is_ok());
        assert!(check_retired_flash_options(env(&[
            ("ARCHSCALE_FLASH_DQ", "smem"),
            ("ARCHSCALE_FLASH_WS", "pingpong"),
            ("ARCHSCALE_FLASH_PREP", ""),
        ]))
        .is_ok());
        for (var, value, hint) in [
            ("ARCHSCALE_FLASH_DQ", "frag", "only choice left is smem"),
            ("ARCHSCALE_FLASH_WS", "nopp", "only choice left is pingpong"),
            (
                "ARCHSCALE_FLASH_WS_BWD",
                "dqw",
                "only choice left is inline",
            ),
            ("ARCHSCALE_FLASH_PREP", "old", "only choice left is fused"),
            (
                "ARCHSCALE_FLASH_FWD",
                "plain",
                "leave ARCHSCALE_FLASH_FWD unset",
            ),
        ] {
            let get = move |v: &str| (v == var).then(|| value.to_string());
            let e = check_retired_flash_options(get).unwrap_err().to_string();
            assert!(e.contains(&format!("{var}={value}")), "{e}");
            assert!(e.contains("retired") && e.contains(hint), "{e}");
        }
    }

    #[test]
    fn archscale_rope_bwd_is_fused_or_separate() {
        for (value, want) in [
            (None, RopeBackward::Fused),
            (Some(""), RopeBackward::Fused),
            (Some("fused"), RopeBackward::Fused),
            (Some("separate"), RopeBackward::Separate),
        ] {
            assert_eq!(RopeBackward::from_setting(value).ok(), Some(want));
        }
        let e = RopeBackward::from_setting(Some("inline"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("ARCHSCALE_ROPE_BWD=inline"), "{e}");
        assert!(e.contains("`fused`") && e.contains("`separate`"), "{e}");
    }

    #[test]
    fn the_hopper_backward_fits_a_ctas_shared_memory() {
        assert_eq!(Ops::flash_ws_bwd_smem(128), 232_000);
        assert!(Ops::flash_ws_bwd_smem(128) <= 232_448);
        assert!(Ops::flash_ws_smem(128) <= 232_448 && Ops::flash_ws_smem(64) <= 232_448);
    }
}
