//! A TOML document as a tree whose every node knows its source and span, plus the helpers
//! that read typed values out of it while collecting (not stopping at) errors.

use crate::diag::{did_you_mean, SourceFile, SpecError};
use std::ops::Range;
use std::sync::Arc;

#[derive(Clone, Debug)]
pub enum Kind {
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
    Datetime(String),
    Array(Vec<Node>),
    Table(Vec<(String, Node)>),
}

#[derive(Clone, Debug)]
pub struct Node {
    pub kind: Kind,
    /// The value (for a `[table]`, its header; for a key-less root, empty).
    pub span: Range<usize>,
    /// The key that names this node in its parent table, if any.
    pub key_span: Option<Range<usize>>,
    pub src: Arc<SourceFile>,
}

impl Node {
    pub fn type_name(&self) -> &'static str {
        match self.kind {
            Kind::Str(_) => "a string",
            Kind::Int(_) => "an integer",
            Kind::Float(_) => "a float",
            Kind::Bool(_) => "a boolean",
            Kind::Datetime(_) => "a datetime",
            Kind::Array(_) => "an array",
            Kind::Table(_) => "a table",
        }
    }

    /// The source text of this value.
    pub fn raw(&self) -> &str {
        self.src.text.get(self.span.clone()).unwrap_or("")
    }

    /// Span for labels: the value, or its key when the value has no span of its own.
    pub fn label_span(&self) -> Range<usize> {
        if self.span.is_empty() {
            self.key_span.clone().unwrap_or(self.span.clone())
        } else {
            self.span.clone()
        }
    }

    /// Span of `key = value` (or just the key) for unknown-key errors.
    pub fn key_or_value_span(&self) -> Range<usize> {
        self.key_span.clone().unwrap_or_else(|| self.label_span())
    }

    pub fn error(&self, message: impl Into<String>) -> SpecError {
        SpecError::new(&self.src, self.label_span(), message)
    }

    pub fn entries(&self) -> Option<&[(String, Node)]> {
        match &self.kind {
            Kind::Table(e) => Some(e),
            _ => None,
        }
    }

    pub fn get(&self, key: &str) -> Option<&Node> {
        self.entries()?
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, n)| n)
    }

    pub fn get_mut(&mut self, key: &str) -> Option<&mut Node> {
        match &mut self.kind {
            Kind::Table(e) => e.iter_mut().find(|(k, _)| k == key).map(|(_, n)| n),
            _ => None,
        }
    }

    /// The node at a dotted path (`base.lr`), following tables only.
    pub fn at_path(&self, path: &str) -> Option<&Node> {
        let mut node = self;
        for part in path.split('.') {
            node = node.get(part)?;
        }
        Some(node)
    }

    /// The deepest existing node along a dotted path (for labels of defaulted keys). When
    /// not even the first part exists, the root's first entry (so the label has a span).
    pub fn nearest(&self, path: &str) -> &Node {
        let mut node = self;
        for part in path.split('.') {
            match node.get(part) {
                Some(n) => node = n,
                None => break,
            }
        }
        if std::ptr::eq(node, self) && self.label_span().is_empty() {
            if let Some(entries) = self.entries() {
                if let Some((_, first)) = entries
                    .iter()
                    .find(|(k, _)| k == "arch")
                    .or(entries.first())
                {
                    return first;
                }
            }
        }
        node
    }

    /// Replace or insert the value at a dotted path, creating tables on the way.
    /// Fails (returning the blocking node's span) if a non-table sits on the path.
    pub fn set_path(&mut self, path: &[&str], value: Node) -> Result<(), Range<usize>> {
        let Some((first, rest)) = path.split_first() else {
            return Ok(());
        };
        let blocking = self.label_span();
        let src = value.src.clone();
        let (span, key_span) = (value.span.clone(), value.key_span.clone());
        let Kind::Table(entries) = &mut self.kind else {
            return Err(blocking);
        };
        if rest.is_empty() {
            match entries.iter_mut().find(|(k, _)| k == first) {
                Some((_, n)) => *n = value,
                None => entries.push((first.to_string(), value)),
            }
            return Ok(());
        }
        if !entries.iter().any(|(k, _)| k == first) {
            let table = Node {
                kind: Kind::Table(vec![]),
                span: span.clone(),
                key_span: key_span.clone(),
                src,
            };
            entries.push((first.to_string(), table));
        }
        match entries.iter_mut().find(|(k, _)| k == first) {
            Some((_, n)) => n.set_path(rest, value),
            None => Err(blocking),
        }
    }

    pub fn remove(&mut self, key: &str) -> Option<Node> {
        match &mut self.kind {
            Kind::Table(e) => {
                let i = e.iter().position(|(k, _)| k == key)?;
                Some(e.remove(i).1)
            }
            _ => None,
        }
    }
}

/// Parse TOML text into a span-carrying tree. A syntax error is one diagnostic.
pub fn parse(src: &Arc<SourceFile>) -> Result<Node, SpecError> {
    let doc = toml_edit::ImDocument::parse(src.text.as_str()).map_err(|e| {
        let span = e.span().unwrap_or(0..0);
        let message = e.message().trim().to_string();
        SpecError::new(src, span, format!("TOML syntax error: {message}")).label("here").help(
            "see https://toml.io for the syntax; strings need quotes, tables use [name] headers",
        )
    })?;
    Ok(from_table(doc.as_table(), src, 0..0, None))
}

fn from_table(
    t: &toml_edit::Table,
    src: &Arc<SourceFile>,
    span: Range<usize>,
    key_span: Option<Range<usize>>,
) -> Node {
    let mut entries = Vec::new();
    for (k, item) in t.iter() {
        let ks = t.get_key_value(k).and_then(|(key, _)| key.span());
        if let Some(node) = from_item(item, src, ks) {
            entries.push((k.to_string(), node));
        }
    }
    let span = t.span().unwrap_or(span);
    Node {
        kind: Kind::Table(entries),
        span,
        key_span,
        src: src.clone(),
    }
}

fn from_item(
    item: &toml_edit::Item,
    src: &Arc<SourceFile>,
    key_span: Option<Range<usize>>,
) -> Option<Node> {
    let fallback = key_span.clone().unwrap_or(0..0);
    Some(match item {
        toml_edit::Item::None => return None,
        toml_edit::Item::Value(v) => from_value(v, src, key_span),
        toml_edit::Item::Table(t) => from_table(t, src, fallback, key_span),
        toml_edit::Item::ArrayOfTables(a) => {
            let items: Vec<Node> = a
                .iter()
                .map(|t| from_table(t, src, fallback.clone(), None))
                .collect();
            let span = a
                .span()
                .or_else(|| items.first().map(|n| n.span.clone()))
                .unwrap_or(fallback);
            Node {
                kind: Kind::Array(items),
                span,
                key_span,
                src: src.clone(),
            }
        }
    })
}

fn from_value(v: &toml_edit::Value, src: &Arc<SourceFile>, key_span: Option<Range<usize>>) -> Node {
    use toml_edit::Value as V;
    let span = v.span().unwrap_or_else(|| key_span.clone().unwrap_or(0..0));
    let kind = match v {
        V::String(s) => Kind::Str(s.value().clone()),
        V::Integer(i) => Kind::Int(*i.value()),
        V::Float(f) => Kind::Float(*f.value()),
        V::Boolean(b) => Kind::Bool(*b.value()),
        V::Datetime(d) => Kind::Datetime(d.value().to_string()),
        V::Array(a) => Kind::Array(a.iter().map(|x| from_value(x, src, None)).collect()),
        V::InlineTable(t) => {
            let mut entries = Vec::new();
            for (k, x) in t.iter() {
                let ks = t.get_key_value(k).and_then(|(key, _)| key.span());
                entries.push((k.to_string(), from_value(x, src, ks)));
            }
            Kind::Table(entries)
        }
    };
    Node {
        kind,
        span,
        key_span,
        src: src.clone(),
    }
}

/// Parse a `--set` value: TOML if it parses as a value, else the text as a string.
pub fn parse_value(src: &Arc<SourceFile>, value_start: usize) -> Node {
    let text = src.text.get(value_start..).unwrap_or("");
    let wrapped = format!("v = {text}");
    if let Ok(doc) = toml_edit::ImDocument::parse(wrapped.as_str()) {
        if let Some(toml_edit::Item::Value(v)) = doc.get("v") {
            let mut node = from_value(v, src, None);
            shift(&mut node, value_start, 4);
            return node;
        }
    }
    Node {
        kind: Kind::Str(text.trim().to_string()),
        span: value_start..src.text.len(),
        key_span: None,
        src: src.clone(),
    }
}

fn shift(node: &mut Node, base: usize, prefix: usize) {
    fn moved(r: &Range<usize>, base: usize, prefix: usize) -> Range<usize> {
        (r.start + base).saturating_sub(prefix)..(r.end + base).saturating_sub(prefix)
    }
    node.span = moved(&node.span, base, prefix);
    node.key_span = node.key_span.as_ref().map(|r| moved(r, base, prefix));
    match &mut node.kind {
        Kind::Array(items) => items.iter_mut().for_each(|n| shift(n, base, prefix)),
        Kind::Table(entries) => entries.iter_mut().for_each(|(_, n)| shift(n, base, prefix)),
        _ => {}
    }
}

/// Collects errors while reading typed values out of a tree.
#[derive(Default)]
pub struct Reader {
    pub errors: Vec<SpecError>,
}

/// An integer field's allowed range.
#[derive(Clone, Copy)]
pub struct IntRange {
    pub min: i64,
    pub max: i64,
}

pub const POSITIVE: IntRange = IntRange {
    min: 1,
    max: i64::MAX,
};
pub const NON_NEGATIVE: IntRange = IntRange {
    min: 0,
    max: i64::MAX,
};

impl Reader {
    pub fn push(&mut self, e: SpecError) {
        self.errors.push(e);
    }

    /// The node must be a table; report every key not in `known`.
    pub fn table<'n>(
        &mut self,
        node: &'n Node,
        what: &str,
        known: &[&str],
    ) -> Option<&'n [(String, Node)]> {
        let Some(entries) = node.entries() else {
            self.push(
                node.error(format!(
                    "`{what}` must be a table, found {}",
                    node.type_name()
                ))
                .label("not a table")
                .help(format!(
                    "write [{what}] as a section header, or {what} = {{ key = value }}"
                )),
            );
            return None;
        };
        for (k, n) in entries {
            if !known.contains(&k.as_str()) {
                self.unknown_key(k, n, what, known);
            }
        }
        Some(entries)
    }

    pub fn unknown_key(&mut self, key: &str, node: &Node, what: &str, known: &[&str]) {
        let suggestion = did_you_mean(key, known.iter().copied())
            .or_else(|| synonym(key, known))
            .or_else(|| {
                // A typo of a name ArchScale users know (`learning_rat` -> `learning_rate` -> `lr`).
                let aliases = SYNONYMS
                    .iter()
                    .filter(|(_, to)| known.contains(to))
                    .map(|(from, _)| *from);
                did_you_mean(key, aliases).and_then(|alias| synonym(alias, known))
            });
        let where_ = if what.is_empty() {
            "at the top level".to_string()
        } else {
            format!("in `{what}`")
        };
        let mut e = SpecError::new(
            &node.src,
            node.key_or_value_span(),
            format!("unknown key `{key}` {where_}"),
        )
        .label("unknown key");
        e = match suggestion {
            Some(s) => e.help(format!("did you mean `{s}`?")),
            None => e.help(format!("allowed keys: {}", known.join(", "))),
        };
        self.push(e);
    }

    pub fn string(&mut self, node: &Node, what: &str) -> Option<String> {
        match &node.kind {
            Kind::Str(s) => Some(s.clone()),
            _ => {
                self.push(type_error(node, what, "a string"));
                None
            }
        }
    }

    pub fn boolean(&mut self, node: &Node, what: &str) -> Option<bool> {
        match node.kind {
            Kind::Bool(b) => Some(b),
            _ => {
                self.push(type_error(node, what, "true or false"));
                None
            }
        }
    }

    /// An integer in range. Integral floats (`1e11`) are accepted when `allow_float`.
    pub fn int(
        &mut self,
        node: &Node,
        what: &str,
        range: IntRange,
        allow_float: bool,
    ) -> Option<i64> {
        let v = match node.kind {
            Kind::Int(i) => i,
            Kind::Float(f) if allow_float && f.fract() == 0.0 && f.abs() < 9.0e18 => f as i64,
            Kind::Float(f) if allow_float => {
                self.push(
                    node.error(format!("`{what}` must be a whole number, found {f}"))
                        .label("not a whole number")
                        .help("this count must be a whole number, e.g. 1e11 or 25_165_824_000"),
                );
                return None;
            }
            _ => {
                self.push(type_error(node, what, "an integer"));
                return None;
            }
        };
        if v < range.min || v > range.max {
            let bound = if range.max == i64::MAX {
                format!("at least {}", range.min)
            } else {
                format!("between {} and {}", range.min, range.max)
            };
            self.push(
                node.error(format!("`{what}` must be {bound}, found {v}"))
                    .label("out of range")
                    .help(format!("use a value {bound}")),
            );
            return None;
        }
        Some(v)
    }

    /// A finite number (integers accepted) with an optional range check.
    pub fn float(
        &mut self,
        node: &Node,
        what: &str,
        min: Option<f64>,
        max: Option<f64>,
    ) -> Option<f64> {
        let v = match node.kind {
            Kind::Int(i) => i as f64,
            Kind::Float(f) => f,
            _ => {
                self.push(type_error(node, what, "a number"));
                return None;
            }
        };
        if !v.is_finite() {
            self.push(
                node.error(format!("`{what}` must be finite, found {v}"))
                    .label("not finite")
                    .help("inf and nan are not allowed here"),
            );
            return None;
        }
        if min.is_some_and(|m| v < m) || max.is_some_and(|m| v > m) {
            let range = match (min, max) {
                (Some(a), Some(b)) => format!("between {a} and {b}"),
                (Some(a), None) => format!("at least {a}"),
                (None, Some(b)) => format!("at most {b}"),
                (None, None) => String::new(),
            };
            self.push(
                node.error(format!("`{what}` must be {range}, found {v}"))
                    .label("out of range")
                    .help(format!("use a value {range}")),
            );
            return None;
        }
        Some(v)
    }

    /// One of a fixed set of strings.
    pub fn choice(&mut self, node: &Node, what: &str, options: &[&str]) -> Option<String> {
        let s = self.string(node, what)?;
        if options.contains(&s.as_str()) {
            return Some(s);
        }
        let listed = options
            .iter()
            .map(|o| format!("\"{o}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let help = match did_you_mean(&s, options.iter().copied()) {
            Some(m) => format!("did you mean \"{m}\"? Allowed: {listed}"),
            None => format!("allowed: {listed}"),
        };
        self.push(
            node.error(format!("`{what}` cannot be \"{s}\""))
                .label("not allowed")
                .help(help),
        );
        None
    }

    pub fn array<'n>(&mut self, node: &'n Node, what: &str) -> Option<&'n [Node]> {
        match &node.kind {
            Kind::Array(items) => Some(items),
            _ => {
                self.push(type_error(node, what, "an array"));
                None
            }
        }
    }
}

fn type_error(node: &Node, what: &str, expected: &str) -> SpecError {
    node.error(format!(
        "`{what}` must be {expected}, found {}",
        node.type_name()
    ))
    .label(format!("expected {expected}"))
}

/// Names ArchScale users type, mapped to ours.
const SYNONYMS: [(&str, &str); 16] = [
    ("ctx_len", "seq_len"),
    ("max_tokens", "tokens"),
    ("eta0", "lr"),
    ("learning_rate", "lr"),
    ("b0", "batch_tokens"),
    ("t0", "tokens"),
    ("d0", "depth"),
    ("hd0", "head_dim"),
    ("w_init0", "w_init"),
    ("warmup_tokens0", "warmup_tokens"),
    ("weight_decay0", "weight_decay"),
    ("eps0", "eps"),
    ("min_lr0", "min_lr"),
    ("micro_bsz", "micro_batch"),
    ("train_name", "name"),
    ("n_layer", "depth"),
];

fn synonym<'a>(key: &str, known: &[&'a str]) -> Option<&'a str> {
    let target = SYNONYMS
        .iter()
        .find(|(from, _)| *from == key)
        .map(|(_, to)| *to)?;
    known.iter().copied().find(|k| *k == target)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_point_at_values_and_keys() {
        let src = SourceFile::new("t.toml", "a = 1\n[train]\nseq_len = 4096\nx.y = \"s\"\n");
        let root = parse(&src).unwrap();
        let n = root.at_path("train.seq_len").unwrap();
        assert_eq!(n.raw(), "4096");
        assert_eq!(&src.text[n.key_span.clone().unwrap()], "seq_len");
        let y = root.at_path("train.x.y").unwrap();
        assert_eq!(y.raw(), "\"s\"");
    }

    #[test]
    fn syntax_error_has_span() {
        let src = SourceFile::new("t.toml", "a = \n");
        let e = parse(&src).unwrap_err();
        assert!(e.span.end <= src.text.len());
        assert!(e.message.contains("syntax"));
    }

    #[test]
    fn set_path_creates_tables() {
        let src = SourceFile::new("t.toml", "a = 1\n");
        let mut root = parse(&src).unwrap();
        let vsrc = SourceFile::new("--set", "base.lr=0.1");
        let v = parse_value(&vsrc, 8);
        assert_eq!(v.raw(), "0.1");
        root.set_path(&["base", "lr"], v).unwrap();
        assert!(matches!(root.at_path("base.lr").unwrap().kind, Kind::Float(x) if x == 0.1));
        let bare = parse_value(&SourceFile::new("--set", "arch=sambay"), 5);
        assert!(matches!(bare.kind, Kind::Str(ref s) if s == "sambay"));
    }

    #[test]
    fn unknown_key_suggests() {
        let src = SourceFile::new("t.toml", "[train]\nseq_lem = 1\nctx_len = 2\n");
        let root = parse(&src).unwrap();
        let mut r = Reader::default();
        r.table(root.get("train").unwrap(), "train", &["seq_len", "seed"]);
        assert_eq!(r.errors.len(), 2);
        assert_eq!(r.errors[0].help.as_deref(), Some("did you mean `seq_len`?"));
        assert_eq!(r.errors[1].help.as_deref(), Some("did you mean `seq_len`?"));
    }
}
