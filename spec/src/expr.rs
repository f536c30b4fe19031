//! A tiny, safe expression language for arch specs: `depth // 4`, `14.5*ar^2 + 144*ar`.
//!
//! Python semantics, because ArchScale's rules are Python: `/` is true division (always a
//! float), `//` floors, `%` takes the sign of the divisor, `^` (or `**`) is a power.
//! Integers stay integers unless a float or `/` enters, so the int/float type of a result
//! matches what ArchScale computes (the token rule's `mult` depends on it).
//! Also: comparisons (`== != < <= > >=`), `and`, `or`, `not`, parentheses, and the functions
//! `ceil`, `floor`, `int`, `float`, `min`, `max`. No loops, no side effects, overflow is an error.

use std::fmt;
use std::ops::Range;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Value {
    Int(i64),
    Float(f64),
    Bool(bool),
}

impl Value {
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::Int(_) => "integer",
            Value::Float(_) => "float",
            Value::Bool(_) => "boolean",
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::Int(i) => Some(i as f64),
            Value::Float(f) => Some(f),
            Value::Bool(_) => None,
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Int(i) => write!(f, "{i}"),
            Value::Float(x) => write!(f, "{x:?}"),
            Value::Bool(b) => write!(f, "{b}"),
        }
    }
}

/// An error at a byte range of the expression text.
#[derive(Clone, Debug, PartialEq)]
pub struct ExprError {
    pub message: String,
    pub span: Range<usize>,
    pub help: Option<String>,
}

impl ExprError {
    fn new(span: Range<usize>, message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            span,
            help: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Int(i64),
    Float(f64),
    Ident(String),
    Op(&'static str),
    LParen,
    RParen,
    Comma,
}

const OPS: [&str; 16] = [
    "**", "//", "==", "!=", "<=", ">=", "+", "-", "*", "/", "%", "^", "<", ">", "&&", "||",
];

fn lex(text: &str) -> Result<Vec<(Tok, Range<usize>)>, ExprError> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        if c.is_ascii_whitespace() {
            i += 1;
            continue;
        }
        let start = i;
        if c.is_ascii_digit() || (c == b'.' && bytes.get(i + 1).is_some_and(u8::is_ascii_digit)) {
            let mut is_float = false;
            while i < bytes.len() && (bytes[i].is_ascii_digit() || bytes[i] == b'_') {
                i += 1;
            }
            if i < bytes.len() && bytes[i] == b'.' && bytes.get(i + 1) != Some(&b'.') {
                is_float = true;
                i += 1;
                while i < bytes.len() && (bytes[i].is_ascii_digit() || bytes[i] == b'_') {
                    i += 1;
                }
            }
            if i < bytes.len() && (bytes[i] == b'e' || bytes[i] == b'E') {
                let mut j = i + 1;
                if j < bytes.len() && (bytes[j] == b'+' || bytes[j] == b'-') {
                    j += 1;
                }
                if j < bytes.len() && bytes[j].is_ascii_digit() {
                    is_float = true;
                    i = j;
                    while i < bytes.len() && bytes[i].is_ascii_digit() {
                        i += 1;
                    }
                }
            }
            let lit: String = text[start..i].chars().filter(|&c| c != '_').collect();
            let tok = if is_float {
                lit.parse::<f64>()
                    .map(Tok::Float)
                    .map_err(|_| ExprError::new(start..i, "invalid number"))?
            } else {
                lit.parse::<i64>()
                    .map(Tok::Int)
                    .map_err(|_| ExprError::new(start..i, "integer literal out of range"))?
            };
            out.push((tok, start..i));
            continue;
        }
        if c.is_ascii_alphabetic() || c == b'_' {
            while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                i += 1;
            }
            out.push((Tok::Ident(text[start..i].to_string()), start..i));
            continue;
        }
        match c {
            b'(' => out.push((Tok::LParen, i..i + 1)),
            b')' => out.push((Tok::RParen, i..i + 1)),
            b',' => out.push((Tok::Comma, i..i + 1)),
            _ => {
                let rest = &text[i..];
                match OPS.iter().find(|op| rest.starts_with(**op)) {
                    Some(op) => {
                        out.push((Tok::Op(op), i..i + op.len()));
                        i += op.len();
                        continue;
                    }
                    None => {
                        let ch = rest.chars().next().map_or(1, char::len_utf8);
                        return Err(ExprError::new(
                            i..i + ch,
                            format!("unexpected character `{}`", &rest[..ch]),
                        ));
                    }
                }
            }
        }
        i += 1;
    }
    Ok(out)
}

struct Parser<'a> {
    toks: Vec<(Tok, Range<usize>)>,
    pos: usize,
    vars: &'a [(&'a str, Value)],
    end: usize,
    depth: usize,
}

type R = Result<(Value, Range<usize>), ExprError>;

impl<'a> Parser<'a> {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos).map(|(t, _)| t)
    }

    fn here(&self) -> Range<usize> {
        self.toks
            .get(self.pos)
            .map_or(self.end..self.end, |(_, s)| s.clone())
    }

    fn eat_op(&mut self, ops: &[&str]) -> Option<(&'static str, Range<usize>)> {
        if let Some((Tok::Op(op), span)) = self.toks.get(self.pos) {
            if ops.contains(op) {
                let r = (*op, span.clone());
                self.pos += 1;
                return Some(r);
            }
        }
        None
    }

    fn eat_word(&mut self, word: &str) -> Option<Range<usize>> {
        if let Some((Tok::Ident(w), span)) = self.toks.get(self.pos) {
            if w == word {
                let s = span.clone();
                self.pos += 1;
                return Some(s);
            }
        }
        None
    }

    fn nest(&mut self) -> Result<(), ExprError> {
        self.depth += 1;
        if self.depth > 64 {
            return Err(ExprError::new(self.here(), "expression nested too deeply"));
        }
        Ok(())
    }

    fn or(&mut self) -> R {
        self.nest()?;
        let mut lhs = self.and()?;
        while self
            .eat_word("or")
            .or_else(|| self.eat_op(&["||"]).map(|(_, s)| s))
            .is_some()
        {
            let rhs = self.and()?;
            let (a, b) = (want_bool(&lhs)?, want_bool(&rhs)?);
            lhs = (Value::Bool(a || b), lhs.1.start..rhs.1.end);
        }
        self.depth -= 1;
        Ok(lhs)
    }

    fn and(&mut self) -> R {
        let mut lhs = self.not()?;
        while self
            .eat_word("and")
            .or_else(|| self.eat_op(&["&&"]).map(|(_, s)| s))
            .is_some()
        {
            let rhs = self.not()?;
            let (a, b) = (want_bool(&lhs)?, want_bool(&rhs)?);
            lhs = (Value::Bool(a && b), lhs.1.start..rhs.1.end);
        }
        Ok(lhs)
    }

    fn not(&mut self) -> R {
        if let Some(span) = self.eat_word("not") {
            self.nest()?;
            let v = self.not()?;
            self.depth -= 1;
            let b = want_bool(&v)?;
            return Ok((Value::Bool(!b), span.start..v.1.end));
        }
        self.cmp()
    }

    fn cmp(&mut self) -> R {
        let lhs = self.sum()?;
        if let Some((op, op_span)) = self.eat_op(&["==", "!=", "<", "<=", ">", ">="]) {
            let rhs = self.sum()?;
            let span = lhs.1.start..rhs.1.end;
            let result = match (lhs.0, rhs.0) {
                (Value::Bool(a), Value::Bool(b)) => match op {
                    "==" => a == b,
                    "!=" => a != b,
                    _ => {
                        return Err(ExprError::new(
                            op_span,
                            format!("cannot order booleans with `{op}`"),
                        ))
                    }
                },
                (Value::Int(a), Value::Int(b)) => compare(op, a.cmp(&b)),
                (a, b) => {
                    let (x, y) = (num(&(a, lhs.1.clone()))?, num(&(b, rhs.1.clone()))?);
                    match x.partial_cmp(&y) {
                        Some(o) => compare(op, o),
                        None => op == "!=",
                    }
                }
            };
            return Ok((Value::Bool(result), span));
        }
        Ok(lhs)
    }

    fn sum(&mut self) -> R {
        let mut lhs = self.term()?;
        while let Some((op, op_span)) = self.eat_op(&["+", "-"]) {
            let rhs = self.term()?;
            lhs = arith(op, op_span, lhs, rhs)?;
        }
        Ok(lhs)
    }

    fn term(&mut self) -> R {
        let mut lhs = self.unary()?;
        while let Some((op, op_span)) = self.eat_op(&["*", "/", "//", "%"]) {
            let rhs = self.unary()?;
            lhs = arith(op, op_span, lhs, rhs)?;
        }
        Ok(lhs)
    }

    fn unary(&mut self) -> R {
        if let Some((op, span)) = self.eat_op(&["-", "+"]) {
            self.nest()?;
            let v = self.unary()?;
            self.depth -= 1;
            let full = span.start..v.1.end;
            return match (op, v.0) {
                ("+", Value::Int(_) | Value::Float(_)) => Ok((v.0, full)),
                ("-", Value::Int(i)) => i
                    .checked_neg()
                    .map(|n| (Value::Int(n), full.clone()))
                    .ok_or_else(|| overflow(full)),
                ("-", Value::Float(f)) => Ok((Value::Float(-f), full)),
                _ => Err(ExprError::new(
                    full,
                    format!("`{op}` needs a number, found a boolean"),
                )),
            };
        }
        self.power()
    }

    fn power(&mut self) -> R {
        let base = self.atom()?;
        if let Some((_, op_span)) = self.eat_op(&["^", "**"]) {
            self.nest()?;
            let exp = self.unary()?;
            self.depth -= 1;
            return arith("^", op_span, base, exp);
        }
        Ok(base)
    }

    fn atom(&mut self) -> R {
        let span = self.here();
        let Some(tok) = self.peek().cloned() else {
            return Err(ExprError::new(span, "expression ends too early"));
        };
        self.pos += 1;
        match tok {
            Tok::Int(i) => Ok((Value::Int(i), span)),
            Tok::Float(f) => Ok((Value::Float(f), span)),
            Tok::LParen => {
                let v = self.or()?;
                match self.peek() {
                    Some(Tok::RParen) => {
                        let end = self.here().end;
                        self.pos += 1;
                        Ok((v.0, span.start..end))
                    }
                    _ => Err(ExprError::new(self.here(), "expected `)`")),
                }
            }
            Tok::Ident(name) => {
                if self.peek() == Some(&Tok::LParen) {
                    return self.call(&name, span);
                }
                match name.as_str() {
                    "true" => return Ok((Value::Bool(true), span)),
                    "false" => return Ok((Value::Bool(false), span)),
                    _ => {}
                }
                if let Some((_, v)) = self.vars.iter().find(|(n, _)| *n == name) {
                    return Ok((*v, span));
                }
                let names: Vec<&str> = self.vars.iter().map(|(n, _)| *n).collect();
                let mut err = ExprError::new(span, format!("unknown variable `{name}`"));
                err.help = Some(
                    match crate::diag::did_you_mean(&name, names.iter().copied()) {
                        Some(s) => {
                            format!("did you mean `{s}`? Available here: {}", names.join(", "))
                        }
                        None if names.is_empty() => "no variables are available here".to_string(),
                        None => format!("available here: {}", names.join(", ")),
                    },
                );
                Err(err)
            }
            Tok::Op(op) => Err(ExprError::new(span, format!("unexpected `{op}`"))),
            Tok::RParen => Err(ExprError::new(span, "unexpected `)`")),
            Tok::Comma => Err(ExprError::new(span, "unexpected `,`")),
        }
    }

    fn call(&mut self, name: &str, name_span: Range<usize>) -> R {
        self.pos += 1; // `(`
        let mut args = Vec::new();
        if self.peek() != Some(&Tok::RParen) {
            loop {
                args.push(self.or()?);
                match self.peek() {
                    Some(Tok::Comma) => self.pos += 1,
                    Some(Tok::RParen) => break,
                    _ => return Err(ExprError::new(self.here(), "expected `,` or `)`")),
                }
            }
        }
        let end = self.here().end;
        self.pos += 1; // `)`
        let span = name_span.start..end;
        let arity = |n: usize| -> Result<(), ExprError> {
            if args.len() == n {
                Ok(())
            } else {
                Err(ExprError::new(
                    span.clone(),
                    format!("`{name}` takes {n} argument(s), got {}", args.len()),
                ))
            }
        };
        let to_int = |x: f64, span: &Range<usize>| -> Result<Value, ExprError> {
            if x.is_finite() && x.abs() < 9.0e18 {
                Ok(Value::Int(x as i64))
            } else {
                Err(overflow(span.clone()))
            }
        };
        let v = match name {
            "ceil" | "floor" | "int" => {
                arity(1)?;
                match args[0].0 {
                    Value::Int(i) => Value::Int(i),
                    _ => {
                        let x = num(&args[0])?;
                        let y = match name {
                            "ceil" => x.ceil(),
                            "floor" => x.floor(),
                            _ => x.trunc(),
                        };
                        to_int(y, &span)?
                    }
                }
            }
            "float" => {
                arity(1)?;
                Value::Float(num(&args[0])?)
            }
            "min" | "max" => {
                if args.is_empty() {
                    return Err(ExprError::new(
                        span,
                        format!("`{name}` needs at least one argument"),
                    ));
                }
                let mut best = args[0].clone();
                num(&best)?;
                for a in &args[1..] {
                    let (x, y) = (num(&best)?, num(a)?);
                    if (name == "min" && y < x) || (name == "max" && y > x) {
                        best = a.clone();
                    }
                }
                best.0
            }
            _ => {
                return Err(ExprError {
                    message: format!("unknown function `{name}`"),
                    span: name_span,
                    help: Some("functions: ceil, floor, int, float, min, max".into()),
                })
            }
        };
        Ok((v, span))
    }
}

fn compare(op: &str, o: std::cmp::Ordering) -> bool {
    use std::cmp::Ordering::*;
    match op {
        "==" => o == Equal,
        "!=" => o != Equal,
        "<" => o == Less,
        "<=" => o != Greater,
        ">" => o == Greater,
        _ => o != Less,
    }
}

fn overflow(span: Range<usize>) -> ExprError {
    ExprError::new(span, "integer overflow")
}

fn want_bool(v: &(Value, Range<usize>)) -> Result<bool, ExprError> {
    match v.0 {
        Value::Bool(b) => Ok(b),
        other => Err(ExprError::new(
            v.1.clone(),
            format!("expected a boolean, found {}", other.type_name()),
        )),
    }
}

fn num(v: &(Value, Range<usize>)) -> Result<f64, ExprError> {
    v.0.as_f64()
        .ok_or_else(|| ExprError::new(v.1.clone(), "expected a number, found a boolean"))
}

fn arith(
    op: &str,
    op_span: Range<usize>,
    lhs: (Value, Range<usize>),
    rhs: (Value, Range<usize>),
) -> R {
    let span = lhs.1.start..rhs.1.end;
    let zero = || ExprError::new(rhs.1.clone(), "division by zero");
    let value = match (lhs.0, rhs.0) {
        (Value::Int(a), Value::Int(b)) => match op {
            "+" => Value::Int(a.checked_add(b).ok_or_else(|| overflow(span.clone()))?),
            "-" => Value::Int(a.checked_sub(b).ok_or_else(|| overflow(span.clone()))?),
            "*" => Value::Int(a.checked_mul(b).ok_or_else(|| overflow(span.clone()))?),
            "/" => {
                if b == 0 {
                    return Err(zero());
                }
                Value::Float(a as f64 / b as f64)
            }
            "//" => {
                if b == 0 {
                    return Err(zero());
                }
                let q = a.checked_div(b).ok_or_else(|| overflow(span.clone()))?;
                Value::Int(if a % b != 0 && ((a < 0) != (b < 0)) {
                    q - 1
                } else {
                    q
                })
            }
            "%" => {
                if b == 0 {
                    return Err(zero());
                }
                let r = a.checked_rem(b).ok_or_else(|| overflow(span.clone()))?;
                Value::Int(if r != 0 && ((r < 0) != (b < 0)) {
                    r + b
                } else {
                    r
                })
            }
            _ => {
                if b >= 0 {
                    let e = u32::try_from(b).map_err(|_| overflow(span.clone()))?;
                    Value::Int(a.checked_pow(e).ok_or_else(|| overflow(span.clone()))?)
                } else {
                    Value::Float((a as f64).powf(b as f64))
                }
            }
        },
        (Value::Bool(_), _) | (_, Value::Bool(_)) => {
            return Err(ExprError::new(
                op_span,
                format!("`{op}` needs numbers, found a boolean"),
            ))
        }
        (a, b) => {
            let (x, y) = (
                a.as_f64().unwrap_or(f64::NAN),
                b.as_f64().unwrap_or(f64::NAN),
            );
            let r = match op {
                "+" => x + y,
                "-" => x - y,
                "*" => x * y,
                "/" | "//" | "%" if y == 0.0 => return Err(zero()),
                "/" => x / y,
                "//" => (x / y).floor(),
                "%" => {
                    let r = x % y;
                    if r != 0.0 && ((r < 0.0) != (y < 0.0)) {
                        r + y
                    } else {
                        r
                    }
                }
                _ => x.powf(y),
            };
            if !r.is_finite() {
                return Err(ExprError::new(span, "result is not a finite number"));
            }
            Value::Float(r)
        }
    };
    Ok((value, span))
}

/// Evaluate `text` with the given variables.
pub fn eval(text: &str, vars: &[(&str, Value)]) -> Result<Value, ExprError> {
    let toks = lex(text)?;
    if toks.is_empty() {
        return Err(ExprError::new(0..text.len(), "empty expression"));
    }
    let mut p = Parser {
        toks,
        pos: 0,
        vars,
        end: text.len(),
        depth: 0,
    };
    let (v, _) = p.or()?;
    if p.pos < p.toks.len() {
        return Err(ExprError::new(
            p.here(),
            "unexpected text after the expression",
        ));
    }
    Ok(v)
}

/// The variable names an expression mentions (to tell which inputs it depends on).
pub fn variables(text: &str) -> Vec<String> {
    let Ok(toks) = lex(text) else { return vec![] };
    let mut out = Vec::new();
    for (i, (t, _)) in toks.iter().enumerate() {
        if let Tok::Ident(name) = t {
            let is_call = matches!(toks.get(i + 1), Some((Tok::LParen, _)));
            let keyword = matches!(name.as_str(), "and" | "or" | "not" | "true" | "false");
            if !is_call && !keyword && !out.contains(name) {
                out.push(name.clone());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ev(s: &str, depth: i64) -> Value {
        eval(s, &[("depth", Value::Int(depth)), ("ar", Value::Int(124))]).unwrap()
    }

    #[test]
    fn python_integer_semantics() {
        assert_eq!(ev("depth // 4", 12), Value::Int(3));
        assert_eq!(ev("-7 // 2", 0), Value::Int(-4));
        assert_eq!(ev("-7 % 2", 0), Value::Int(1));
        assert_eq!(ev("7 % -2", 0), Value::Int(-1));
        assert_eq!(ev("depth / 2", 8), Value::Float(4.0));
        assert_eq!(ev("2^10", 0), Value::Int(1024));
        assert_eq!(ev("2**3**2", 0), Value::Int(512));
        assert_eq!(ev("-2^2", 0), Value::Int(-4));
        assert_eq!(ev("2^-1", 0), Value::Float(0.5));
        assert_eq!(ev("1_000 * 3", 0), Value::Int(3000));
    }

    #[test]
    fn token_rule_types_match_archscale() {
        assert_eq!(ev("14.5*ar^2 + 144*ar", 0), Value::Float(240808.0));
        let samba = eval("15*ar^2 + 160*ar", &[("ar", Value::Int(122))]).unwrap();
        assert_eq!(samba, Value::Int(242780));
        let mambay = eval("16*ar^2 + 64*ar", &[("ar", Value::Int(126))]).unwrap();
        assert_eq!(mambay, Value::Int(262080));
    }

    #[test]
    fn comparisons_and_logic() {
        assert_eq!(ev("depth % 4 == 0", 12), Value::Bool(true));
        assert_eq!(
            ev("depth % 4 == 0 and (depth // 4) % 2 == 0", 12),
            Value::Bool(false)
        );
        assert_eq!(ev("not depth > 4 or depth == 2", 2), Value::Bool(true));
        assert_eq!(ev("1 < 1.5", 0), Value::Bool(true));
    }

    #[test]
    fn functions() {
        assert_eq!(ev("ceil(depth / 16)", 17), Value::Int(2));
        assert_eq!(ev("floor(0.75 * 10)", 0), Value::Int(7));
        assert_eq!(ev("max(1, depth, 3)", 5), Value::Int(5));
        assert_eq!(ev("min(2.5, 3)", 5), Value::Float(2.5));
    }

    #[test]
    fn errors_have_spans() {
        let e = eval("depht + 1", &[("depth", Value::Int(1))]).unwrap_err();
        assert_eq!(e.span, 0..5);
        assert!(e.help.unwrap().contains("did you mean `depth`"));
        let e = eval("depth // 0", &[("depth", Value::Int(1))]).unwrap_err();
        assert_eq!(e.message, "division by zero");
        assert_eq!(eval("(1 + 2", &[]).unwrap_err().message, "expected `)`");
        assert_eq!(eval("2^200", &[]).unwrap_err().message, "integer overflow");
        assert!(eval("1 2", &[]).is_err());
        assert!(eval("", &[]).is_err());
        assert!(eval("true + 1", &[]).is_err());
        assert!(eval("depth ; 1", &[("depth", Value::Int(1))]).is_err());
    }

    #[test]
    fn variables_lists_free_names() {
        assert_eq!(
            variables("14.5*ar^2 + ceil(depth / 2)"),
            vec!["ar", "depth"]
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        #[test]
        fn never_panics_and_spans_in_range(s in "[0-9a-z_+*/%^()<>=!., -]{0,40}") {
            let vars = [("depth", Value::Int(16)), ("ar", Value::Int(128))];
            if let Err(e) = eval(&s, &vars) {
                prop_assert!(e.span.start <= e.span.end && e.span.end <= s.len(), "{:?} in {:?}", e, s);
            }
        }
    }
}
