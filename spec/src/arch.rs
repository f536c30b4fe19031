//! Architecture specs: a model family as a function of depth, written as data.
//!
//! A family gives its width rule, head counts (integers or expressions of `depth`), MLP,
//! vocabulary, norm, position encoding, biases, token rule, and a stack of sections. Each
//! section covers a range of layers and repeats a pattern of mixers over it: layer `i` of
//! the section gets `pattern[i % len(pattern)]` (absolute index, as ArchScale's
//! `i % rnn_per_layer` rules). Mixers can export a named memory or KV cache that later
//! layers import (YOCO cross-attention, GMU), so a new hybrid is a new TOML file.

#![allow(clippy::result_large_err)] // ArchIssue carries a full diagnostic; errors are rare

use crate::diag::{SourceFile, SpecError};
use crate::expr::{self, Value};
use crate::tree::{self, Kind, Node, Reader, POSITIVE};
use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

/// Every builtin family, embedded so `arch = "sambay"` works from any directory.
pub const BUILTIN_ARCHS: &[(&str, &str)] = &[
    (
        "transformer",
        include_str!("../../experiments/archs/transformer.toml"),
    ),
    (
        "transformerls",
        include_str!("../../experiments/archs/transformerls.toml"),
    ),
    ("samba", include_str!("../../experiments/archs/samba.toml")),
    (
        "sambay",
        include_str!("../../experiments/archs/sambay.toml"),
    ),
    (
        "sambayda",
        include_str!("../../experiments/archs/sambayda.toml"),
    ),
    (
        "sambayoco",
        include_str!("../../experiments/archs/sambayoco.toml"),
    ),
    (
        "mambay",
        include_str!("../../experiments/archs/mambay.toml"),
    ),
    (
        "sambaymlp",
        include_str!("../../experiments/archs/sambaymlp.toml"),
    ),
    (
        "sambayattn",
        include_str!("../../experiments/archs/sambayattn.toml"),
    ),
    (
        "sambayattnall",
        include_str!("../../experiments/archs/sambayattnall.toml"),
    ),
    (
        "phi4miniflash",
        include_str!("../../experiments/archs/phi4miniflash.toml"),
    ),
    (
        "sambay2",
        include_str!("../../experiments/archs/sambay2.toml"),
    ),
    (
        "mambay2",
        include_str!("../../experiments/archs/mambay2.toml"),
    ),
    ("gdny", include_str!("../../experiments/archs/gdny.toml")),
    ("sgdny", include_str!("../../experiments/archs/sgdny.toml")),
    (
        "tiny-transformer",
        include_str!("../../experiments/archs/tiny-transformer.toml"),
    ),
];

/// Depths checked when an arch file is validated on its own and lists no `depths`.
pub const SAMPLE_DEPTHS: [i64; 5] = [8, 12, 16, 20, 24];

pub const TOP_KEYS: &[&str] = &[
    "name",
    "description",
    "depths",
    "width",
    "heads",
    "kv_groups",
    "head_dim",
    "mlp",
    "vocab_size",
    "padding_multiple",
    "norm",
    "position",
    "tied_embeddings",
    "bias",
    "local_window",
    "mamba",
    "token_rule",
    "require",
    "section",
];
pub const WIDTH_KEYS: &[&str] = &["aspect_ratio", "n_embd"];
pub const MLP_KEYS: &[&str] = &["kind", "expand"];
pub const NORM_KEYS: &[&str] = &["kind", "eps"];
pub const POSITION_KEYS: &[&str] = &["kind", "base"];
pub const BIAS_KEYS: &[&str] = &["mlp", "attn_qkv", "attn_out"];
pub const MAMBA_KEYS: &[&str] = &["d_state", "d_conv", "expand"];
pub const TOKEN_RULE_KEYS: &[&str] = &["mult"];
pub const REQUIRE_KEYS: &[&str] = &["check", "help"];
pub const SECTION_KEYS: &[&str] = &["layers", "pattern", "comment"];
pub const MIXERS: &[&str] = &[
    "attention",
    "cross_attention",
    "mamba",
    "mamba2",
    "gated_deltanet",
    "gmu",
];
pub const LAYER_KEYS: &[&str] = &[
    "mixer",
    "window",
    "differential",
    "export_kv",
    "export_memory",
    "kv",
    "memory",
    "mlp_export_memory",
];

/// An integer or float literal, or an expression string.
#[derive(Clone, Debug)]
pub struct Expr {
    pub text: String,
    pub node: Node,
}

impl Expr {
    fn from_node(r: &mut Reader, node: &Node, what: &str) -> Option<Expr> {
        match &node.kind {
            Kind::Int(i) => Some(Expr {
                text: i.to_string(),
                node: node.clone(),
            }),
            Kind::Float(f) => Some(Expr {
                text: format!("{f:?}"),
                node: node.clone(),
            }),
            Kind::Str(s) => Some(Expr {
                text: s.clone(),
                node: node.clone(),
            }),
            _ => {
                r.push(
                    node.error(format!(
                        "`{what}` must be an integer or an expression string, found {}",
                        node.type_name()
                    ))
                    .label("expected a number or \"expression\"")
                    .help(
                        "write a number, or an expression of depth in quotes, e.g. \"depth // 4\"",
                    ),
                );
                None
            }
        }
    }

    /// Span of `sub` (a range of `text`) inside the source, when the string has no escapes.
    fn sub_span(&self, sub: &Range<usize>) -> Range<usize> {
        let raw = self.node.raw();
        let quoted = raw.len() >= 2 && (raw.starts_with('"') || raw.starts_with('\''));
        if quoted && raw[1..raw.len() - 1] == *self.text {
            let base = self.node.span.start + 1;
            base + sub.start..base + sub.end.max(sub.start + 1).min(self.text.len().max(1))
        } else {
            self.node.span.clone()
        }
    }

    pub fn eval(&self, vars: &[(&str, Value)]) -> Result<Value, SpecError> {
        expr::eval(&self.text, vars).map_err(|e| {
            let mut err = SpecError::new(&self.node.src, self.sub_span(&e.span), e.message.clone())
                .label(e.message);
            err.help = e.help;
            err
        })
    }
}

#[derive(Clone, Debug)]
pub enum Width {
    AspectRatio(i64),
    NEmbd(Expr),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Norm {
    RmsNorm,
    LayerNorm,
}

#[derive(Clone, Debug)]
pub enum WindowSpec {
    /// The run's `swa_len` if given, else the family's `local_window`, else full.
    Local,
    /// Always full causal attention.
    Full,
    /// A fixed window that the run's override does not change.
    Fixed(Expr),
}

#[derive(Clone, Debug)]
pub enum MixerSpec {
    Attention {
        window: WindowSpec,
        differential: bool,
        export_kv: Option<String>,
        export_memory: Option<String>,
    },
    CrossAttention {
        kv: String,
        differential: bool,
    },
    Mamba {
        export_memory: Option<String>,
    },
    Mamba2 {
        export_memory: Option<String>,
    },
    GatedDeltaNet {
        export_memory: Option<String>,
    },
    Gmu {
        memory: String,
    },
}

#[derive(Clone, Debug)]
pub struct LayerSpec {
    pub mixer: MixerSpec,
    pub mlp_export_memory: Option<String>,
    pub node: Node,
}

#[derive(Clone, Debug)]
pub struct Section {
    pub start: Expr,
    /// `None`: the section is the single layer `start`.
    pub end: Option<Expr>,
    pub pattern: Vec<LayerSpec>,
    pub node: Node,
}

#[derive(Clone, Debug)]
pub struct Require {
    pub check: Expr,
    pub help: Option<String>,
}

/// A parsed architecture family.
#[derive(Clone, Debug)]
pub struct ArchSpec {
    pub name: String,
    pub root: Node,
    pub depths: Option<(Vec<i64>, Node)>,
    pub width: Width,
    pub width_node: Node,
    pub heads: Expr,
    pub kv_groups: Option<Expr>,
    pub head_dim: Option<Expr>,
    pub mlp_expand: i64,
    pub vocab_size: i64,
    pub padding_multiple: i64,
    pub norm: Norm,
    pub norm_eps: f64,
    /// `None`: NoPE.
    pub rope_base: Option<f64>,
    pub tied_embeddings: bool,
    pub bias_mlp: bool,
    pub bias_attn_qkv: bool,
    pub bias_attn_out: bool,
    pub local_window: Option<Expr>,
    pub mamba_d_state: i64,
    pub mamba_d_conv: i64,
    pub mamba_expand: i64,
    pub token_mult: Expr,
    pub requires: Vec<Require>,
    pub sections: Vec<Section>,
}

impl ArchSpec {
    pub fn src(&self) -> &Arc<SourceFile> {
        &self.root.src
    }
}

/// Parse an arch file; all structural errors at once.
pub fn parse_arch(src: &Arc<SourceFile>) -> Result<ArchSpec, Vec<SpecError>> {
    let root = tree::parse(src).map_err(|e| vec![e])?;
    let mut r = Reader::default();
    let spec = read_arch(&mut r, &root);
    match spec {
        Some(s) if r.errors.is_empty() => Ok(s),
        _ => Err(r.errors),
    }
}

fn missing(r: &mut Reader, root: &Node, key: &str, help: &str) {
    let span = if root.span.is_empty() {
        0..0
    } else {
        root.span.clone()
    };
    r.push(
        SpecError::new(&root.src, span, format!("missing required key `{key}`"))
            .label("required")
            .help(help),
    );
}

fn read_arch(r: &mut Reader, root: &Node) -> Option<ArchSpec> {
    r.table(root, "", TOP_KEYS)?;
    let name = match root.get("name") {
        Some(n) => r.string(n, "name"),
        None => {
            missing(
                r,
                root,
                "name",
                "the family name, e.g. name = \"sambay\" (ArchScale train_model)",
            );
            None
        }
    };
    if let Some(d) = root.get("description") {
        r.string(d, "description");
    }
    let depths = root.get("depths").and_then(|n| {
        let items = r.array(n, "depths")?;
        if items.is_empty() {
            r.push(
                n.error("`depths` must list at least one depth")
                    .label("empty")
                    .help("omit `depths` to allow any depth"),
            );
            return None;
        }
        let v: Vec<i64> = items
            .iter()
            .filter_map(|x| r.int(x, "depths", POSITIVE, false))
            .collect();
        Some((v, n.clone()))
    });
    let width = match root.get("width") {
        Some(w) => read_width(r, w).map(|x| (x, w.clone())),
        None => {
            missing(r, root, "width", "width = { aspect_ratio = 128 } (n_embd = 128 * depth) or width = { n_embd = 2048 }");
            None
        }
    };
    let heads = match root.get("heads") {
        Some(h) => Expr::from_node(r, h, "heads"),
        None => {
            missing(
                r,
                root,
                "heads",
                "the number of attention heads, e.g. heads = \"depth\"",
            );
            None
        }
    };
    let kv_groups = root
        .get("kv_groups")
        .and_then(|n| Expr::from_node(r, n, "kv_groups"));
    let head_dim = root
        .get("head_dim")
        .and_then(|n| Expr::from_node(r, n, "head_dim"));
    let mut mlp_expand = 4;
    if let Some(m) = root.get("mlp") {
        if r.table(m, "mlp", MLP_KEYS).is_some() {
            if let Some(k) = m.get("kind") {
                r.choice(k, "mlp.kind", &["swiglu"]);
            }
            if let Some(e) = m.get("expand") {
                mlp_expand = r.int(e, "mlp.expand", POSITIVE, false).unwrap_or(4);
            }
        }
    }
    let vocab_size = match root.get("vocab_size") {
        Some(v) => r.int(v, "vocab_size", POSITIVE, false),
        None => {
            missing(
                r,
                root,
                "vocab_size",
                "e.g. vocab_size = 32000 (Llama-2 tokenizer)",
            );
            None
        }
    };
    let padding_multiple = root
        .get("padding_multiple")
        .map_or(Some(64), |n| r.int(n, "padding_multiple", POSITIVE, false));
    let (mut norm, mut norm_eps) = (Norm::RmsNorm, 1e-5);
    if let Some(n) = root.get("norm") {
        if r.table(n, "norm", NORM_KEYS).is_some() {
            if let Some(k) = n.get("kind") {
                norm = match r
                    .choice(k, "norm.kind", &["rmsnorm", "layernorm"])
                    .as_deref()
                {
                    Some("layernorm") => Norm::LayerNorm,
                    _ => Norm::RmsNorm,
                };
            }
            if let Some(e) = n.get("eps") {
                norm_eps = r.float(e, "norm.eps", Some(0.0), Some(1.0)).unwrap_or(1e-5);
            }
        }
    }
    let mut rope_base = Some(10000.0);
    match root.get("position") {
        Some(p) => {
            if r.table(p, "position", POSITION_KEYS).is_some() {
                let kind = match p.get("kind") {
                    Some(k) => r.choice(k, "position.kind", &["rope", "none"]),
                    None => {
                        r.push(
                            p.error("missing `kind` in `position`")
                                .label("needs kind")
                                .help("kind = \"rope\" or \"none\""),
                        );
                        None
                    }
                };
                match kind.as_deref() {
                    Some("none") => {
                        rope_base = None;
                        if let Some(b) = p.get("base") {
                            r.push(
                                SpecError::new(
                                    &b.src,
                                    b.key_or_value_span(),
                                    "`base` only applies to kind = \"rope\"",
                                )
                                .label("not used")
                                .help("remove `base`, or set kind = \"rope\""),
                            );
                        }
                    }
                    _ => {
                        if let Some(b) = p.get("base") {
                            rope_base = r.float(b, "position.base", Some(1.0), None);
                        }
                    }
                }
            }
        }
        None => missing(
            r,
            root,
            "position",
            "position = { kind = \"rope\", base = 10000 } or { kind = \"none\" }",
        ),
    }
    let tied_embeddings = root
        .get("tied_embeddings")
        .and_then(|n| r.boolean(n, "tied_embeddings"))
        .unwrap_or(false);
    let (mut bias_mlp, mut bias_attn_qkv, mut bias_attn_out) = (false, false, false);
    if let Some(b) = root.get("bias") {
        if r.table(b, "bias", BIAS_KEYS).is_some() {
            let mut flag = |key: &str, slot: &mut bool| {
                if let Some(n) = b.get(key) {
                    *slot = r.boolean(n, &format!("bias.{key}")).unwrap_or(false);
                }
            };
            flag("mlp", &mut bias_mlp);
            flag("attn_qkv", &mut bias_attn_qkv);
            flag("attn_out", &mut bias_attn_out);
        }
    }
    let local_window = root
        .get("local_window")
        .and_then(|n| Expr::from_node(r, n, "local_window"));
    let (mut d_state, mut d_conv, mut m_expand) = (16, 4, 2);
    if let Some(m) = root.get("mamba") {
        if r.table(m, "mamba", MAMBA_KEYS).is_some() {
            if let Some(n) = m.get("d_state") {
                d_state = r.int(n, "mamba.d_state", POSITIVE, false).unwrap_or(16);
            }
            if let Some(n) = m.get("d_conv") {
                d_conv = r.int(n, "mamba.d_conv", POSITIVE, false).unwrap_or(4);
            }
            if let Some(n) = m.get("expand") {
                m_expand = r.int(n, "mamba.expand", POSITIVE, false).unwrap_or(2);
            }
        }
    }
    let token_mult = match root.get("token_rule") {
        Some(t) => {
            r.table(t, "token_rule", TOKEN_RULE_KEYS);
            match t.get("mult") {
                Some(m) => Expr::from_node(r, m, "token_rule.mult"),
                None => {
                    r.push(t.error("missing `mult` in `token_rule`").label("needs mult").help(
                        "ArchScale's non-embedding estimate is mult * depth^3, e.g. mult = \"14.5*ar^2\"",
                    ));
                    None
                }
            }
        }
        None => {
            missing(
                r,
                root,
                "token_rule",
                "token_rule = { mult = \"14.5*ar^2\" }: the Chinchilla rule uses n_target = mult * depth^3",
            );
            None
        }
    };
    let mut requires = Vec::new();
    if let Some(req) = root.get("require") {
        for item in r.array(req, "require").unwrap_or(&[]) {
            if r.table(item, "require", REQUIRE_KEYS).is_none() {
                continue;
            }
            let help = item.get("help").and_then(|h| r.string(h, "require.help"));
            match item.get("check") {
                Some(c) => {
                    if let Some(check) = Expr::from_node(r, c, "require.check") {
                        requires.push(Require { check, help });
                    }
                }
                None => r.push(item.error("missing `check` in `[[require]]`").label("needs check").help(
                    "check = \"depth % 4 == 0\": a boolean expression that must hold at every depth",
                )),
            }
        }
    }
    let mut sections = Vec::new();
    match root.get("section") {
        Some(s) => {
            for item in r.array(s, "section").unwrap_or(&[]) {
                if let Some(sec) = read_section(r, item) {
                    sections.push(sec);
                }
            }
        }
        None => missing(
            r,
            root,
            "section",
            "add [[section]] tables: layers = \"0 .. depth\", pattern = [\"attention\"]",
        ),
    }
    Some(ArchSpec {
        name: name?,
        root: root.clone(),
        depths,
        width: width.as_ref()?.0.clone(),
        width_node: width?.1,
        heads: heads?,
        kv_groups,
        head_dim,
        mlp_expand,
        vocab_size: vocab_size?,
        padding_multiple: padding_multiple?,
        norm,
        norm_eps,
        rope_base,
        tied_embeddings,
        bias_mlp,
        bias_attn_qkv,
        bias_attn_out,
        local_window,
        mamba_d_state: d_state,
        mamba_d_conv: d_conv,
        mamba_expand: m_expand,
        token_mult: token_mult?,
        requires,
        sections,
    })
}

fn read_width(r: &mut Reader, w: &Node) -> Option<Width> {
    r.table(w, "width", WIDTH_KEYS)?;
    match (w.get("aspect_ratio"), w.get("n_embd")) {
        (Some(a), None) => r
            .int(a, "width.aspect_ratio", POSITIVE, false)
            .map(Width::AspectRatio),
        (None, Some(n)) => Expr::from_node(r, n, "width.n_embd").map(Width::NEmbd),
        (Some(a), Some(_)) => {
            r.push(
                SpecError::new(
                    &a.src,
                    a.key_or_value_span(),
                    "`width` has both `aspect_ratio` and `n_embd`",
                )
                .label("conflicts with n_embd")
                .help("give one: aspect_ratio (n_embd = ar * depth) or an explicit n_embd"),
            );
            None
        }
        (None, None) => {
            r.push(
                w.error("`width` needs `aspect_ratio` or `n_embd`")
                    .label("empty width")
                    .help("width = { aspect_ratio = 128 } or width = { n_embd = 2048 }"),
            );
            None
        }
    }
}

fn read_section(r: &mut Reader, item: &Node) -> Option<Section> {
    r.table(item, "section", SECTION_KEYS)?;
    if let Some(c) = item.get("comment") {
        r.string(c, "section.comment");
    }
    let layers = match item.get("layers") {
        Some(l) => l,
        None => {
            r.push(item.error("missing `layers` in `[[section]]`").label("needs layers").help(
                "layers = \"0 .. depth // 2\" (a half-open range) or a single layer, e.g. layers = \"depth // 2\"",
            ));
            return None;
        }
    };
    let (start, end) = match &layers.kind {
        Kind::Int(_) => (Expr::from_node(r, layers, "section.layers")?, None),
        Kind::Str(s) => match s.find("..") {
            Some(pos) => {
                let mut a = layers.clone();
                let mut b = layers.clone();
                a.kind = Kind::Str(s[..pos].to_string());
                b.kind = Kind::Str(s[pos + 2..].to_string());
                let (sa, sb) = (s[..pos].to_string(), s[pos + 2..].to_string());
                (Expr { text: sa, node: a }, Some(Expr { text: sb, node: b }))
            }
            None => (Expr::from_node(r, layers, "section.layers")?, None),
        },
        _ => {
            r.push(
                layers
                    .error(format!(
                        "`layers` must be an integer or a string, found {}",
                        layers.type_name()
                    ))
                    .label("expected \"start .. end\" or a layer index")
                    .help("layers = \"0 .. depth // 2\" or layers = \"depth // 2\""),
            );
            return None;
        }
    };
    let pattern_node = match item.get("pattern") {
        Some(p) => p,
        None => {
            r.push(item.error("missing `pattern` in `[[section]]`").label("needs pattern").help(
                "pattern = [\"mamba\", \"attention\"]: layer i gets pattern[i % len(pattern)]",
            ));
            return None;
        }
    };
    let items = r.array(pattern_node, "section.pattern")?;
    if items.is_empty() {
        r.push(
            pattern_node
                .error("`pattern` is empty")
                .label("empty")
                .help("list at least one mixer"),
        );
        return None;
    }
    let pattern: Vec<LayerSpec> = items.iter().filter_map(|n| read_layer(r, n)).collect();
    if pattern.len() != items.len() {
        return None;
    }
    Some(Section {
        start,
        end,
        pattern,
        node: item.clone(),
    })
}

fn read_layer(r: &mut Reader, node: &Node) -> Option<LayerSpec> {
    let mixer_help = "one of \"attention\", \"cross_attention\", \"mamba\", \"mamba2\", \"gated_deltanet\", \"gmu\"";
    let (kind, table) = match &node.kind {
        Kind::Str(_) => (r.choice(node, "mixer", MIXERS)?, None),
        Kind::Table(_) => {
            r.table(node, "pattern element", LAYER_KEYS)?;
            match node.get("mixer") {
                Some(m) => (r.choice(m, "mixer", MIXERS)?, Some(node)),
                None => {
                    r.push(
                        node.error("pattern element has no `mixer`")
                            .label("needs mixer")
                            .help(mixer_help),
                    );
                    return None;
                }
            }
        }
        _ => {
            r.push(
                node.error(format!(
                    "a pattern element must be a string or a table, found {}",
                    node.type_name()
                ))
                .label("expected a mixer")
                .help(mixer_help),
            );
            return None;
        }
    };
    let allowed: &[&str] = match kind.as_str() {
        "attention" => &[
            "mixer",
            "window",
            "differential",
            "export_kv",
            "export_memory",
            "mlp_export_memory",
        ],
        "cross_attention" => &["mixer", "kv", "differential", "mlp_export_memory"],
        "gmu" => &["mixer", "memory", "mlp_export_memory"],
        _ => &["mixer", "export_memory", "mlp_export_memory"],
    };
    let mut name_of = |key: &str| -> Option<String> {
        let n = table?.get(key)?;
        let s = r.string(n, key)?;
        if s.is_empty() {
            r.push(
                n.error(format!("`{key}` must not be empty"))
                    .label("empty name"),
            );
            return None;
        }
        Some(s)
    };
    let export_memory = name_of("export_memory");
    let export_kv = name_of("export_kv");
    let kv = name_of("kv");
    let memory = name_of("memory");
    let mlp_export_memory = name_of("mlp_export_memory");
    let mut ok = true;
    if let Some(t) = table {
        for (k, n) in t.entries().unwrap_or(&[]) {
            if LAYER_KEYS.contains(&k.as_str()) && !allowed.contains(&k.as_str()) {
                ok = false;
                r.push(
                    SpecError::new(
                        &n.src,
                        n.key_or_value_span(),
                        format!("`{k}` does not apply to a {kind} layer"),
                    )
                    .label("not used by this mixer")
                    .help(format!("{kind} takes: {}", allowed[1..].join(", "))),
                );
            }
        }
    }
    let differential = match table.and_then(|t| t.get("differential")) {
        Some(n) => r.boolean(n, "differential")?,
        None => false,
    };
    let window = match table.and_then(|t| t.get("window")) {
        None => WindowSpec::Local,
        Some(n) => match &n.kind {
            Kind::Str(s) if s == "local" => WindowSpec::Local,
            Kind::Str(s) if s == "full" => WindowSpec::Full,
            Kind::Int(_) | Kind::Str(_) => WindowSpec::Fixed(Expr::from_node(r, n, "window")?),
            _ => {
                r.push(n.error("`window` must be \"local\", \"full\", or a window size").label("bad window").help(
                    "\"local\" uses the family's local_window (or the run's swa_len), \"full\" is full causal attention, a number is a fixed window",
                ));
                return None;
            }
        },
    };
    if !ok {
        return None;
    }
    let mixer = match kind.as_str() {
        "attention" => MixerSpec::Attention {
            window,
            differential,
            export_kv,
            export_memory,
        },
        "cross_attention" => MixerSpec::CrossAttention {
            kv: kv.unwrap_or_else(|| "kv".into()),
            differential,
        },
        "mamba" => MixerSpec::Mamba { export_memory },
        "mamba2" => MixerSpec::Mamba2 { export_memory },
        "gated_deltanet" => MixerSpec::GatedDeltaNet { export_memory },
        _ => MixerSpec::Gmu {
            memory: memory.unwrap_or_else(|| "memory".into()),
        },
    };
    Some(LayerSpec {
        mixer,
        mlp_export_memory,
        node: node.clone(),
    })
}

// ---------------------------------------------------------------------------------------
// Resolution at one depth

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryKind {
    Mamba,
    Mamba2,
    GatedDeltaNet,
    Attention,
    Mlp,
}

#[derive(Clone, Debug, PartialEq)]
pub enum ResolvedMixer {
    Attention {
        /// `None`: full causal.
        window: Option<usize>,
        rope: bool,
        kv_from: Option<usize>,
        exports_kv: bool,
        exports_memory: bool,
        /// Differential attention's `lambda_init`.
        differential: Option<f64>,
    },
    Mamba {
        export_memory: bool,
    },
    Mamba2 {
        export_memory: bool,
    },
    GatedDeltaNet {
        export_memory: bool,
    },
    Gmu {
        memory_from: usize,
        d_mem: usize,
        gated_norm: bool,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct ResolvedLayer {
    pub index: usize,
    pub mixer: ResolvedMixer,
    pub mlp_exports_memory: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResolvedMamba {
    pub d_inner: usize,
    pub d_state: usize,
    pub d_conv: usize,
    pub dt_rank: usize,
}

/// A family at one depth: ArchScale `Config` after `__post_init__`, layers resolved.
#[derive(Clone, Debug, PartialEq)]
pub struct ResolvedArch {
    pub family: String,
    pub depth: usize,
    pub aspect_ratio: Option<usize>,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_query_groups: usize,
    pub head_size: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    pub padding_multiple: usize,
    pub norm: Norm,
    pub norm_eps: f64,
    pub tied_embeddings: bool,
    pub bias: bool,
    pub attn_bias: bool,
    pub attn_out_bias: bool,
    pub rope_base: Option<f64>,
    pub layers: Vec<ResolvedLayer>,
    pub mamba: Option<ResolvedMamba>,
    /// ArchScale's `mult`, and whether Python computes it as an int.
    pub token_mult: f64,
    pub token_mult_is_int: bool,
}

impl ResolvedArch {
    /// Largest sliding window of any layer.
    pub fn max_window(&self) -> Option<usize> {
        self.layers
            .iter()
            .filter_map(|l| match l.mixer {
                ResolvedMixer::Attention { window, .. } => window,
                _ => None,
            })
            .max()
    }

    pub fn uses_differential_attention(&self) -> bool {
        self.layers.iter().any(|l| {
            matches!(
                l.mixer,
                ResolvedMixer::Attention {
                    differential: Some(_),
                    ..
                }
            )
        })
    }
}

/// Who is to blame when a family cannot be built at a depth.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Blame {
    /// The depth (or the run's override) breaks a rule of the family: label the depth.
    Depth,
    /// The arch file is inconsistent at this depth: label the arch file.
    Arch,
}

#[derive(Clone, Debug)]
pub struct ArchIssue {
    pub blame: Blame,
    /// Points into the arch file (the rule that failed).
    pub error: SpecError,
}

impl ArchIssue {
    fn depth(error: SpecError) -> Self {
        Self {
            blame: Blame::Depth,
            error,
        }
    }

    fn arch(error: SpecError) -> Self {
        Self {
            blame: Blame::Arch,
            error,
        }
    }
}

fn want_int(e: &Expr, v: Value, what: &str, min: i64) -> Result<i64, ArchIssue> {
    match v {
        Value::Int(i) if i >= min => Ok(i),
        Value::Int(i) => Err(ArchIssue::depth(
            e.node
                .error(format!(
                    "`{what}` = {} evaluates to {i}; it must be at least {min}",
                    e.text
                ))
                .label(format!("= {i}")),
        )),
        Value::Float(f) => Err(ArchIssue::arch(
            e.node
                .error(format!(
                    "`{what}` = {} is a float ({f:?}); it must be an integer",
                    e.text
                ))
                .label("float")
                .help("use `//` (floor division) instead of `/`"),
        )),
        Value::Bool(_) => Err(ArchIssue::arch(
            e.node
                .error(format!(
                    "`{what}` = {} is a boolean; it must be an integer",
                    e.text
                ))
                .label("boolean"),
        )),
    }
}

fn to_usize(i: i64) -> usize {
    usize::try_from(i).unwrap_or(usize::MAX)
}

/// Build the family at `depth`, with the run's sliding-window override.
pub fn resolve(
    spec: &ArchSpec,
    depth: i64,
    swa_len: Option<usize>,
) -> Result<ResolvedArch, Vec<ArchIssue>> {
    let mut issues = Vec::new();
    let src = spec.src().clone();
    let name_span = spec.root.get("name").map_or(0..0, |n| n.span.clone());
    if depth < 1 {
        return Err(vec![ArchIssue::depth(
            SpecError::new(
                &src,
                name_span,
                format!("depth must be at least 1, found {depth}"),
            )
            .label("family"),
        )]);
    }
    if let Some((allowed, node)) = &spec.depths {
        if !allowed.contains(&depth) {
            let list = allowed
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ");
            return Err(vec![ArchIssue::depth(
                node.error(format!("`{}` does not exist at depth {depth}", spec.name))
                    .label("allowed depths")
                    .help(format!(
                        "{} is defined only at depth {list} (ArchScale's config table raises KeyError for `{}_d{depth}`)",
                        spec.name, spec.name
                    )),
            )]);
        }
    }
    let d = Value::Int(depth);
    let ar = match spec.width {
        Width::AspectRatio(a) => Some(a),
        Width::NEmbd(_) => None,
    };
    let mut vars: Vec<(&str, Value)> = vec![("depth", d)];
    if let Some(a) = ar {
        vars.push(("ar", Value::Int(a)));
    }
    let arch_err = |e: SpecError| vec![ArchIssue::arch(e)];
    let n_embd = match &spec.width {
        Width::AspectRatio(a) => a.checked_mul(depth).ok_or_else(|| {
            vec![ArchIssue::depth(
                spec.width_node
                    .error("n_embd = aspect_ratio * depth overflows")
                    .label("too large"),
            )]
        })?,
        Width::NEmbd(e) => {
            want_int(e, e.eval(&vars).map_err(arch_err)?, "n_embd", 1).map_err(|i| vec![i])?
        }
    };
    vars.push(("n_embd", Value::Int(n_embd)));
    let heads = want_int(
        &spec.heads,
        spec.heads.eval(&vars).map_err(arch_err)?,
        "heads",
        1,
    )
    .map_err(|i| vec![i])?;
    let kv_groups = match &spec.kv_groups {
        Some(e) => {
            want_int(e, e.eval(&vars).map_err(arch_err)?, "kv_groups", 1).map_err(|i| vec![i])?
        }
        None => heads,
    };
    let head_dim = match &spec.head_dim {
        Some(e) => Some(
            want_int(e, e.eval(&vars).map_err(arch_err)?, "head_dim", 1).map_err(|i| vec![i])?,
        ),
        None => None,
    };
    vars.push(("heads", Value::Int(heads)));
    vars.push(("kv_groups", Value::Int(kv_groups)));
    if let Some(h) = head_dim {
        vars.push(("head_dim", Value::Int(h)));
    }
    for req in &spec.requires {
        match req.check.eval(&vars) {
            Ok(Value::Bool(true)) => {}
            Ok(Value::Bool(false)) => {
                let mut e = req
                    .check
                    .node
                    .error(format!(
                        "`{}` needs `{}`, which fails at depth {depth}",
                        spec.name, req.check.text
                    ))
                    .label("fails");
                e.help = req.help.clone();
                issues.push(ArchIssue::depth(e));
            }
            Ok(other) => issues.push(ArchIssue::arch(req.check.node.error(format!(
                "`check` must be a boolean expression, found {}",
                other.type_name()
            )))),
            Err(e) => issues.push(ArchIssue::arch(e)),
        }
    }
    if !issues.is_empty() {
        return Err(issues);
    }
    if heads % kv_groups != 0 {
        let span_node = spec
            .kv_groups
            .as_ref()
            .map_or(&spec.heads.node, |e| &e.node);
        issues.push(ArchIssue::depth(
            span_node
                .error(format!(
                    "at depth {depth}, heads = {heads} is not divisible by kv_groups = {kv_groups}"
                ))
                .label("kv_groups")
                .help(
                    "every KV group serves the same number of query heads: heads % kv_groups == 0",
                ),
        ));
    }
    let head_size = match head_dim {
        Some(h) => h,
        None => {
            if n_embd % heads != 0 {
                issues.push(ArchIssue::depth(
                    spec.heads
                        .node
                        .error(format!("at depth {depth}, n_embd = {n_embd} is not divisible by heads = {heads}"))
                        .label("heads")
                        .help("without head_dim, head size = n_embd / heads must be an integer; give head_dim or change heads"),
                ));
            }
            n_embd / heads
        }
    };
    let intermediate = spec.mlp_expand.saturating_mul(n_embd);
    let token_mult = match spec.token_mult.eval(&vars) {
        Ok(Value::Int(i)) => (i as f64, true),
        Ok(Value::Float(f)) => (f, false),
        Ok(Value::Bool(_)) => {
            issues.push(ArchIssue::arch(
                spec.token_mult
                    .node
                    .error("`token_rule.mult` must be a number")
                    .label("boolean"),
            ));
            (0.0, false)
        }
        Err(e) => {
            issues.push(ArchIssue::arch(e));
            (0.0, false)
        }
    };
    let local_window = match &spec.local_window {
        Some(e) => match e.eval(&vars) {
            Ok(v) => match want_int(e, v, "local_window", 1) {
                Ok(w) => Some(to_usize(w)),
                Err(i) => {
                    issues.push(i);
                    None
                }
            },
            Err(err) => {
                issues.push(ArchIssue::arch(err));
                None
            }
        },
        None => None,
    };
    let local = swa_len.or(local_window);

    // Sections: evaluate ranges, check they tile 0..depth.
    let depth_u = to_usize(depth);
    let mut owner: Vec<Option<(usize, usize)>> = vec![None; depth_u.min(1 << 20)];
    let range_vars: Vec<(&str, Value)> = vec![("depth", d), ("n_embd", Value::Int(n_embd))];
    for (si, sec) in spec.sections.iter().enumerate() {
        let eval_bound = |e: &Expr| -> Result<i64, ArchIssue> {
            let v = e.eval(&range_vars).map_err(ArchIssue::arch)?;
            want_int(e, v, "layers", 0)
        };
        let start = match eval_bound(&sec.start) {
            Ok(s) => s,
            Err(i) => {
                issues.push(i);
                continue;
            }
        };
        let end = match &sec.end {
            Some(e) => match eval_bound(e) {
                Ok(x) => x,
                Err(i) => {
                    issues.push(i);
                    continue;
                }
            },
            None => start + 1,
        };
        let layers_node = sec.node.get("layers").unwrap_or(&sec.node);
        if end > depth || start > end {
            issues.push(ArchIssue::arch(
                layers_node
                    .error(format!("at depth {depth} this section is layers {start}..{end}, outside 0..{depth}"))
                    .label(format!("{start}..{end}"))
                    .help("sections must tile 0 .. depth exactly"),
            ));
            continue;
        }
        for i in to_usize(start)..to_usize(end) {
            if let Some(slot) = owner.get_mut(i) {
                if let Some((other, _)) = slot {
                    let other_node = spec.sections[*other]
                        .node
                        .get("layers")
                        .unwrap_or(&spec.sections[*other].node);
                    issues.push(ArchIssue::arch(
                        layers_node
                            .error(format!("at depth {depth}, layer {i} is in two sections"))
                            .label("overlaps")
                            .also(other_node.label_span(), "this section also covers it")
                            .help("sections must tile 0 .. depth exactly, without overlap"),
                    ));
                    break;
                }
                *slot = Some((si, i % sec.pattern.len()));
            }
        }
    }
    if let Some(gap) = owner.iter().position(Option::is_none) {
        let gap_end = owner[gap..]
            .iter()
            .position(Option::is_some)
            .map_or(owner.len(), |p| gap + p);
        let span = spec
            .root
            .get("section")
            .map_or(0..0, |n| n.key_or_value_span());
        issues.push(ArchIssue::arch(
            SpecError::new(
                &src,
                span,
                format!("at depth {depth}, layers {gap}..{gap_end} are in no section"),
            )
            .label("sections")
            .help("sections must tile 0 .. depth exactly"),
        ));
    }
    if !issues.is_empty() {
        return Err(issues);
    }

    // Layers, in order, tracking named exports (a consumer reads the latest export before it).
    let mut memories: HashMap<String, (usize, MemoryKind)> = HashMap::new();
    let mut kvs: HashMap<String, usize> = HashMap::new();
    let mut layers = Vec::with_capacity(depth_u);
    let n = to_usize(n_embd);
    let d_inner = to_usize(spec.mamba_expand.saturating_mul(n_embd));
    let mut any_mamba = false;
    let (h, s) = (to_usize(heads), to_usize(head_size));
    for (i, slot) in owner.iter().enumerate() {
        let Some((si, pi)) = *slot else { continue };
        let ls = &spec.sections[si].pattern[pi];
        let mixer = match &ls.mixer {
            MixerSpec::Attention {
                window,
                differential,
                export_kv,
                export_memory,
            } => {
                let w = match window {
                    WindowSpec::Local => local,
                    WindowSpec::Full => None,
                    WindowSpec::Fixed(e) => match e
                        .eval(&range_vars)
                        .map_err(ArchIssue::arch)
                        .and_then(|v| want_int(e, v, "window", 1))
                    {
                        Ok(w) => Some(to_usize(w)),
                        Err(issue) => {
                            issues.push(issue);
                            None
                        }
                    },
                };
                if let Some(name) = export_kv {
                    kvs.insert(name.clone(), i);
                }
                if let Some(name) = export_memory {
                    memories.insert(name.clone(), (i, MemoryKind::Attention));
                }
                ResolvedMixer::Attention {
                    window: w,
                    rope: spec.rope_base.is_some(),
                    kv_from: None,
                    exports_kv: export_kv.is_some(),
                    exports_memory: export_memory.is_some(),
                    differential: differential.then(|| lambda_init(i)),
                }
            }
            MixerSpec::CrossAttention { kv, differential } => match kvs.get(kv) {
                Some(&from) => ResolvedMixer::Attention {
                    window: None,
                    rope: spec.rope_base.is_some(),
                    kv_from: Some(from),
                    exports_kv: false,
                    exports_memory: false,
                    differential: differential.then(|| lambda_init(i)),
                },
                None => {
                    issues.push(ArchIssue::arch(
                        ls.node
                            .error(format!("at depth {depth}, cross-attention layer {i} reads KV `{kv}`, which no earlier layer exports"))
                            .label("no KV source")
                            .help(format!("an earlier attention layer needs export_kv = \"{kv}\"")),
                    ));
                    continue;
                }
            },
            MixerSpec::Mamba { export_memory } => {
                any_mamba = true;
                if let Some(name) = export_memory {
                    memories.insert(name.clone(), (i, MemoryKind::Mamba));
                }
                ResolvedMixer::Mamba {
                    export_memory: export_memory.is_some(),
                }
            }
            MixerSpec::Mamba2 { export_memory } => {
                if let Some(name) = export_memory {
                    memories.insert(name.clone(), (i, MemoryKind::Mamba2));
                }
                ResolvedMixer::Mamba2 {
                    export_memory: export_memory.is_some(),
                }
            }
            MixerSpec::GatedDeltaNet { export_memory } => {
                if let Some(name) = export_memory {
                    memories.insert(name.clone(), (i, MemoryKind::GatedDeltaNet));
                }
                ResolvedMixer::GatedDeltaNet {
                    export_memory: export_memory.is_some(),
                }
            }
            MixerSpec::Gmu { memory } => match memories.get(memory) {
                Some(&(from, kind)) => {
                    let d_mem = match kind {
                        MemoryKind::Mamba => d_inner,
                        MemoryKind::Attention => h * s,
                        MemoryKind::Mlp => to_usize(intermediate),
                        MemoryKind::Mamba2 => (2 * n).div_ceil(512) * 512,
                        MemoryKind::GatedDeltaNet => (n * 3 / 4).div_ceil(256) * 256 * 2,
                    };
                    let gated_norm = matches!(kind, MemoryKind::Mamba2 | MemoryKind::GatedDeltaNet);
                    ResolvedMixer::Gmu {
                        memory_from: from,
                        d_mem,
                        gated_norm,
                    }
                }
                None => {
                    issues.push(ArchIssue::arch(
                        ls.node
                            .error(format!("at depth {depth}, GMU layer {i} reads memory `{memory}`, which no earlier layer exports"))
                            .label("no memory source")
                            .help(format!("an earlier layer needs export_memory = \"{memory}\" (or mlp_export_memory)")),
                    ));
                    continue;
                }
            },
        };
        // The MLP runs after the mixer, so its export shadows the mixer's for later layers.
        if let Some(name) = &ls.mlp_export_memory {
            memories.insert(name.clone(), (i, MemoryKind::Mlp));
        }
        layers.push(ResolvedLayer {
            index: i,
            mixer,
            mlp_exports_memory: ls.mlp_export_memory.is_some(),
        });
    }
    let mut depth_issues = Vec::new();
    let uses_da = layers.iter().any(|l| {
        matches!(
            l.mixer,
            ResolvedMixer::Attention {
                differential: Some(_),
                ..
            }
        )
    });
    if uses_da && (heads % 2 != 0 || kv_groups % 2 != 0) {
        let da_node = spec
            .sections
            .iter()
            .flat_map(|s| s.pattern.iter())
            .find(|l| {
                matches!(
                    l.mixer,
                    MixerSpec::Attention {
                        differential: true,
                        ..
                    } | MixerSpec::CrossAttention {
                        differential: true,
                        ..
                    }
                )
            })
            .map_or(&spec.root, |l| &l.node);
        let which = if kv_groups % 2 != 0 {
            format!("kv_groups = {kv_groups}")
        } else {
            format!("heads = {heads}")
        };
        depth_issues.push(ArchIssue::depth(
            da_node
                .error(format!(
                    "differential attention needs an even number of heads and KV groups; `{}` at depth {depth} has {which}",
                    spec.name
                ))
                .label("differential attention")
                .help("differential attention splits heads and KV groups into even/odd pairs (ArchScale builds this config but crashes in the forward pass); pick a depth where both are even"),
        ));
    }
    if let Some(w) = swa_len {
        if w == 0 {
            depth_issues.push(ArchIssue::depth(SpecError::new(
                &src,
                name_span.clone(),
                "swa_len must be at least 1",
            )));
        }
    }
    issues.extend(depth_issues);
    if !issues.is_empty() {
        return Err(issues);
    }
    Ok(ResolvedArch {
        family: spec.name.clone(),
        depth: depth_u,
        aspect_ratio: ar.map(to_usize),
        n_embd: n,
        n_head: h,
        n_query_groups: to_usize(kv_groups),
        head_size: s,
        intermediate_size: to_usize(intermediate),
        vocab_size: to_usize(spec.vocab_size),
        padding_multiple: to_usize(spec.padding_multiple),
        norm: spec.norm,
        norm_eps: spec.norm_eps,
        tied_embeddings: spec.tied_embeddings,
        bias: spec.bias_mlp,
        attn_bias: spec.bias_attn_qkv,
        attn_out_bias: spec.bias_attn_out,
        rope_base: spec.rope_base,
        layers,
        mamba: any_mamba.then(|| ResolvedMamba {
            d_inner,
            d_state: to_usize(spec.mamba_d_state),
            d_conv: to_usize(spec.mamba_d_conv),
            dt_rank: n.div_ceil(16),
        }),
        token_mult: token_mult.0,
        token_mult_is_int: token_mult.1,
    })
}

/// Differential attention's `lambda_init` at absolute block index `i`.
pub fn lambda_init(i: usize) -> f64 {
    0.8 - 0.6 * (-0.3 * i as f64).exp()
}

/// Parse a builtin family by name.
pub fn builtin(name: &str) -> Option<Result<ArchSpec, Vec<SpecError>>> {
    let (_, text) = BUILTIN_ARCHS.iter().find(|(n, _)| *n == name)?;
    let src = SourceFile::new(format!("builtin:archs/{name}.toml"), *text);
    Some(parse_arch(&src))
}

pub fn builtin_names() -> impl Iterator<Item = &'static str> {
    BUILTIN_ARCHS.iter().map(|(n, _)| *n)
}

/// Validate an arch file on its own: parse, then build it at its allowed depths (or the
/// ArchScale scaling grid filtered by its `[[require]]` checks). Returns the depths checked.
pub fn validate_arch(src: &Arc<SourceFile>) -> Result<Vec<i64>, Vec<SpecError>> {
    let spec = parse_arch(src)?;
    let candidates: Vec<i64> = match &spec.depths {
        Some((d, _)) => d.clone(),
        None => SAMPLE_DEPTHS.to_vec(),
    };
    let mut checked = Vec::new();
    let mut errors = Vec::new();
    for depth in candidates {
        match resolve(&spec, depth, None) {
            Ok(_) => checked.push(depth),
            // A sample depth the family's own requirements exclude is not an error.
            Err(issues)
                if spec.depths.is_none() && issues.iter().all(|i| i.blame == Blame::Depth) => {}
            Err(issues) => errors.extend(issues.into_iter().map(|i| i.error)),
        }
    }
    if errors.is_empty() && checked.is_empty() {
        let span = spec
            .root
            .get("require")
            .map_or(0..0, |n| n.key_or_value_span());
        errors.push(
            SpecError::new(
                src,
                span,
                format!(
                    "`{}` builds at none of the depths 8, 12, 16, 20, 24",
                    spec.name
                ),
            )
            .label("requirements")
            .help("list the depths the family exists at with `depths = [...]`"),
        );
    }
    if errors.is_empty() {
        Ok(checked)
    } else {
        let mut e = crate::diag::SpecErrors::new(errors);
        e.dedup();
        Err(e.errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn family(name: &str) -> ArchSpec {
        match builtin(name) {
            Some(Ok(s)) => s,
            Some(Err(e)) => panic!("{}", crate::diag::SpecErrors::new(e).render()),
            None => panic!("no builtin {name}"),
        }
    }

    fn layout(a: &ResolvedArch) -> String {
        a.layers
            .iter()
            .map(|l| match &l.mixer {
                ResolvedMixer::Attention {
                    kv_from: Some(_), ..
                } => "X",
                ResolvedMixer::Attention {
                    exports_kv: true, ..
                } => "A",
                ResolvedMixer::Attention {
                    window: Some(_), ..
                } => "S",
                ResolvedMixer::Attention { .. } => "F",
                ResolvedMixer::Mamba {
                    export_memory: true,
                } => "M*",
                ResolvedMixer::Mamba { .. } => "M",
                ResolvedMixer::Mamba2 {
                    export_memory: true,
                } => "2*",
                ResolvedMixer::Mamba2 { .. } => "2",
                ResolvedMixer::GatedDeltaNet {
                    export_memory: true,
                } => "D*",
                ResolvedMixer::GatedDeltaNet { .. } => "D",
                ResolvedMixer::Gmu { .. } => "G",
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn every_builtin_parses_and_validates() {
        for (name, text) in BUILTIN_ARCHS {
            let src = SourceFile::new(format!("{name}.toml"), *text);
            match validate_arch(&src) {
                Ok(depths) => assert!(!depths.is_empty(), "{name}"),
                Err(e) => panic!("{name}: {}", crate::diag::SpecErrors::new(e).render()),
            }
            assert_eq!(family(name).name, *name);
        }
    }

    #[test]
    fn layouts_match_archscale() {
        let r = |n: &str, d| resolve(&family(n), d, None).unwrap();
        assert_eq!(layout(&r("transformer", 8)), "F F F F F F F F");
        assert_eq!(layout(&r("transformerls", 8)), "S S S F S S S F");
        assert_eq!(layout(&r("samba", 8)), "M S M S M S M S");
        assert_eq!(layout(&r("sambay", 16)), "M S M S M S M S M* A G X G X G X");
        assert_eq!(layout(&r("sambayoco", 8)), "M S M S M A X X");
        assert_eq!(layout(&r("mambay", 16)), "M M M M M M M M M* A G X G X G X");
        assert_eq!(
            layout(&r("sambayattnall", 16)),
            "M S M S M S M S M A G G G G G G"
        );
        assert_eq!(layout(&r("gdny", 16)), "D D D D D D D D D* A G X G X G X");
        assert_eq!(layout(&r("sgdny", 16)), "D S D S D S D S D* A G X G X G X");
        assert_eq!(
            layout(&r("sambay2", 16)),
            "2 S 2 S 2 S 2 S 2* A G X G X G X"
        );
        let phi = r("phi4miniflash", 32);
        assert_eq!(
            layout(&phi),
            "M S M S M S M S M S M S M S M S M* A G X G X G X G X G X G X G X"
        );
    }

    #[test]
    fn shapes_windows_and_memory() {
        let s = resolve(&family("sambay"), 8, None).unwrap();
        assert_eq!(
            (
                s.n_embd,
                s.n_head,
                s.n_query_groups,
                s.head_size,
                s.intermediate_size
            ),
            (992, 8, 2, 128, 3968)
        );
        assert_eq!(
            s.layers[1].mixer,
            ResolvedMixer::Attention {
                window: Some(128),
                rope: false,
                kv_from: None,
                exports_kv: false,
                exports_memory: false,
                differential: None
            }
        );
        assert_eq!(
            s.layers[5].mixer,
            ResolvedMixer::Attention {
                window: None,
                rope: false,
                kv_from: None,
                exports_kv: true,
                exports_memory: false,
                differential: None
            }
        );
        assert_eq!(
            s.layers[6].mixer,
            ResolvedMixer::Gmu {
                memory_from: 4,
                d_mem: 1984,
                gated_norm: false
            }
        );
        assert!(matches!(
            s.layers[7].mixer,
            ResolvedMixer::Attention {
                kv_from: Some(5),
                window: None,
                ..
            }
        ));
        assert_eq!(
            s.mamba,
            Some(ResolvedMamba {
                d_inner: 1984,
                d_state: 16,
                d_conv: 4,
                dt_rank: 62
            })
        );
        assert_eq!((s.token_mult, s.token_mult_is_int), (240808.0, false));

        let t = resolve(&family("transformer"), 12, None).unwrap();
        assert_eq!(
            (t.n_embd, t.n_head, t.n_query_groups, t.head_size),
            (1536, 12, 3, 128)
        );
        assert_eq!(t.rope_base, Some(10000.0));
        assert!(t.mamba.is_none());
        let t_swa = resolve(&family("transformer"), 8, Some(512)).unwrap();
        assert_eq!(t_swa.max_window(), Some(512));

        let ls = resolve(&family("transformerls"), 8, Some(64)).unwrap();
        assert_eq!(layout(&ls), "S S S F S S S F");
        assert_eq!(ls.max_window(), Some(64));

        let attn = resolve(&family("sambayattn"), 16, None).unwrap();
        assert_eq!(
            attn.layers[10].mixer,
            ResolvedMixer::Gmu {
                memory_from: 9,
                d_mem: 16 * 128,
                gated_norm: false
            }
        );
        assert!(matches!(
            attn.layers[8].mixer,
            ResolvedMixer::Mamba {
                export_memory: false
            }
        ));
        let mlp = resolve(&family("sambaymlp"), 16, None).unwrap();
        assert!(mlp.layers[9].mlp_exports_memory);
        assert!(matches!(
            mlp.layers[8].mixer,
            ResolvedMixer::Mamba {
                export_memory: true
            }
        ));
        assert_eq!(
            mlp.layers[10].mixer,
            ResolvedMixer::Gmu {
                memory_from: 9,
                d_mem: 4 * 1920,
                gated_norm: false
            }
        );
        let s2 = resolve(&family("sambay2"), 16, None).unwrap();
        assert_eq!(
            s2.layers[10].mixer,
            ResolvedMixer::Gmu {
                memory_from: 8,
                d_mem: 4096,
                gated_norm: true
            }
        );
        let g = resolve(&family("gdny"), 16, None).unwrap();
        assert_eq!(
            g.layers[10].mixer,
            ResolvedMixer::Gmu {
                memory_from: 8,
                d_mem: 3072,
                gated_norm: true
            }
        );
    }

    #[test]
    fn token_mults_match_hp_spec() {
        let cases: [(&str, i64, f64, bool); 11] = [
            ("transformer", 16, 237568.0, false),
            ("transformerls", 16, 237568.0, false),
            ("samba", 16, 242780.0, true),
            ("sambay", 16, 240808.0, false),
            ("sambay2", 16, 240808.0, false),
            ("phi4miniflash", 32, 104320.0, false),
            ("sambayoco", 16, 240534.0, false),
            ("sambayattn", 16, 240534.0, false),
            ("mambay", 16, 238080.0, true),
            ("sgdny", 16, 262080.0, true),
            ("sambaymlp", 16, 240480.0, false),
        ];
        for (name, d, mult, is_int) in cases {
            let a = resolve(&family(name), d, None).unwrap();
            assert_eq!(
                (a.token_mult, a.token_mult_is_int),
                (mult, is_int),
                "{name}"
            );
        }
    }

    #[test]
    fn differential_attention_rejects_odd_groups() {
        let da = family("sambayda");
        let ok = resolve(&da, 8, None).unwrap();
        match &ok.layers[1].mixer {
            ResolvedMixer::Attention {
                differential: Some(l),
                ..
            } => assert!((l - (0.8 - 0.6 * (-0.3f64).exp())).abs() < 1e-15),
            other => panic!("{other:?}"),
        }
        for d in [12, 20] {
            let issues = resolve(&da, d, None).unwrap_err();
            assert!(issues.iter().all(|i| i.blame == Blame::Depth));
            assert!(
                issues[0].error.message.contains("even"),
                "{}",
                issues[0].error.message
            );
        }
    }

    #[test]
    fn allowed_depths_and_yoco_rule() {
        let issues = resolve(&family("phi4miniflash"), 16, None).unwrap_err();
        assert!(issues[0].error.help.as_deref().unwrap().contains("32"));
        let issues = resolve(&family("sambay"), 10, None).unwrap_err();
        assert!(
            issues[0].error.message.contains("depth % 4 == 0"),
            "{}",
            issues[0].error.message
        );
        assert!(resolve(&family("mambay"), 8, None).is_err());
    }

    #[test]
    fn new_hybrid_needs_no_rust() {
        let text = r#"
name = "mystery"
width = { aspect_ratio = 64 }
heads = "depth"
kv_groups = "depth // 2"
head_dim = 64
vocab_size = 1000
position = { kind = "rope", base = 10000 }
local_window = 256
token_rule = { mult = "14*ar^2" }
[[section]]
layers = "0 .. depth - 2"
pattern = ["mamba", { mixer = "attention", export_memory = "m", export_kv = "kv" }]
[[section]]
layers = "depth - 2 .. depth"
pattern = ["gmu", { mixer = "cross_attention" }]
"#;
        let text = text.replace("\"gmu\"", "{ mixer = \"gmu\", memory = \"m\" }");
        let spec = parse_arch(&SourceFile::new("m.toml", text)).unwrap();
        let a = resolve(&spec, 6, None).unwrap();
        assert_eq!(layout(&a), "M A M A G X");
        assert_eq!(
            a.layers[4].mixer,
            ResolvedMixer::Gmu {
                memory_from: 3,
                d_mem: 6 * 64,
                gated_norm: false
            }
        );
    }

    #[test]
    fn structural_errors_are_all_reported() {
        let text = "name = 3\nwidth = { aspect_ratio = 1, n_embd = 2 }\nheads = true\nvocab_size = -1\nposition = { kind = \"rop\" }\ntoken_rule = {}\nfoo = 1\n";
        let errs = parse_arch(&SourceFile::new("bad.toml", text)).unwrap_err();
        assert!(
            errs.len() >= 7,
            "{}",
            crate::diag::SpecErrors::new(errs.clone()).render()
        );
        for e in &errs {
            assert!(e.span.end <= text.len());
        }
    }

    #[test]
    fn layer_gaps_and_missing_sources_are_reported() {
        let text = r#"
name = "gappy"
width = { n_embd = 64 }
heads = 4
vocab_size = 100
position = { kind = "none" }
token_rule = { mult = "12.0" }
[[section]]
layers = "0 .. depth - 1"
pattern = ["gmu"]
"#;
        let spec = parse_arch(&SourceFile::new("g.toml", text)).unwrap();
        let issues = resolve(&spec, 4, None).unwrap_err();
        assert!(issues
            .iter()
            .any(|i| i.error.message.contains("in no section")));
        let text2 = text.replace("depth - 1", "depth");
        let spec = parse_arch(&SourceFile::new("g.toml", text2)).unwrap();
        let issues = resolve(&spec, 4, None).unwrap_err();
        assert!(issues
            .iter()
            .any(|i| i.error.message.contains("no earlier layer exports")));
    }
}
