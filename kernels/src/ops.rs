//! Typed launch wrappers. Pointers are raw device addresses (`u64`); shapes are checked
//! here where a kernel relies on them.

use crate::error::{KernelError, Result};
use crate::gpu::{Args, Gpu, Kernel};
use std::sync::Arc;

const FLASH_BR: usize = 64;
const FLASH_BC: usize = 64;
/// Keys per backward CTA (8 warps of 16 keys).
const FLASH_BWD_BC: usize = 128;

/// Every kernel, loaded once per device.
pub struct Ops {
    pub gpu: Arc<Gpu>,
    embedding_fwd: Kernel,
    embedding_bwd: Kernel,
    rmsnorm_fwd: Kernel,
    rmsnorm_bwd: Kernel,
    rope_qkv: Kernel,
    swiglu_fwd: Kernel,
    swiglu_bwd: Kernel,
    cast_f32_bf16: Kernel,
    cast_bf16_f32: Kernel,
    cross_entropy: Kernel,
    adamw: Kernel,
    sum_squares: Kernel,
    scale_f32: Kernel,
    flash_fwd_64: Kernel,
    flash_fwd_128: Kernel,
    flash_bwd_64: Kernel,
    flash_bwd_128: Kernel,
    flash_delta: Kernel,
    flash_dq: Kernel,
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
        }
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
        let load = |module: &str, name: &'static str| -> Result<Kernel> {
            let src = crate::module_source(module)
                .ok_or_else(|| KernelError::Unsupported(format!("unknown module {module}")))?;
            gpu.kernel(module, &src, name)
        };
        let ops = Ops {
            embedding_fwd: load("elementwise", "embedding_fwd")?,
            embedding_bwd: load("elementwise", "embedding_bwd")?,
            rmsnorm_fwd: load("elementwise", "rmsnorm_fwd")?,
            rmsnorm_bwd: load("elementwise", "rmsnorm_bwd")?,
            rope_qkv: load("elementwise", "rope_qkv")?,
            swiglu_fwd: load("elementwise", "swiglu_fwd")?,
            swiglu_bwd: load("elementwise", "swiglu_bwd")?,
            cast_f32_bf16: load("elementwise", "cast_f32_bf16")?,
            cast_bf16_f32: load("elementwise", "cast_bf16_f32")?,
            cross_entropy: load("loss_optim", "cross_entropy")?,
            adamw: load("loss_optim", "adamw_step")?,
            sum_squares: load("loss_optim", "sum_squares")?,
            scale_f32: load("loss_optim", "scale_f32")?,
            flash_fwd_64: load("flash", "flash_fwd_d64")?,
            flash_fwd_128: load("flash", "flash_fwd_d128")?,
            flash_bwd_64: load("flash", "flash_bwd_d64")?,
            flash_bwd_128: load("flash", "flash_bwd_d128")?,
            flash_delta: load("flash", "flash_bwd_delta")?,
            flash_dq: load("flash", "flash_bwd_dq")?,
            gpu,
        };
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
            + 4 * FLASH_BR * 4
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
        self.gpu
            .launch(self.rmsnorm_fwd, grid1(rows), (256, 1, 1), 0, &a)
    }

    /// RMSNorm backward: `dres (+)= dx`, `dres_bf = bf16(dres)`, `dgamma += ...`.
    #[allow(clippy::too_many_arguments)]
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
            .i32(accumulate as i32);
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

    pub fn swiglu_fwd(&self, gu: u64, out: u64, rows: usize, inner: usize) -> Result<()> {
        let a = Args::new()
            .ptr(gu)
            .ptr(out)
            .i32(i32_of("rows", rows)?)
            .i32(i32_of("inner", inner)?);
        self.gpu
            .launch(self.swiglu_fwd, grid1(rows), (256, 1, 1), 0, &a)
    }

    /// In place: `gu <- d(gu)` from `da`.
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

    /// One fused AdamW step over `chunks` (device arrays of offsets, lengths, groups) of the
    /// flat buffers; `hyper` holds 8 floats per group (see loss_optim.cu).
    #[allow(clippy::too_many_arguments)]
    pub fn adamw(
        &self,
        p: u64,
        g: u64,
        m: u64,
        v: u64,
        p_bf: u64,
        chunk_off: u64,
        chunk_len: u64,
        chunk_group: u64,
        chunks: usize,
        hyper: u64,
        grad_mult: f32,
    ) -> Result<()> {
        let a = Args::new()
            .ptr(p)
            .ptr(g)
            .ptr(m)
            .ptr(v)
            .ptr(p_bf)
            .ptr(chunk_off)
            .ptr(chunk_len)
            .ptr(chunk_group)
            .ptr(hyper)
            .f32(grad_mult);
        self.gpu
            .launch(self.adamw, grid1(chunks), (256, 1, 1), 0, &a)
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
        let kernel = match l.head_dim {
            64 => self.flash_fwd_64,
            128 => self.flash_fwd_128,
            d => {
                return Err(KernelError::Unsupported(format!(
                    "flash attention supports head_dim 64 and 128, not {d}"
                )))
            }
        };
        check_layout(l)?;
        let a = Args::new()
            .ptr(q)
            .ptr(k)
            .ptr(v)
            .ptr(o)
            .ptr(lse)
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

    /// Flash attention backward. `dq_acc` is fp32 scratch of `batch·seq·heads·head_dim`;
    /// `delta` fp32 scratch of `batch·heads·seq`. dQ/dK/dV are written in q/k/v's layout at
    /// `dq`, `dk`, `dv` (dK, dV summed over each group's query heads).
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
    ) -> Result<()> {
        let kernel = match l.head_dim {
            64 => self.flash_bwd_64,
            128 => self.flash_bwd_128,
            d => {
                return Err(KernelError::Unsupported(format!(
                    "flash attention supports head_dim 64 and 128, not {d}"
                )))
            }
        };
        check_layout(l)?;
        let rows = l.batch * l.seq;
        let d = l.head_dim;
        // delta = rowsum(dO ∘ O)
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
            .i32(i32_of("window", l.window)?);
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
            .f32(l.scale);
        self.gpu
            .launch(self.flash_dq, grid1(rows), (256, 1, 1), 0, &a)
    }
}

fn check_layout(l: &AttnLayout) -> Result<()> {
    if l.qpg == 0 || l.heads % l.qpg != 0 {
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
