//! The float type the CPU ops are generic over (`f32` for training, `f64` for gradient
//! checks), and a bounds-checked strided GEMM on top of `matrixmultiply`.

use rayon::prelude::*;
use std::fmt::Debug;
use std::iter::Sum;
use std::ops::{Add, AddAssign, Div, DivAssign, Mul, MulAssign, Neg, Sub, SubAssign};

/// How the CPU model stores the activations a CUDA run keeps in bf16: `Exact` (the
/// reference) or `Bf16` (rounded where the GPU rounds them, so a GPU-vs-CPU comparison of an
/// ill-conditioned gradient compares like with like; see `CpuModel::with_storage`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Storage {
    #[default]
    Exact,
    Bf16,
}

impl Storage {
    /// Rounds `xs` as this storage keeps them.
    pub fn store<T: Real>(self, xs: &mut [T]) {
        if self == Storage::Bf16 {
            xs.par_iter_mut()
                .for_each(|x| *x = T::from_f32(half::bf16::from_f64(x.to_f64()).to_f32()));
        }
    }
}

/// A real scalar: `f32` or `f64`.
pub trait Real:
    Copy
    + Send
    + Sync
    + Default
    + Debug
    + PartialOrd
    + Sum
    + 'static
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + SubAssign
    + MulAssign
    + DivAssign
{
    const ZERO: Self;
    const ONE: Self;
    fn from_f64(v: f64) -> Self;
    fn from_f32(v: f32) -> Self;
    fn to_f64(self) -> f64;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn ln_1p(self) -> Self;
    fn sqrt(self) -> Self;
    fn abs(self) -> Self;
    fn max(self, other: Self) -> Self;
    fn is_finite(self) -> bool;

    /// `C ← α A B + β C` for an `m×k` A, `k×n` B and `m×n` C given by pointer and strides.
    ///
    /// # Safety
    /// Every addressed element must be in bounds, and C's strides must not alias.
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm_raw(
        m: usize,
        k: usize,
        n: usize,
        alpha: Self,
        a: *const Self,
        rsa: isize,
        csa: isize,
        b: *const Self,
        rsb: isize,
        csb: isize,
        beta: Self,
        c: *mut Self,
        rsc: isize,
        csc: isize,
    );
}

macro_rules! impl_real {
    ($t:ty, $gemm:path) => {
        impl Real for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            #[inline(always)]
            fn from_f64(v: f64) -> Self {
                v as $t
            }
            #[inline(always)]
            fn from_f32(v: f32) -> Self {
                v as $t
            }
            #[inline(always)]
            fn to_f64(self) -> f64 {
                self as f64
            }
            #[inline(always)]
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            #[inline(always)]
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            #[inline(always)]
            fn ln_1p(self) -> Self {
                <$t>::ln_1p(self)
            }
            #[inline(always)]
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            #[inline(always)]
            fn abs(self) -> Self {
                <$t>::abs(self)
            }
            #[inline(always)]
            fn max(self, other: Self) -> Self {
                <$t>::max(self, other)
            }
            #[inline(always)]
            fn is_finite(self) -> bool {
                <$t>::is_finite(self)
            }
            unsafe fn gemm_raw(
                m: usize,
                k: usize,
                n: usize,
                alpha: Self,
                a: *const Self,
                rsa: isize,
                csa: isize,
                b: *const Self,
                rsb: isize,
                csb: isize,
                beta: Self,
                c: *mut Self,
                rsc: isize,
                csc: isize,
            ) {
                $gemm(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc)
            }
        }
    };
}

impl_real!(f32, matrixmultiply::sgemm);
impl_real!(f64, matrixmultiply::dgemm);

/// `1 / (1 + e^-x)`.
#[inline(always)]
pub fn sigmoid<T: Real>(x: T) -> T {
    T::ONE / (T::ONE + (-x).exp())
}

/// `x · sigmoid(x)`.
#[inline(always)]
pub fn silu<T: Real>(x: T) -> T {
    x * sigmoid(x)
}

/// `d silu / dx = σ(x) (1 + x (1 − σ(x)))`.
#[inline(always)]
pub fn silu_grad<T: Real>(x: T) -> T {
    silu_and_grad(x).1
}

/// `(silu(x), silu'(x))` from one sigmoid.
#[inline(always)]
pub fn silu_and_grad<T: Real>(x: T) -> (T, T) {
    let s = sigmoid(x);
    (x * s, s * (T::ONE + x * (T::ONE - s)))
}

/// Where a matrix lives inside a slice: element `(i, j)` is at `offset + i·rs + j·cs`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub offset: usize,
    pub rs: usize,
    pub cs: usize,
}

impl Layout {
    /// Row-major with leading dimension `ld` (row stride), starting at element 0.
    pub const fn row_major(ld: usize) -> Self {
        Layout {
            offset: 0,
            rs: ld,
            cs: 1,
        }
    }

    /// The transpose of the same storage.
    pub const fn t(self) -> Self {
        Layout {
            offset: self.offset,
            rs: self.cs,
            cs: self.rs,
        }
    }

    /// The same strides starting `offset` elements later.
    pub const fn at(self, offset: usize) -> Self {
        Layout {
            offset: self.offset + offset,
            rs: self.rs,
            cs: self.cs,
        }
    }

    fn check(self, rows: usize, cols: usize, len: usize, what: &str) {
        if rows == 0 || cols == 0 {
            return;
        }
        let last = self.offset + (rows - 1) * self.rs + (cols - 1) * self.cs;
        assert!(
            last < len,
            "gemm operand {what} ({rows}x{cols}, {self:?}) exceeds its slice of {len}"
        );
    }
}

/// `C ← α·A·B + β·C` with A `m×k`, B `k×n`, C `m×n` described by [`Layout`]s into slices.
/// Bounds are checked; with `β = 0` C's previous contents are ignored.
#[allow(clippy::too_many_arguments)]
pub fn gemm<T: Real>(
    m: usize,
    k: usize,
    n: usize,
    alpha: T,
    a: &[T],
    la: Layout,
    b: &[T],
    lb: Layout,
    beta: T,
    c: &mut [T],
    lc: Layout,
) {
    if m == 0 || n == 0 {
        return;
    }
    la.check(m, k, a.len(), "A");
    lb.check(k, n, b.len(), "B");
    lc.check(m, n, c.len(), "C");
    assert!(
        m == 1 || n == 1 || lc.rs != lc.cs,
        "gemm: aliasing C strides"
    );
    // Large products with row-major C: split the rows of C over rayon in blocks of
    // PAR_ROWS, a multiple of every micro-kernel tile, so each block is tiled exactly as
    // the serial product is and the result is bitwise the serial one (for any thread count).
    if m * k * n >= PAR_MIN_FLOPS && lc.cs == 1 && lc.rs >= n && m > PAR_ROWS {
        // Only C's own m rows: the slice may continue past them (other heads' outputs).
        let c = &mut c[lc.offset..lc.offset + (m - 1) * lc.rs + n];
        c.par_chunks_mut(PAR_ROWS * lc.rs)
            .enumerate()
            .for_each(|(i, cc)| {
                let i0 = i * PAR_ROWS;
                let mi = PAR_ROWS.min(m - i0);
                let lci = Layout {
                    offset: 0,
                    rs: lc.rs,
                    cs: 1,
                };
                gemm_serial(mi, k, n, alpha, a, la.at(i0 * la.rs), b, lb, beta, cc, lci);
            });
        return;
    }
    gemm_serial(m, k, n, alpha, a, la, b, lb, beta, c, lc);
}

/// Products below this many multiply-adds run on the calling thread.
const PAR_MIN_FLOPS: usize = 1 << 21;
/// Rows of C per parallel task: a multiple of matrixmultiply's MR and NR (4, 8 or 16).
const PAR_ROWS: usize = 64;

#[allow(clippy::too_many_arguments)]
fn gemm_serial<T: Real>(
    m: usize,
    k: usize,
    n: usize,
    alpha: T,
    a: &[T],
    la: Layout,
    b: &[T],
    lb: Layout,
    beta: T,
    c: &mut [T],
    lc: Layout,
) {
    la.check(m, k, a.len(), "A");
    lb.check(k, n, b.len(), "B");
    lc.check(m, n, c.len(), "C");
    // SAFETY: every addressed element was bounds-checked above and C's strides are distinct.
    unsafe {
        T::gemm_raw(
            m,
            k,
            n,
            alpha,
            a.as_ptr().add(la.offset),
            la.rs as isize,
            la.cs as isize,
            b.as_ptr().add(lb.offset),
            lb.rs as isize,
            lb.cs as isize,
            beta,
            c.as_mut_ptr().add(lc.offset),
            lc.rs as isize,
            lc.cs as isize,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Large products take the parallel row split; C is a view inside a longer slice (as
    /// an attention head's output among other heads'), and the split must match the serial
    /// product bit for bit and leave the rest of the slice alone.
    #[test]
    fn parallel_split_matches_serial_inside_a_longer_slice() {
        let (m, k, n) = (300, 64, 128);
        assert!(m * k * n >= PAR_MIN_FLOPS);
        let a: Vec<f32> = (0..m * k)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
            .collect();
        let b: Vec<f32> = (0..k * n)
            .map(|i| ((i * 53 % 97) as f32 - 48.0) / 48.0)
            .collect();
        let ld = n + 3;
        let lc = Layout {
            offset: 2 * ld,
            rs: ld,
            cs: 1,
        };
        let total = 2 * ld + m * ld + 5 * ld;
        let mut par = vec![7.0f32; total];
        let mut ser = par.clone();
        gemm(
            m,
            k,
            n,
            1.5,
            &a,
            Layout::row_major(k),
            &b,
            Layout::row_major(n),
            0.5,
            &mut par,
            lc,
        );
        gemm_serial(
            m,
            k,
            n,
            1.5,
            &a,
            Layout::row_major(k),
            &b,
            Layout::row_major(n),
            0.5,
            &mut ser,
            lc,
        );
        assert!(par == ser);
        for (i, v) in par.iter().enumerate() {
            let (row, col) = (i / ld, i % ld);
            let inside = row >= 2 && row < 2 + m && col < n;
            if !inside {
                assert_eq!(*v, 7.0, "element {i} outside C was written");
            }
        }
    }

    #[test]
    fn gemm_matches_naive_with_transposes() {
        let (m, k, n) = (3, 5, 4);
        let a: Vec<f64> = (0..m * k).map(|i| (i as f64 * 0.37).sin()).collect();
        let b: Vec<f64> = (0..n * k).map(|i| (i as f64 * 0.91).cos()).collect();
        // B stored as [n, k] and used transposed.
        let mut c = vec![1.0f64; m * n];
        gemm(
            m,
            k,
            n,
            2.0,
            &a,
            Layout::row_major(k),
            &b,
            Layout::row_major(k).t(),
            0.5,
            &mut c,
            Layout::row_major(n),
        );
        for i in 0..m {
            for j in 0..n {
                let dot: f64 = (0..k).map(|p| a[i * k + p] * b[j * k + p]).sum();
                assert!((c[i * n + j] - (2.0 * dot + 0.5)).abs() < 1e-12);
            }
        }
    }
}
