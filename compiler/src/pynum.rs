//! Python number semantics for porting ArchScale's `setup()` arithmetic bit for bit.
//!
//! ArchScale mixes ints and floats: `//` on floats returns a float, `int / int` is
//! correctly rounded, an int meeting a float becomes a float. Which of the two a value
//! is also decides how the reference JSON renders it (`12500000000` vs `4e10` as
//! `40000000000.0`), so values keep their Python type.

use std::fmt;

/// A Python `int` or `float`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum PyNum {
    Int(i128),
    Float(f64),
}

/// Arithmetic that Python would answer with an exception (or that does not fit i128).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PyArithError(pub &'static str);

impl fmt::Display for PyArithError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

type PyResult = Result<PyNum, PyArithError>;

impl PyNum {
    pub fn is_float(self) -> bool {
        matches!(self, PyNum::Float(_))
    }

    /// Python `float(x)`: ints round to nearest, ties to even (as Rust `as f64`).
    pub fn to_f64(self) -> f64 {
        match self {
            PyNum::Int(i) => i as f64,
            PyNum::Float(f) => f,
        }
    }

    /// The value as an integer when it is one (a float only if finite and integral).
    pub fn to_i128(self) -> Option<i128> {
        match self {
            PyNum::Int(i) => Some(i),
            PyNum::Float(f) if f.is_finite() && f.fract() == 0.0 && f.abs() < 1.7e38 => {
                Some(f as i128)
            }
            PyNum::Float(_) => None,
        }
    }

    /// `a * b`.
    pub fn times(self, other: PyNum) -> PyResult {
        match (self, other) {
            (PyNum::Int(a), PyNum::Int(b)) => a
                .checked_mul(b)
                .map(PyNum::Int)
                .ok_or(PyArithError("integer overflow in multiplication")),
            (a, b) => Ok(PyNum::Float(a.to_f64() * b.to_f64())),
        }
    }

    /// `a / b` (true division; int / int is correctly rounded).
    pub fn truediv(self, other: PyNum) -> PyResult {
        match (self, other) {
            (_, PyNum::Int(0)) => Err(PyArithError("division by zero")),
            (_, PyNum::Float(0.0)) => Err(PyArithError("float division by zero")),
            (PyNum::Int(a), PyNum::Int(b)) => Ok(PyNum::Float(int_truediv(a, b))),
            (a, b) => Ok(PyNum::Float(a.to_f64() / b.to_f64())),
        }
    }

    /// `a // b` (floor division; a float operand makes a float result).
    pub fn floordiv(self, other: PyNum) -> PyResult {
        match (self, other) {
            (_, PyNum::Int(0)) => Err(PyArithError("integer division or modulo by zero")),
            (_, PyNum::Float(0.0)) => Err(PyArithError("float floor division by zero")),
            (PyNum::Int(a), PyNum::Int(b)) => {
                let overflow = PyArithError("integer overflow in floor division");
                let (q, r) = (
                    a.checked_div(b).ok_or(overflow.clone())?,
                    a.checked_rem(b).ok_or(overflow)?,
                );
                Ok(PyNum::Int(if r != 0 && ((r < 0) != (b < 0)) {
                    q - 1
                } else {
                    q
                }))
            }
            (a, b) => Ok(PyNum::Float(float_floordiv(a.to_f64(), b.to_f64()))),
        }
    }

    /// Python `int(x)`: truncation toward zero.
    pub fn int(self) -> PyResult {
        match self {
            PyNum::Int(i) => Ok(PyNum::Int(i)),
            PyNum::Float(f) if !f.is_finite() => Err(PyArithError(
                "cannot convert an infinite or NaN float to an integer",
            )),
            PyNum::Float(f) if f.abs() >= 1.7e38 => Err(PyArithError("integer too large")),
            PyNum::Float(f) => Ok(PyNum::Int(f.trunc() as i128)),
        }
    }

    /// JSON as Python's `json.dumps` writes it: ints as integers, floats with a fraction
    /// or exponent (serde_json keeps the `.0`).
    pub fn to_json(self) -> serde_json::Value {
        match self {
            PyNum::Int(i) => match i64::try_from(i) {
                Ok(v) => serde_json::Value::from(v),
                Err(_) => serde_json::Value::from(i as f64),
            },
            PyNum::Float(f) => serde_json::Number::from_f64(f)
                .map(serde_json::Value::Number)
                .unwrap_or(serde_json::Value::Null),
        }
    }
}

impl fmt::Display for PyNum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PyNum::Int(i) => write!(f, "{i}"),
            PyNum::Float(x) if x.fract() == 0.0 && x.abs() < 1e16 => write!(f, "{x:.1}"),
            PyNum::Float(x) => write!(f, "{x}"),
        }
    }
}

/// CPython's `float_floor_div` (Objects/floatobject.c `_float_div_mod`) for finite `vx`,
/// nonzero `wx`: not always `floor(vx / wx)`.
pub fn float_floordiv(vx: f64, wx: f64) -> f64 {
    let mut m = vx % wx; // fmod, exact
    let mut div = (vx - m) / wx;
    if m != 0.0 && ((wx < 0.0) != (m < 0.0)) {
        m += wx;
        div -= 1.0;
    }
    let _ = m;
    if div != 0.0 {
        let mut floordiv = div.floor();
        if div - floordiv > 0.5 {
            floordiv += 1.0;
        }
        floordiv
    } else {
        0.0f64.copysign(vx / wx)
    }
}

/// Python `int / int`: the exact quotient rounded once to the nearest f64 (ties to even).
pub fn int_truediv(a: i128, b: i128) -> f64 {
    debug_assert!(b != 0);
    let negative = (a < 0) != (b < 0);
    let q = uint_truediv(a.unsigned_abs(), b.unsigned_abs());
    if negative {
        -q
    } else {
        q
    }
}

fn bits(x: u128) -> u32 {
    128 - x.leading_zeros()
}

/// Correctly rounded `a / b` for `b > 0`, by long division to 54 significant bits
/// (53 + a guard bit) plus a sticky bit.
fn uint_truediv(a: u128, b: u128) -> f64 {
    if a == 0 {
        return 0.0;
    }
    const LIMIT: u128 = 1 << 53;
    if a <= LIMIT && b <= LIMIT {
        // Both exact in f64: IEEE division is already correctly rounded.
        return a as f64 / b as f64;
    }
    let mut m = a / b;
    let mut r = a % b;
    let mut exp: i32 = 0;
    let sticky;
    if bits(m) > 54 {
        let extra = bits(m) - 54;
        sticky = (m & ((1u128 << extra) - 1)) != 0 || r != 0;
        m >>= extra;
        exp += extra as i32;
    } else {
        while bits(m) < 54 {
            // Next fractional bit: is 2r >= b? (written without overflowing 2r)
            let bit = r >= b - r;
            r = if bit { r - (b - r) } else { r + r };
            m = (m << 1) | bit as u128;
            exp -= 1;
        }
        sticky = r != 0;
    }
    let guard = m & 1;
    let mut mant = m >> 1;
    exp += 1;
    if guard == 1 && (sticky || mant & 1 == 1) {
        mant += 1;
    }
    (mant as f64) * 2f64.powi(exp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int_division_matches_f64_when_exact() {
        let mut x: u64 = 0x9E3779B97F4A7C15;
        for _ in 0..20000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let a = (x >> 11) as i128;
            let b = ((x.rotate_left(29) >> 11) | 1) as i128;
            assert_eq!(int_truediv(a, b), a as f64 / b as f64, "{a}/{b}");
        }
    }

    #[test]
    fn int_division_of_big_ints_is_correctly_rounded() {
        // Values computed with CPython 3 (`(a / b).hex()`), exact int / int.
        let cases: [(i128, i128, f64); 4] = [
            (
                100_000_000_000 * 124_303_360,
                973_078_528,
                12774237271.012932,
            ),
            ((1i128 << 60) + 1, 3, 3.843071682022823e17),
            (
                12345678901234567890123456789,
                987654321,
                1.249999988734375e19,
            ),
            ((1i128 << 54) + 1, 1, 18014398509481984.0),
        ];
        for (a, b, want) in cases {
            assert_eq!(int_truediv(a, b), want, "{a}/{b}");
        }
        // Tie: 2^54 + 2 is exactly halfway between two f64s; ties to even rounds down.
        assert_eq!(int_truediv((1i128 << 54) + 2, 1), 18014398509481984.0);
        assert_eq!(int_truediv((1i128 << 54) + 6, 1), 18014398509481992.0);
    }

    #[test]
    fn float_floor_division_like_python() {
        assert_eq!(float_floordiv(4e10 / 8.0, 8192.0), 610351.0);
        assert_eq!(float_floordiv(5e12, 1024.0), 4882812500.0);
        assert_eq!(float_floordiv(7.0, 2.0), 3.0);
        assert_eq!(float_floordiv(-7.0, 2.0), -4.0);
        // Python: 1 // 0.1 == 9.0 although 1 / 0.1 == 10.0
        assert_eq!(float_floordiv(1.0, 0.1), 9.0);
    }

    #[test]
    fn python_types_propagate() {
        let t = PyNum::Float(4e10);
        let it = t
            .floordiv(PyNum::Int(8))
            .unwrap()
            .floordiv(PyNum::Int(32768))
            .unwrap();
        assert_eq!(it, PyNum::Float(152587.0));
        assert_eq!(
            PyNum::Int(-7).floordiv(PyNum::Int(2)).unwrap(),
            PyNum::Int(-4)
        );
        assert_eq!(PyNum::Float(2.9).int().unwrap(), PyNum::Int(2));
        assert_eq!(PyNum::Int(3).to_json().to_string(), "3");
        assert_eq!(PyNum::Float(3.0).to_json().to_string(), "3.0");
    }
}
