//! Muon on the GPU (arch-spec §6.3, ArchScale mode `old_large`): EMA momentum and Nesterov
//! mix (`muon_momentum`), Frobenius normalisation, 5 quintic Newton–Schulz steps as
//! cuBLASLt bf16 GEMMs with fp32 accumulation, then `p ← p·(1 − lr·wd) − lr·0.4·√max(m,n)·X`.
//!
//! The matrix is handled in its own row-major layout, without transposing it: a wide one
//! (`rows ≤ cols`) is iterated as `X ← a·X + B·X` on `X` `[rows, cols]`, a tall one as the
//! same iteration on `Xᵀ`, which in column-major terms is the stored matrix itself. The bf16
//! working copy is padded with zero rows and columns to multiples of 8 (aligned leading
//! dimensions for cuBLASLt); zero rows and columns stay zero, so the result is the same.

use crate::cublaslt::{Gemm, Lt, OutType};
use crate::error::{KernelError, Result};
use crate::gpu::{Args, DeviceBuffer, Gpu, Kernel};
use std::sync::Arc;

/// Quintic Newton–Schulz coefficients of ArchScale's `zeropower_via_newtonschulz5`.
pub const NS_COEFFS: (f32, f32, f32) = (3.4445, -4.7750, 2.0315);
pub const NS_STEPS: usize = 5;
/// ArchScale's `old_large` update scale: `0.4·√max(rows, cols)`.
pub const UPDATE_SCALE: f64 = 0.4;

const THREADS: usize = 256;

fn pad8(x: usize) -> usize {
    x.div_ceil(8) * 8
}

fn i32_of(name: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| {
        KernelError::Unsupported(format!("Muon: {name} = {v} exceeds the 32-bit index range"))
    })
}

/// Device scratch for the largest matrix Muon will see, allocated once.
pub struct MuonScratch {
    x: [DeviceBuffer; 2],
    gram: DeviceBuffer,
    poly: DeviceBuffer,
    sumsq: DeviceBuffer,
    /// Capacity in elements of each `x` buffer and of `gram` / `poly`.
    x_cap: usize,
    gram_cap: usize,
}

impl MuonScratch {
    /// Element capacities (working copy, Gram matrix) for every `(rows, cols)` in `shapes`.
    fn capacities(shapes: &[(usize, usize)]) -> (usize, usize) {
        let x = shapes.iter().map(|&(r, c)| pad8(r) * pad8(c)).max();
        let g = shapes.iter().map(|&(r, c)| pad8(r.min(c)).pow(2)).max();
        (x.unwrap_or(0).max(64), g.unwrap_or(0).max(64))
    }

    /// Scratch for every `(rows, cols)` in `shapes`.
    pub fn new(gpu: &Gpu, shapes: &[(usize, usize)]) -> Result<MuonScratch> {
        let (x_cap, gram_cap) = Self::capacities(shapes);
        Ok(MuonScratch {
            x: [gpu.alloc(x_cap * 2)?, gpu.alloc(x_cap * 2)?],
            gram: gpu.alloc(gram_cap * 2)?,
            poly: gpu.alloc(gram_cap * 2)?,
            sumsq: gpu.alloc(8)?,
            x_cap,
            gram_cap,
        })
    }

    /// Device bytes held.
    pub fn bytes(&self) -> usize {
        self.x[0].bytes + self.x[1].bytes + self.gram.bytes + self.poly.bytes + self.sumsq.bytes
    }

    /// Bytes [`MuonScratch::new`] allocates for `shapes` (for memory planning).
    pub fn planned_bytes(shapes: &[(usize, usize)]) -> usize {
        let (x, g) = Self::capacities(shapes);
        4 * x + 4 * g + 8
    }
}

/// One Muon step's settings for a matrix.
#[derive(Clone, Copy, Debug)]
pub struct MuonStep {
    pub rows: usize,
    pub cols: usize,
    /// Learning rate (schedule and group multiplier included).
    pub lr: f64,
    pub beta: f64,
    pub weight_decay: f64,
    /// Clip coefficient the gradient is multiplied by.
    pub grad_mult: f64,
}

/// The Muon kernels.
pub struct MuonOps {
    gpu: Arc<Gpu>,
    momentum: Kernel,
    momentum_part: Kernel,
    pack: Kernel,
    normalize: Kernel,
    update: Kernel,
}

impl MuonOps {
    pub fn new(gpu: Arc<Gpu>) -> Result<MuonOps> {
        Ok(MuonOps {
            momentum: gpu.module_kernel("muon", "muon_momentum")?,
            momentum_part: gpu.module_kernel("muon", "muon_momentum_part")?,
            pack: gpu.module_kernel("muon", "muon_pack")?,
            normalize: gpu.module_kernel("muon", "muon_normalize")?,
            update: gpu.module_kernel("muon", "muon_update")?,
            gpu,
        })
    }

    fn grid(&self, n: usize) -> (u32, u32, u32) {
        let blocks = n
            .div_ceil(THREADS)
            .min(self.gpu.sm_count.max(1) as usize * 16)
            .max(1);
        (blocks as u32, 1, 1)
    }

    fn check_fits(&self, s: &MuonScratch, rows: usize, cols: usize) -> Result<()> {
        if rows == 0 || cols == 0 {
            return Err(KernelError::Unsupported(format!(
                "Muon: empty matrix {rows}x{cols}"
            )));
        }
        if pad8(rows) * pad8(cols) > s.x_cap || pad8(rows.min(cols)).pow(2) > s.gram_cap {
            return Err(KernelError::Unsupported(format!(
                "Muon: a {rows}x{cols} matrix exceeds the scratch allocated at start-up"
            )));
        }
        Ok(())
    }

    /// Updates the momentum `m` (fp32, `[rows, cols]`) from the gradient `g` and writes the
    /// normalised bf16 Nesterov mix into the scratch (the Newton–Schulz input).
    pub fn momentum_and_normalize(
        &self,
        s: &MuonScratch,
        g: u64,
        m: u64,
        st: &MuonStep,
    ) -> Result<()> {
        self.check_fits(s, st.rows, st.cols)?;
        let (rp, cp) = (pad8(st.rows), pad8(st.cols));
        self.gpu.memset_zero(s.sumsq.ptr, 8)?;
        let a = Args::new()
            .ptr(g)
            .ptr(m)
            .ptr(s.x[0].ptr)
            .i32(i32_of("rows", st.rows)?)
            .i32(i32_of("cols", st.cols)?)
            .i32(i32_of("rows", rp)?)
            .i32(i32_of("cols", cp)?)
            .f32(st.beta as f32)
            .f32(st.grad_mult as f32)
            .ptr(s.sumsq.ptr);
        self.gpu.launch(
            self.momentum,
            self.grid(rp * cp),
            (THREADS as u32, 1, 1),
            0,
            &a,
        )?;
        self.normalize(s, rp * cp)
    }

    /// Divides the `n`-element working copy by its Frobenius norm (from `sumsq`).
    fn normalize(&self, s: &MuonScratch, n: usize) -> Result<()> {
        let a = Args::new().ptr(s.x[0].ptr).i64(n as i64).ptr(s.sumsq.ptr);
        self.gpu
            .launch(self.normalize, self.grid(n), (THREADS as u32, 1, 1), 0, &a)
    }

    /// Sharded Muon, first phase: updates the momentum of this rank's `n` elements of a
    /// matrix (`g`, `m` point at the first of them) and writes their fp32 Nesterov mix to
    /// `mix` (may equal `g`), for the ranks to all-gather.
    pub fn momentum_part(&self, g: u64, m: u64, mix: u64, n: usize, st: &MuonStep) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let a = Args::new()
            .ptr(g)
            .ptr(m)
            .ptr(mix)
            .i64(n as i64)
            .f32(st.beta as f32)
            .f32(st.grad_mult as f32);
        self.gpu.launch(
            self.momentum_part,
            self.grid(n),
            (THREADS as u32, 1, 1),
            0,
            &a,
        )
    }

    /// Sharded Muon, second phase: the gathered fp32 mix of the whole `[rows, cols]` matrix
    /// into the normalised bf16 working copy (what [`Self::momentum_and_normalize`] leaves).
    pub fn pack_and_normalize(&self, s: &MuonScratch, mix: u64, st: &MuonStep) -> Result<()> {
        self.check_fits(s, st.rows, st.cols)?;
        let (rp, cp) = (pad8(st.rows), pad8(st.cols));
        self.gpu.memset_zero(s.sumsq.ptr, 8)?;
        let a = Args::new()
            .ptr(mix)
            .ptr(s.x[0].ptr)
            .i32(i32_of("rows", st.rows)?)
            .i32(i32_of("cols", st.cols)?)
            .i32(i32_of("rows", rp)?)
            .i32(i32_of("cols", cp)?)
            .ptr(s.sumsq.ptr);
        self.gpu
            .launch(self.pack, self.grid(rp * cp), (THREADS as u32, 1, 1), 0, &a)?;
        self.normalize(s, rp * cp)
    }

    /// Runs the Newton–Schulz iterations on the normalised matrix in the scratch; returns
    /// the device address of the result (bf16, `[rows_p, cols_p]` with row stride cols_p).
    pub fn newton_schulz(&self, lt: &Lt, s: &MuonScratch, rows: usize, cols: usize) -> Result<u64> {
        self.check_fits(s, rows, cols)?;
        let (rp, cp) = (pad8(rows), pad8(cols));
        let (a, b, c) = NS_COEFFS;
        let tall = rows > cols;
        // m×n is the iterated (wide) matrix: X [m, n] row-major, or for a tall input Xᵀ.
        let (m, n) = if tall { (cp, rp) } else { (rp, cp) };
        let (gram, poly) = (s.gram.ptr, s.poly.ptr);
        let mut cur = 0usize;
        for _ in 0..NS_STEPS {
            let (x, y) = (s.x[cur].ptr, s.x[1 - cur].ptr);
            // A = X·Xᵀ (column-major m×m). Wide: the stored row-major X [m, n] is the
            // column-major Xᵀ [n, m] (ld n). Tall: the stored row-major G [rows, cols] is the
            // column-major Gᵀ = X [m, n] (ld m).
            let gram_gemm = if tall {
                Gemm {
                    trans_a: false,
                    trans_b: true,
                    m,
                    n: m,
                    k: n,
                    a: x,
                    lda: m,
                    b: x,
                    ldb: m,
                    c: 0,
                    d: gram,
                    ldd: m,
                    out: OutType::Bf16,
                    alpha: 1.0,
                    beta: 0.0,
                }
            } else {
                Gemm {
                    trans_a: true,
                    trans_b: false,
                    m,
                    n: m,
                    k: n,
                    a: x,
                    lda: n,
                    b: x,
                    ldb: n,
                    c: 0,
                    d: gram,
                    ldd: m,
                    out: OutType::Bf16,
                    alpha: 1.0,
                    beta: 0.0,
                }
            };
            lt.gemm(&self.gpu, &gram_gemm)?;
            // B = b·A + c·A·A (column-major m×m)
            lt.gemm(
                &self.gpu,
                &Gemm {
                    trans_a: false,
                    trans_b: false,
                    m,
                    n: m,
                    k: m,
                    a: gram,
                    lda: m,
                    b: gram,
                    ldb: m,
                    c: gram,
                    d: poly,
                    ldd: m,
                    out: OutType::Bf16,
                    alpha: c,
                    beta: b,
                },
            )?;
            // X ← a·X + B·X
            let update = if tall {
                // column-major X [m, n]: Y = B·X + a·X
                Gemm {
                    trans_a: false,
                    trans_b: false,
                    m,
                    n,
                    k: m,
                    a: poly,
                    lda: m,
                    b: x,
                    ldb: m,
                    c: x,
                    d: y,
                    ldd: m,
                    out: OutType::Bf16,
                    alpha: 1.0,
                    beta: a,
                }
            } else {
                // column-major Xᵀ [n, m]: Yᵀ = Xᵀ·Bᵀ + a·Xᵀ
                Gemm {
                    trans_a: false,
                    trans_b: true,
                    m: n,
                    n: m,
                    k: m,
                    a: x,
                    lda: n,
                    b: poly,
                    ldb: m,
                    c: x,
                    d: y,
                    ldd: n,
                    out: OutType::Bf16,
                    alpha: 1.0,
                    beta: a,
                }
            };
            lt.gemm(&self.gpu, &update)?;
            cur = 1 - cur;
        }
        Ok(s.x[cur].ptr)
    }

    /// `p ← p·(1 − lr·wd) − lr·0.4·√max(rows, cols)·o`, zeroes `g`, refreshes `p_bf` when
    /// non-zero. `o` is a padded Newton–Schulz output.
    pub fn apply(&self, p: u64, g: u64, p_bf: u64, o: u64, st: &MuonStep) -> Result<()> {
        self.apply_part(p, g, p_bf, o, 0, st.rows * st.cols, st)
    }

    /// [`Self::apply`] on the matrix's elements `k0 .. k0 + n` only (row-major), with `p`, `g`
    /// and `p_bf` pointing at element `k0`: a rank's part under ZeRO.
    #[allow(clippy::too_many_arguments)]
    pub fn apply_part(
        &self,
        p: u64,
        g: u64,
        p_bf: u64,
        o: u64,
        k0: usize,
        n: usize,
        st: &MuonStep,
    ) -> Result<()> {
        if k0 + n > st.rows * st.cols {
            return Err(KernelError::Unsupported(format!(
                "Muon: elements {k0}..{} of a {}x{} matrix",
                k0 + n,
                st.rows,
                st.cols
            )));
        }
        if n == 0 {
            return Ok(());
        }
        let decay = (1.0 - st.lr * st.weight_decay) as f32;
        let scale = (st.lr * UPDATE_SCALE * (st.rows.max(st.cols) as f64).sqrt()) as f32;
        let a = Args::new()
            .ptr(p)
            .ptr(g)
            .ptr(p_bf)
            .ptr(o)
            .i64(k0 as i64)
            .i64(n as i64)
            .i32(i32_of("cols", st.cols)?)
            .i32(i32_of("cols", pad8(st.cols))?)
            .f32(decay)
            .f32(scale);
        self.gpu
            .launch(self.update, self.grid(n), (THREADS as u32, 1, 1), 0, &a)
    }

    /// One whole Muon step of the `[rows, cols]` matrix `p` (fp32) with gradient `g`
    /// (zeroed afterwards), momentum `m`, and optional bf16 shadow `p_bf` (0 = none).
    #[allow(clippy::too_many_arguments)]
    pub fn step(
        &self,
        lt: &Lt,
        s: &MuonScratch,
        p: u64,
        g: u64,
        m: u64,
        p_bf: u64,
        st: &MuonStep,
    ) -> Result<()> {
        self.momentum_and_normalize(s, g, m, st)?;
        let o = self.newton_schulz(lt, s, st.rows, st.cols)?;
        self.apply(p, g, p_bf, o, st)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scratch_covers_the_padded_matrix_and_its_gram() {
        // 30x77 pads to 32x80; its Gram is 32x32 (the smaller side).
        let b = MuonScratch::planned_bytes(&[(30, 77), (8, 8)]);
        assert_eq!(b, 4 * 32 * 80 + 4 * 32 * 32 + 8);
        assert_eq!(pad8(1), 8);
        assert_eq!(pad8(64), 64);
    }

    #[test]
    fn the_muon_module_has_its_kernels() {
        let src = crate::module_source("muon").unwrap_or_default();
        for k in [
            "muon_momentum",
            "muon_momentum_part",
            "muon_pack",
            "muon_normalize",
            "muon_update",
        ] {
            assert!(src.contains(&format!(" {k}(")), "{k}");
        }
    }
}
