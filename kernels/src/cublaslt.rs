//! cuBLASLt bf16 matrix products with fp32 accumulation. Descriptors and the heuristic's
//! algorithms are cached per shape; outputs are bf16 or fp32 (`D = alpha·op(A)·op(B) + beta·C`).
//! A shape runs the heuristic's first algorithm unless [`Lt::tune`] timed its candidates and
//! chose another (the heuristic ranks by a model of the GPU, not by measurement).
//!
//! Row-major helpers follow PyTorch's `Linear`: weights are `[out, in]`, `y = x·Wᵀ`.

use crate::error::{KernelError, Result};
use crate::gpu::{DeviceBuffer, Gpu};
use cudarc::cublaslt::{result as lt, sys};
use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::c_void;

/// cuBLASLt workspace, allocated once per backend (memory planning counts it).
pub const WORKSPACE_BYTES: usize = 64 << 20;

/// Element types of the output (C and D) of a product; A and B are always bf16.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum OutType {
    Bf16,
    F32,
}

impl OutType {
    fn cuda(self) -> sys::cudaDataType {
        match self {
            OutType::Bf16 => sys::cudaDataType::CUDA_R_16BF,
            OutType::F32 => sys::cudaDataType::CUDA_R_32F,
        }
    }
}

/// Where a weight-gradient product writes: fp32 (accumulating over micro-steps), or bf16,
/// which is what ArchScale's autocast product hands its optimizer after one micro-step.
#[derive(Clone, Copy, Debug)]
pub struct WeightGrad {
    pub ptr: u64,
    pub ty: OutType,
}

/// One column-major product `D[m×n] = alpha·op(A)·op(B) + beta·C`.
#[derive(Clone, Copy, Debug)]
pub struct Gemm {
    pub trans_a: bool,
    pub trans_b: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a: u64,
    pub lda: usize,
    pub b: u64,
    pub ldb: usize,
    /// C (read when `beta != 0`); may equal `d`.
    pub c: u64,
    pub d: u64,
    pub ldd: usize,
    pub out: OutType,
    pub alpha: f32,
    pub beta: f32,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
struct Key {
    trans_a: bool,
    trans_b: bool,
    m: usize,
    n: usize,
    k: usize,
    lda: usize,
    ldb: usize,
    ldd: usize,
    out: OutType,
    /// Byte alignment of A, B, C and D when one of them is below 128 (else all 256):
    /// cuBLASLt assumes 256-byte operands unless told otherwise.
    align: [u32; 4],
}

/// Largest power of two (at most 256) dividing `ptr`.
fn alignment(ptr: u64) -> u32 {
    if ptr == 0 {
        256
    } else {
        1 << ptr.trailing_zeros().min(8)
    }
}

/// The alignments cuBLASLt is told about: operands at 128 bytes or more (every buffer and
/// weight today) keep cuBLASLt's default assumption, so their algorithm choice is unchanged;
/// a less aligned operand (a sub-block of a weight) makes all four explicit.
fn declared_alignment(ptrs: [u64; 4]) -> [u32; 4] {
    let a = ptrs.map(alignment);
    if a.iter().all(|&x| x >= 128) {
        [256; 4]
    } else {
        a
    }
}

/// How many of the heuristic's algorithms a shape keeps as candidates for [`Lt::tune`].
pub const CANDIDATES: usize = 8;

struct Cached {
    desc: sys::cublasLtMatmulDesc_t,
    a: sys::cublasLtMatrixLayout_t,
    b: sys::cublasLtMatrixLayout_t,
    d: sys::cublasLtMatrixLayout_t,
    /// The heuristic's algorithms, best first by its own estimate.
    candidates: Vec<sys::cublasLtMatmulAlgo_t>,
    /// Index into `candidates` that [`Lt::gemm`] runs.
    chosen: usize,
    /// Whether [`Lt::tune`] has timed this shape.
    tuned: bool,
}

/// How much faster (by median) another candidate must be before [`Lt::tune`] leaves the
/// heuristic's first choice, so that timing noise does not pick it (2026-11-29, with a 1 %
/// margin and back-to-back timing: d8 +1.0 %, d16 −0.7 % in the step).
pub const TUNE_MARGIN: f32 = 0.05;

/// The candidate to run, given median times sorted fastest first: the fastest if it beats
/// the heuristic's first choice (rank 0) by [`TUNE_MARGIN`] or rank 0 was not usable.
fn pick(sorted: &[Timing]) -> usize {
    let first = sorted.iter().find(|t| t.rank == 0).map(|t| t.ms);
    match (sorted.first(), first) {
        (Some(best), Some(ms0)) if best.ms < (1.0 - TUNE_MARGIN) * ms0 => best.rank,
        (Some(best), None) => best.rank,
        _ => 0,
    }
}

/// One timed candidate of [`Lt::tune`].
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// Rank in the heuristic's list (0 = what runs untuned).
    pub rank: usize,
    pub ms: f32,
}

pub struct Lt {
    handle: sys::cublasLtHandle_t,
    workspace: DeviceBuffer,
    cache: RefCell<HashMap<Key, Cached>>,
    /// When set (rounds), the first product of each shape times its candidates first
    /// ([`Lt::tune`]); the bool also lets products that accumulate into their own input be
    /// tuned.
    autotune: std::cell::Cell<Option<(usize, bool)>>,
}

fn cublas<T>(call: &str, r: std::result::Result<T, lt::CublasError>) -> Result<T> {
    r.map_err(|e| KernelError::Cublas {
        call: call.to_string(),
        message: format!("{e:?}"),
    })
}

/// Checks that libcublasLt loads.
pub fn ensure_cublaslt() -> Result<()> {
    if unsafe { sys::is_culib_present() } {
        Ok(())
    } else {
        Err(KernelError::LibraryMissing {
            library: "libcublasLt.so (CUDA 13 cuBLASLt)",
            hint: "put the CUDA toolkit's lib64 on LD_LIBRARY_PATH (on the GPU machine: /usr/local/cuda/lib64)".into(),
        })
    }
}

impl Lt {
    pub fn new(gpu: &Gpu) -> Result<Lt> {
        ensure_cublaslt()?;
        gpu.bind()?;
        let handle = cublas("cublasLtCreate", lt::create_handle())?;
        let workspace = gpu.alloc(WORKSPACE_BYTES)?;
        Ok(Lt {
            handle,
            workspace,
            cache: RefCell::new(HashMap::new()),
            autotune: std::cell::Cell::new(None),
        })
    }

    fn prepare(&self, key: Key) -> Result<()> {
        if self.cache.borrow().contains_key(&key) {
            return Ok(());
        }
        unsafe {
            let desc = cublas(
                "cublasLtMatmulDescCreate",
                lt::create_matmul_desc(
                    sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    sys::cudaDataType::CUDA_R_32F,
                ),
            )?;
            let ta: i32 = key.trans_a as i32;
            let tb: i32 = key.trans_b as i32;
            cublas(
                "set TRANSA",
                lt::set_matmul_desc_attribute(
                    desc,
                    sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                    &ta as *const i32 as *const c_void,
                    4,
                ),
            )?;
            cublas(
                "set TRANSB",
                lt::set_matmul_desc_attribute(
                    desc,
                    sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB,
                    &tb as *const i32 as *const c_void,
                    4,
                ),
            )?;
            // Stored shapes (column-major rows × cols) of A and B before op().
            let (ar, ac) = if key.trans_a {
                (key.k, key.m)
            } else {
                (key.m, key.k)
            };
            let (br, bc) = if key.trans_b {
                (key.n, key.k)
            } else {
                (key.k, key.n)
            };
            let bf = sys::cudaDataType::CUDA_R_16BF;
            let a = cublas(
                "layout A",
                lt::create_matrix_layout(bf, ar as u64, ac as u64, key.lda as i64),
            )?;
            let b = cublas(
                "layout B",
                lt::create_matrix_layout(bf, br as u64, bc as u64, key.ldb as i64),
            )?;
            let d = cublas(
                "layout D",
                lt::create_matrix_layout(
                    key.out.cuda(),
                    key.m as u64,
                    key.n as u64,
                    key.ldd as i64,
                ),
            )?;
            let pref = cublas("cublasLtMatmulPreferenceCreate", lt::create_matmul_pref())?;
            if key.align != [256; 4] {
                use sys::cublasLtMatmulPreferenceAttributes_t as P;
                for (attr, value) in [
                    P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                    P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                    P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                    P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
                ]
                .into_iter()
                .zip(key.align)
                {
                    cublas(
                        "set min alignment",
                        lt::set_matmul_pref_attribute(
                            pref,
                            attr,
                            &value as *const u32 as *const c_void,
                            std::mem::size_of::<u32>(),
                        ),
                    )?;
                }
            }
            let ws: usize = WORKSPACE_BYTES;
            cublas(
                "set workspace",
                lt::set_matmul_pref_attribute(
                    pref,
                    sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                    &ws as *const usize as *const c_void,
                    std::mem::size_of::<usize>(),
                ),
            )?;
            let mut results =
                [std::mem::zeroed::<sys::cublasLtMatmulHeuristicResult_t>(); CANDIDATES];
            let mut found = 0i32;
            let status = sys::cublasLtMatmulAlgoGetHeuristic(
                self.handle,
                desc,
                a,
                b,
                d,
                d,
                pref,
                CANDIDATES as i32,
                results.as_mut_ptr(),
                &mut found,
            );
            let _ = lt::destroy_matmul_pref(pref);
            if status != sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS || found <= 0 {
                return Err(KernelError::Cublas {
                    call: format!("cublasLtMatmulAlgoGetHeuristic({key:?})"),
                    message: format!("{status:?}: no algorithm for this shape"),
                });
            }
            let candidates = results[..found as usize]
                .iter()
                .filter(|r| r.state == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS)
                .map(|r| r.algo)
                .collect::<Vec<_>>();
            if candidates.is_empty() {
                return Err(KernelError::Cublas {
                    call: format!("cublasLtMatmulAlgoGetHeuristic({key:?})"),
                    message: "every algorithm it returned failed its check".into(),
                });
            }
            self.cache.borrow_mut().insert(
                key,
                Cached {
                    desc,
                    a,
                    b,
                    d,
                    candidates,
                    chosen: 0,
                    tuned: false,
                },
            );
        }
        Ok(())
    }

    fn key(g: &Gemm) -> Key {
        let c_ptr = if g.beta == 0.0 { g.d } else { g.c };
        Key {
            trans_a: g.trans_a,
            trans_b: g.trans_b,
            m: g.m,
            n: g.n,
            k: g.k,
            lda: g.lda,
            ldb: g.ldb,
            ldd: g.ldd,
            out: g.out,
            align: declared_alignment([g.a, g.b, c_ptr, g.d]),
        }
    }

    /// Runs one product on `gpu`'s stream.
    pub fn gemm(&self, gpu: &Gpu, g: &Gemm) -> Result<()> {
        if g.m == 0 || g.n == 0 {
            return Ok(());
        }
        let key = Self::key(g);
        self.prepare(key)?;
        if let Some((reps, accumulating)) = self.autotune.get() {
            let tuned = self.cache.borrow().get(&key).map(|c| c.tuned);
            // tuning runs the product many times: harmless unless it adds into its input
            let repeatable = g.beta == 0.0 || g.c != g.d;
            if tuned == Some(false) && (repeatable || accumulating) {
                let times = self.tune(gpu, g, reps)?;
                if std::env::var_os("ARCHSCALE_GEMM_TUNE_LOG").is_some() {
                    let list: Vec<String> = times
                        .iter()
                        .map(|t| format!("#{} {:.4}", t.rank, t.ms))
                        .collect();
                    eprintln!(
                        "gemm tune m {} n {} k {} trans {}{} {:?}: ms by heuristic rank {}",
                        g.m,
                        g.n,
                        g.k,
                        if g.trans_a { 'T' } else { 'N' },
                        if g.trans_b { 'T' } else { 'N' },
                        g.out,
                        list.join(", ")
                    );
                }
            }
        }
        let chosen = self.cache.borrow().get(&key).map(|c| c.chosen);
        let chosen = chosen.ok_or_else(|| KernelError::Unsupported("gemm cache miss".into()))?;
        self.run(gpu, g, key, chosen)
    }

    fn run(&self, gpu: &Gpu, g: &Gemm, key: Key, candidate: usize) -> Result<()> {
        let c_ptr = if g.beta == 0.0 { g.d } else { g.c };
        let cache = self.cache.borrow();
        let c = cache
            .get(&key)
            .ok_or_else(|| KernelError::Unsupported("gemm cache miss".into()))?;
        let algo = c
            .candidates
            .get(candidate)
            .ok_or_else(|| KernelError::Unsupported("gemm candidate out of range".into()))?;
        unsafe {
            cublas(
                &format!("cublasLtMatmul({key:?})"),
                lt::matmul(
                    self.handle,
                    c.desc,
                    &g.alpha as *const f32 as *const c_void,
                    &g.beta as *const f32 as *const c_void,
                    g.a as *const c_void,
                    c.a,
                    g.b as *const c_void,
                    c.b,
                    c_ptr as *const c_void,
                    c.d,
                    g.d as *mut c_void,
                    c.d,
                    algo,
                    self.workspace.ptr as *mut c_void,
                    self.workspace.bytes,
                    gpu.raw_stream() as sys::cudaStream_t,
                ),
            )
        }
    }

    /// Times each of the shape's candidate algorithms on `g`'s own buffers and makes the
    /// fastest the one [`Lt::gemm`] runs, if it beats the heuristic's first choice by
    /// [`TUNE_MARGIN`]. The candidates take turns, `rounds` rounds after one warm-up round,
    /// and each is judged by its median: the clock of a busy H200 sags under its power
    /// limit within a second, so timing one candidate after the other would favour the
    /// first ones. A product that accumulates into its input (`c == d`, `beta != 0`) is
    /// run many times here, so `d` holds garbage afterwards: tune such shapes only in a
    /// pass whose results are discarded. Returns the median times, fastest first.
    pub fn tune(&self, gpu: &Gpu, g: &Gemm, rounds: usize) -> Result<Vec<Timing>> {
        let key = Self::key(g);
        self.prepare(key)?;
        let n = self
            .cache
            .borrow()
            .get(&key)
            .map_or(0, |c| c.candidates.len());
        // an algorithm the heuristic listed can still refuse these pointers: drop it
        let usable: Vec<usize> = (0..n)
            .filter(|&rank| self.run(gpu, g, key, rank).is_ok())
            .collect();
        let mut samples = vec![Vec::with_capacity(rounds); usable.len()];
        for _ in 0..rounds.max(1) {
            let mut marks = Vec::with_capacity(usable.len());
            for &rank in &usable {
                let start = gpu.event()?;
                self.run(gpu, g, key, rank)?;
                marks.push((start, gpu.event()?));
            }
            for (i, (start, end)) in marks.iter().enumerate() {
                samples[i].push(start.elapsed_ms(end)?);
            }
        }
        let mut times: Vec<Timing> = usable
            .iter()
            .zip(samples.iter_mut())
            .map(|(&rank, s)| {
                s.sort_by(f32::total_cmp);
                Timing {
                    rank,
                    ms: s[s.len() / 2],
                }
            })
            .collect();
        times.sort_by(|x, y| x.ms.total_cmp(&y.ms));
        let chosen = pick(&times);
        if let Some(c) = self.cache.borrow_mut().get_mut(&key) {
            c.chosen = chosen;
            c.tuned = true;
        }
        Ok(times)
    }

    /// With `Some(reps)`, the first product of every shape not yet tuned is tuned first
    /// ([`Lt::tune`], `reps` rounds). Products that accumulate into their own
    /// input (`c == d`, `beta != 0`: weight gradients) are tuned only with `accumulating`,
    /// which leaves garbage in their outputs: set it only for a pass whose results are
    /// discarded. `None` stops tuning; choices made so far stay.
    pub fn set_autotune(&self, reps: Option<usize>, accumulating: bool) {
        self.autotune.set(reps.map(|r| (r, accumulating)));
    }

    /// `y[rows, out] = alpha · x[rows, in] · w[out, in]ᵀ + beta · c` (c has y's shape and type).
    #[allow(clippy::too_many_arguments)]
    pub fn linear(
        &self,
        gpu: &Gpu,
        x: u64,
        w: u64,
        y: u64,
        c: u64,
        rows: usize,
        inp: usize,
        out: usize,
        ty: OutType,
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        self.linear_ld(gpu, x, inp, w, y, out, c, rows, inp, out, ty, alpha, beta)
    }

    /// [`Lt::linear`] with row strides: `x` rows `ldx` apart, `y` (and `c`) rows `ldy` apart.
    #[allow(clippy::too_many_arguments)]
    pub fn linear_ld(
        &self,
        gpu: &Gpu,
        x: u64,
        ldx: usize,
        w: u64,
        y: u64,
        ldy: usize,
        c: u64,
        rows: usize,
        inp: usize,
        out: usize,
        ty: OutType,
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        self.gemm(
            gpu,
            &Gemm {
                trans_a: true,
                trans_b: false,
                m: out,
                n: rows,
                k: inp,
                a: w,
                lda: inp,
                b: x,
                ldb: ldx,
                c,
                d: y,
                ldd: ldy,
                out: ty,
                alpha,
                beta,
            },
        )
    }

    /// `dx[rows, in] = alpha · dy[rows, out] · w[out, in] + beta · dx` (bf16 out).
    #[allow(clippy::too_many_arguments)]
    pub fn linear_grad_input(
        &self,
        gpu: &Gpu,
        dy: u64,
        w: u64,
        dx: u64,
        rows: usize,
        inp: usize,
        out: usize,
        ty: OutType,
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        self.linear_grad_input_ld(gpu, dy, out, w, dx, inp, rows, inp, out, ty, alpha, beta)
    }

    /// [`Lt::linear_grad_input`] with row strides `lddy` and `lddx`.
    #[allow(clippy::too_many_arguments)]
    pub fn linear_grad_input_ld(
        &self,
        gpu: &Gpu,
        dy: u64,
        lddy: usize,
        w: u64,
        dx: u64,
        lddx: usize,
        rows: usize,
        inp: usize,
        out: usize,
        ty: OutType,
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        self.gemm(
            gpu,
            &Gemm {
                trans_a: false,
                trans_b: false,
                m: inp,
                n: rows,
                k: out,
                a: w,
                lda: inp,
                b: dy,
                ldb: lddy,
                c: dx,
                d: dx,
                ldd: lddx,
                out: ty,
                alpha,
                beta,
            },
        )
    }

    /// `dw[out, in] = alpha · dy[rows, out]ᵀ · x[rows, in] + beta · dw`.
    #[allow(clippy::too_many_arguments)]
    pub fn linear_grad_weight(
        &self,
        gpu: &Gpu,
        dy: u64,
        x: u64,
        dw: WeightGrad,
        rows: usize,
        inp: usize,
        out: usize,
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        self.linear_grad_weight_ld(gpu, dy, out, x, inp, dw, rows, inp, out, alpha, beta)
    }

    /// [`Lt::linear_grad_weight`] with row strides `lddy` and `ldx` (dw stays dense).
    #[allow(clippy::too_many_arguments)]
    pub fn linear_grad_weight_ld(
        &self,
        gpu: &Gpu,
        dy: u64,
        lddy: usize,
        x: u64,
        ldx: usize,
        dw: WeightGrad,
        rows: usize,
        inp: usize,
        out: usize,
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        self.gemm(
            gpu,
            &Gemm {
                trans_a: false,
                trans_b: true,
                m: inp,
                n: out,
                k: rows,
                a: x,
                lda: ldx,
                b: dy,
                ldb: lddy,
                c: dw.ptr,
                d: dw.ptr,
                ldd: inp,
                out: dw.ty,
                alpha,
                beta,
            },
        )
    }
}

impl Drop for Lt {
    fn drop(&mut self) {
        unsafe {
            for (_, c) in self.cache.borrow_mut().drain() {
                let _ = lt::destroy_matrix_layout(c.a);
                let _ = lt::destroy_matrix_layout(c.b);
                let _ = lt::destroy_matrix_layout(c.d);
                let _ = lt::destroy_matmul_desc(c.desc);
            }
            let _ = lt::destroy_handle(self.handle);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tuning_leaves_the_heuristic_choice_unless_another_is_clearly_faster() {
        let t = |rank, ms| Timing { rank, ms };
        // 3 % faster: within the margin, rank 0 stays
        assert_eq!(pick(&[t(4, 0.97), t(0, 1.0), t(2, 1.1)]), 0);
        // 20 % faster: taken
        assert_eq!(pick(&[t(5, 0.8), t(0, 1.0)]), 5);
        // rank 0 refused the pointers: the fastest usable one
        assert_eq!(pick(&[t(3, 1.2), t(1, 1.3)]), 3);
        // nothing usable: rank 0 (the product then fails with cuBLASLt's own error)
        assert_eq!(pick(&[]), 0);
    }

    #[test]
    fn only_an_under_aligned_operand_changes_what_cublaslt_is_told() {
        assert_eq!(alignment(0x1000), 256);
        assert_eq!(alignment(0x1040), 64);
        assert_eq!(alignment(0x1002), 2);
        // buffers (256) and weights (128-byte offsets) keep the default assumption
        assert_eq!(declared_alignment([0x1080, 0x2000, 0, 0x3000]), [256; 4]);
        // a weight sub-block at a 64-byte offset makes all four explicit
        assert_eq!(
            declared_alignment([0x1080, 0x2000, 0x3040, 0x3040]),
            [128, 256, 64, 64]
        );
    }
}
