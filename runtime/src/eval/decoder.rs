//! Incremental decoding on the CPU: the Plan's model run a chunk of tokens at a time with
//! a KV cache for attention layers and the recurrent state (conv window + SSM state) for
//! Mamba layers, returning logits. Prefill is one chunk; each generated token is another.
//!
//! [`CpuModel`](crate::cpu::CpuModel) only exposes losses, so this module composes the same
//! public ops (`linear_forward`, the norms, `swiglu_forward`, `silu_gate_forward`, the bf16
//! RoPE table, `embedding_forward`) into a forward pass that keeps state between calls. The
//! mixers' sequence ops (attention over the cache, the conv window, the scan recurrence) are
//! written here per token, with the formulas of `ops::attention`, `ops::conv1d` and
//! `ops::selective_scan`. Tests check the logits against `CpuModel::forward_loss`.
//!
//! Supported: attention (GQA, RoPE, sliding window, μP scales, biases), YOCO
//! cross-attention, differential attention (arch-spec §1.8, λ and subln from
//! `ops::diff_attention`), Mamba-1, GMU (plain gate), RMSNorm/LayerNorm, tied heads. The
//! plan-only mixers are errors that name the layer. The input is one
//! document: varlen (EOS) boundaries are not applied, as in ArchScale's `eval.py`.

use crate::cpu::float::silu;
use crate::cpu::ops::diff_attention::{lambda_full, Lambdas, SUBLN_EPS};
use crate::cpu::ops::embedding::embedding_forward;
use crate::cpu::ops::layernorm::layernorm_forward;
use crate::cpu::ops::linear::linear_forward;
use crate::cpu::ops::rmsnorm::rmsnorm_forward;
use crate::cpu::ops::rope::RopeTable;
use crate::cpu::ops::silu_gate::silu_gate_forward;
use crate::cpu::ops::swiglu::swiglu_forward;
use crate::{Result, RuntimeError};
use archscale_compiler::{Mixer, NormKind, Plan};
use rayon::prelude::*;
use std::collections::HashMap;

fn err(msg: impl Into<String>) -> RuntimeError {
    RuntimeError::Message(msg.into())
}

#[derive(Clone, Copy, Debug)]
enum Norm {
    Rms { w: usize },
    Layer { w: usize, b: usize },
}

#[derive(Clone, Copy, Debug)]
struct Lin {
    w: usize,
    b: Option<usize>,
    d_in: usize,
    d_out: usize,
}

/// Differential attention's parameters (indices) and `λ_init`.
#[derive(Clone, Copy, Debug)]
struct DiffRef {
    q1: usize,
    k1: usize,
    q2: usize,
    k2: usize,
    subln: usize,
    lambda_init: f64,
}

#[derive(Clone, Debug)]
enum MixerRef {
    Attention {
        qkv: Lin,
        proj: Lin,
        window: Option<usize>,
        rope: bool,
        kv_from: Option<usize>,
        diff: Option<DiffRef>,
    },
    Mamba {
        in_proj: usize,
        conv_w: usize,
        conv_b: usize,
        x_proj: usize,
        dt_w: usize,
        dt_b: usize,
        a_log: usize,
        d_skip: usize,
        out_proj: usize,
    },
    Gmu {
        in_proj: Lin,
        out_proj: Lin,
        memory_from: usize,
    },
}

/// What a layer exports as GMU memory.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Export {
    None,
    /// Mamba `y` before the gate, or attention output before `proj`.
    Mixer,
    /// MLP up-half.
    Mlp,
}

#[derive(Clone, Debug)]
struct BlockRef {
    norm_1: Norm,
    mixer: MixerRef,
    norm_2: Norm,
    w1: Lin,
    w3: Lin,
    export: Export,
}

/// Per-layer state carried between chunks.
#[derive(Clone, Debug)]
enum LayerState {
    /// K and V per KV head, `[tokens, head_size]` each, RoPE already applied to K.
    Attention { k: Vec<Vec<f32>>, v: Vec<Vec<f32>> },
    /// The last `d_conv − 1` conv inputs (oldest first, `[d_conv − 1, d_inner]`) and the
    /// SSM state `[d_inner, d_state]`.
    Mamba { conv: Vec<f32>, ssm: Vec<f32> },
    /// Cross-attention and GMU layers keep nothing of their own.
    Stateless,
}

/// Decoding state: everything needed to continue a sequence. Cheap to clone for small
/// models (scoring several continuations of one context).
#[derive(Clone, Debug)]
pub struct DecoderState {
    pos: usize,
    layers: Vec<LayerState>,
}

impl DecoderState {
    /// Tokens consumed so far.
    pub fn len(&self) -> usize {
        self.pos
    }
    pub fn is_empty(&self) -> bool {
        self.pos == 0
    }
}

/// Which logits [`Decoder::feed`] returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// The last token's, `[padded_vocab]`.
    Last,
    /// Every fed token's, `[chunk, padded_vocab]`.
    All,
}

/// A Plan's model with parameters, ready to decode.
pub struct Decoder<'a> {
    plan: &'a Plan,
    params: &'a [Vec<f32>],
    blocks: Vec<BlockRef>,
    wte: usize,
    head: usize,
    ln_f: Norm,
    rope: Option<RopeTable>,
    state: DecoderState,
}

struct Names<'a> {
    index: HashMap<&'a str, usize>,
    plan: &'a Plan,
}

impl Names<'_> {
    fn get(&self, name: &str, numel: usize) -> Result<usize> {
        let &i = self
            .index
            .get(name)
            .ok_or_else(|| err(format!("the plan has no parameter `{name}`")))?;
        if self.plan.params[i].numel() != numel {
            return Err(err(format!(
                "parameter `{name}` has shape {:?}, the decoder expects {numel} values",
                self.plan.params[i].shape
            )));
        }
        Ok(i)
    }
    fn lin(&self, prefix: &str, d_in: usize, d_out: usize, bias: bool) -> Result<Lin> {
        let w = self.get(&format!("{prefix}.weight"), d_in * d_out)?;
        let b = if bias {
            Some(self.get(&format!("{prefix}.bias"), d_out)?)
        } else {
            None
        };
        Ok(Lin { w, b, d_in, d_out })
    }
    fn norm(&self, prefix: &str, kind: NormKind, n: usize) -> Result<Norm> {
        let w = self.get(&format!("{prefix}.weight"), n)?;
        Ok(match kind {
            NormKind::RmsNorm => Norm::Rms { w },
            NormKind::LayerNorm => Norm::Layer {
                w,
                b: self.get(&format!("{prefix}.bias"), n)?,
            },
        })
    }
}

impl<'a> Decoder<'a> {
    /// Resolves every parameter the forward pass needs; `params` are in plan order.
    pub fn new(plan: &'a Plan, params: &'a [Vec<f32>]) -> Result<Self> {
        if params.len() != plan.params.len()
            || params
                .iter()
                .zip(&plan.params)
                .any(|(p, s)| p.len() != s.numel())
        {
            return Err(err("the parameters do not match the plan"));
        }
        let cfg = &plan.model;
        let (n, v, h, g, hs) = (
            cfg.n_embd,
            cfg.padded_vocab_size,
            cfg.n_head,
            cfg.n_query_groups,
            cfg.head_size,
        );
        if g == 0 || h % g != 0 {
            return Err(err(format!(
                "n_head {h} is not a multiple of n_query_groups {g}"
            )));
        }
        let mut index = HashMap::new();
        for (i, p) in plan.params.iter().enumerate() {
            for name in std::iter::once(&p.name).chain(&p.aliases) {
                index.insert(name.as_str(), i);
            }
        }
        let names = Names { index, plan };
        let wte = names.get("transformer.wte.weight", v * n)?;
        let head = names.get("lm_head.weight", v * n)?;
        let ln_f = names.norm("transformer.ln_f", cfg.norm, n)?;
        let mut blocks = Vec::with_capacity(plan.layers.len());
        for (pos, layer) in plan.layers.iter().enumerate() {
            let a = format!("transformer.h.{pos}.attn");
            let (mixer, mixer_exports) = match &layer.mixer {
                Mixer::Attention(at) => {
                    let diff = match &at.differential {
                        Some(d) => {
                            if h % 2 != 0 || g % 2 != 0 {
                                return Err(err(format!(
                                    "layer {pos}: differential attention needs even heads and KV groups, got {h} and {g}"
                                )));
                            }
                            Some(DiffRef {
                                q1: names.get(&format!("{a}.da.lambda_q1"), hs)?,
                                k1: names.get(&format!("{a}.da.lambda_k1"), hs)?,
                                q2: names.get(&format!("{a}.da.lambda_q2"), hs)?,
                                k2: names.get(&format!("{a}.da.lambda_k2"), hs)?,
                                subln: names.get(&format!("{a}.da.subln.weight"), 2 * hs)?,
                                lambda_init: d.lambda_init,
                            })
                        }
                        None => None,
                    };
                    if at.window == Some(0) {
                        return Err(err(format!(
                            "layer {pos}: attention window must be at least 1"
                        )));
                    }
                    if at.rope && (cfg.rope_base.is_none() || hs % 2 != 0) {
                        return Err(err(format!(
                            "layer {pos}: RoPE needs a rope_base and an even head size"
                        )));
                    }
                    if let Some(src) = at.kv_from {
                        let ok = src < pos
                            && matches!(&plan.layers[src].mixer, Mixer::Attention(s) if s.exports_kv && s.kv_from.is_none());
                        if !ok {
                            return Err(err(format!(
                                "layer {pos} reads K/V from layer {src}, which exports none"
                            )));
                        }
                    }
                    let qkv_out = if at.kv_from.is_some() {
                        h * hs
                    } else {
                        (h + 2 * g) * hs
                    };
                    let mixer = MixerRef::Attention {
                        qkv: names.lin(&format!("{a}.attn"), n, qkv_out, cfg.attn_bias)?,
                        proj: names.lin(&format!("{a}.proj"), h * hs, n, cfg.attn_out_bias)?,
                        window: at.window,
                        rope: at.rope,
                        kv_from: at.kv_from,
                        diff,
                    };
                    (mixer, at.exports_memory)
                }
                Mixer::Mamba(mp) => {
                    let m = cfg.mamba.ok_or_else(|| {
                        err(format!(
                            "layer {pos} is Mamba but the model has no Mamba sizes"
                        ))
                    })?;
                    let (d, r, ns, k) = (m.d_inner, m.dt_rank, m.d_state, m.d_conv);
                    if k == 0 {
                        return Err(err("Mamba d_conv must be positive"));
                    }
                    let mixer = MixerRef::Mamba {
                        in_proj: names.get(&format!("{a}.in_proj.weight"), 2 * d * n)?,
                        conv_w: names.get(&format!("{a}.conv1d.weight"), d * k)?,
                        conv_b: names.get(&format!("{a}.conv1d.bias"), d)?,
                        x_proj: names.get(&format!("{a}.x_proj.weight"), (r + 2 * ns) * d)?,
                        dt_w: names.get(&format!("{a}.dt_proj.weight"), d * r)?,
                        dt_b: names.get(&format!("{a}.dt_proj.bias"), d)?,
                        a_log: names.get(&format!("{a}.A_log"), d * ns)?,
                        d_skip: names.get(&format!("{a}.D"), d)?,
                        out_proj: names.get(&format!("{a}.out_proj.weight"), n * d)?,
                    };
                    (mixer, mp.export_memory)
                }
                Mixer::Gmu(gp) => {
                    if gp.gated_norm {
                        return Err(err(format!("layer {pos}: the gated-RMSNorm GMU is plan-only; decoding does not implement it")));
                    }
                    if gp.memory_from >= pos {
                        return Err(err(format!(
                            "layer {pos} reads GMU memory from a later layer {}",
                            gp.memory_from
                        )));
                    }
                    let mixer = MixerRef::Gmu {
                        in_proj: names.lin(&format!("{a}.gmu.in_proj"), n, gp.d_mem, cfg.bias)?,
                        out_proj: names.lin(&format!("{a}.gmu.out_proj"), gp.d_mem, n, cfg.bias)?,
                        memory_from: gp.memory_from,
                    };
                    (mixer, false)
                }
                Mixer::Mamba2 { .. } | Mixer::GatedDeltaNet { .. } => {
                    return Err(err(format!(
                        "layer {pos}: this mixer is plan-only; decoding does not implement it"
                    )))
                }
            };
            let p = format!("transformer.h.{pos}");
            let export = if layer.mlp_exports_memory {
                Export::Mlp
            } else if mixer_exports {
                Export::Mixer
            } else {
                Export::None
            };
            blocks.push(BlockRef {
                norm_1: names.norm(&format!("{p}.norm_1"), cfg.norm, n)?,
                mixer,
                norm_2: names.norm(&format!("{p}.norm_2"), cfg.norm, n)?,
                w1: names.lin(
                    &format!("{p}.mlp.w1"),
                    n,
                    2 * cfg.intermediate_size,
                    cfg.bias,
                )?,
                w3: names.lin(&format!("{p}.mlp.w3"), cfg.intermediate_size, n, cfg.bias)?,
                export,
            });
        }
        for (pos, b) in blocks.iter().enumerate() {
            if let MixerRef::Gmu { memory_from, .. } = b.mixer {
                if blocks[memory_from].export == Export::None {
                    return Err(err(format!(
                        "layer {pos} reads GMU memory from layer {memory_from}, which exports none"
                    )));
                }
            }
        }
        let state = Self::fresh_state(plan, &blocks);
        Ok(Decoder {
            plan,
            params,
            blocks,
            wte,
            head,
            ln_f,
            rope: None,
            state,
        })
    }

    fn fresh_state(plan: &Plan, blocks: &[BlockRef]) -> DecoderState {
        let g = plan.model.n_query_groups;
        let layers = blocks
            .iter()
            .map(|b| match &b.mixer {
                MixerRef::Attention { kv_from: None, .. } => LayerState::Attention {
                    k: vec![Vec::new(); g],
                    v: vec![Vec::new(); g],
                },
                MixerRef::Mamba { .. } => {
                    let m = plan.model.mamba.unwrap_or(archscale_compiler::MambaDims {
                        d_inner: 0,
                        d_state: 0,
                        d_conv: 1,
                        dt_rank: 0,
                    });
                    LayerState::Mamba {
                        conv: vec![0.0; (m.d_conv - 1) * m.d_inner],
                        ssm: vec![0.0; m.d_inner * m.d_state],
                    }
                }
                _ => LayerState::Stateless,
            })
            .collect();
        DecoderState { pos: 0, layers }
    }

    /// A decoder of the same model with a fresh state (one row of a batch).
    pub fn fork(&self) -> Decoder<'a> {
        Decoder {
            plan: self.plan,
            params: self.params,
            blocks: self.blocks.clone(),
            wte: self.wte,
            head: self.head,
            ln_f: self.ln_f,
            rope: self.rope.clone(),
            state: Self::fresh_state(self.plan, &self.blocks),
        }
    }

    /// Forgets the sequence.
    pub fn reset(&mut self) {
        self.state = Self::fresh_state(self.plan, &self.blocks);
    }

    pub fn state(&self) -> &DecoderState {
        &self.state
    }

    /// Continues from a state taken with [`Decoder::state`] from this decoder.
    pub fn set_state(&mut self, state: DecoderState) {
        self.state = state;
    }

    pub fn vocab_size(&self) -> usize {
        self.plan.model.vocab_size
    }

    pub fn padded_vocab_size(&self) -> usize {
        self.plan.model.padded_vocab_size
    }

    /// Runs `tokens` after everything fed so far and returns logits (see [`Logits`]).
    pub fn feed(&mut self, tokens: &[u32], want: Logits) -> Result<Vec<f32>> {
        if tokens.is_empty() {
            return Err(err("nothing to feed the decoder"));
        }
        let cfg = &self.plan.model;
        let v = cfg.padded_vocab_size;
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= v) {
            return Err(err(format!("token {t} is outside the vocabulary of {v}")));
        }
        let (c, n, p0) = (tokens.len(), cfg.n_embd, self.state.pos);
        if cfg.rope_base.is_some() && self.rope.as_ref().is_none_or(|r| r.seq < p0 + c) {
            let cap = (p0 + c).next_power_of_two().max(256);
            self.rope = cfg
                .rope_base
                .map(|base| RopeTable::new(cap, cfg.head_size, base));
        }
        let params = self.params;
        let mut x = vec![0.0f32; c * n];
        embedding_forward(&mut x, tokens, &params[self.wte], n);
        let mut memories: Vec<Option<Vec<f32>>> = vec![None; self.blocks.len()];
        let mut branch = vec![0.0f32; c * n];
        let rs = cfg.residual_scale as f32;
        for l in 0..self.blocks.len() {
            let block = self.blocks[l].clone();
            let u = norm(block.norm_1, &x, params, n, cfg.norm_eps);
            let mem = self.mixer(l, &block.mixer, &u, c, p0, &memories, &mut branch)?;
            if block.export == Export::Mixer {
                memories[l] = Some(mem);
            }
            add_scaled(&mut x, &branch, rs);
            let u2 = norm(block.norm_2, &x, params, n, cfg.norm_eps);
            let inter = cfg.intermediate_size;
            let h1 = lin(block.w1, &u2, params, c);
            let mut act = vec![0.0f32; c * inter];
            swiglu_forward(&mut act, &h1, inter);
            if block.export == Export::Mlp {
                memories[l] = Some(
                    h1.chunks(2 * inter)
                        .flat_map(|r| r[inter..].iter().copied())
                        .collect(),
                );
            }
            branch = lin(block.w3, &act, params, c);
            add_scaled(&mut x, &branch, rs);
        }
        self.state.pos += c;
        let rows = match want {
            Logits::Last => &x[(c - 1) * n..],
            Logits::All => &x[..],
        };
        let r = rows.len() / n;
        let mut hidden = norm(self.ln_f, rows, params, n, cfg.norm_eps);
        let ls = cfg.logit_scale as f32;
        hidden.iter_mut().for_each(|h| *h *= ls);
        let mut logits = vec![0.0f32; r * v];
        linear_forward(&mut logits, &hidden, &params[self.head], None, r, n, v);
        Ok(logits)
    }

    /// The mixer of layer `l` on the chunk's normed input `u` `[c, n]`; writes the branch
    /// output and returns the layer's exportable memory (empty when it has none).
    #[allow(clippy::too_many_arguments)]
    fn mixer(
        &mut self,
        l: usize,
        mixer: &MixerRef,
        u: &[f32],
        c: usize,
        p0: usize,
        memories: &[Option<Vec<f32>>],
        branch: &mut Vec<f32>,
    ) -> Result<Vec<f32>> {
        let cfg = &self.plan.model;
        let params = self.params;
        match mixer {
            MixerRef::Attention {
                qkv,
                proj,
                window,
                rope,
                kv_from,
                diff,
            } => {
                let (h, g, hs) = (cfg.n_head, cfg.n_query_groups, cfg.head_size);
                let qpk = h / g;
                let proj_in = lin(*qkv, u, params, c);
                // q: [c, h, hs]
                let mut q = vec![0.0f32; c * h * hs];
                match kv_from {
                    None => {
                        let slots = qpk + 2;
                        let LayerState::Attention { k, v } = &mut self.state.layers[l] else {
                            return Err(err(format!(
                                "layer {l}: decoder state does not match the model"
                            )));
                        };
                        for i in 0..c {
                            let row = &proj_in[i * g * slots * hs..(i + 1) * g * slots * hs];
                            for gi in 0..g {
                                let base = gi * slots * hs;
                                for j in 0..qpk {
                                    let hq = gi * qpk + j;
                                    q[(i * h + hq) * hs..(i * h + hq + 1) * hs]
                                        .copy_from_slice(&row[base + j * hs..base + (j + 1) * hs]);
                                }
                                let mut key = row[base + qpk * hs..base + (qpk + 1) * hs].to_vec();
                                if *rope {
                                    if let Some(table) = &self.rope {
                                        rotate(&mut key, table, p0 + i);
                                    }
                                }
                                k[gi].extend_from_slice(&key);
                                v[gi].extend_from_slice(
                                    &row[base + (qpk + 1) * hs..base + (qpk + 2) * hs],
                                );
                            }
                        }
                    }
                    Some(_) => q.copy_from_slice(&proj_in),
                }
                if *rope {
                    if let Some(table) = &self.rope {
                        for i in 0..c {
                            for hq in 0..h {
                                rotate(
                                    &mut q[(i * h + hq) * hs..(i * h + hq + 1) * hs],
                                    table,
                                    p0 + i,
                                );
                            }
                        }
                    }
                }
                let source = kv_from.unwrap_or(l);
                let LayerState::Attention { k, v } = &self.state.layers[source] else {
                    return Err(err(format!(
                        "layer {l}: K/V source layer {source} holds no cache"
                    )));
                };
                let scale = cfg.attn_scale as f32;
                let mut y = vec![0.0f32; c * h * hs];
                // Softmax weights of query `qv` (at position `t`) over the visible cached keys.
                let attend = |qv: &[f32], kc: &[f32], t: usize| -> (usize, Vec<f32>) {
                    let lo = window.map_or(0, |w| (t + 1).saturating_sub(w));
                    let scores: Vec<f32> = (lo..=t)
                        .map(|s| {
                            scale
                                * qv.iter()
                                    .zip(&kc[s * hs..(s + 1) * hs])
                                    .map(|(a, b)| a * b)
                                    .sum::<f32>()
                        })
                        .collect();
                    let max = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                    let weights: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
                    let total: f32 = weights.iter().sum();
                    (lo, weights.into_iter().map(|w| w / total).collect())
                };
                let mix = |out: &mut [f32], lo: usize, probs: &[f32], vc: &[f32]| {
                    out.fill(0.0);
                    for (p, s) in probs.iter().zip(lo..) {
                        for (o, vv) in out.iter_mut().zip(&vc[s * hs..(s + 1) * hs]) {
                            *o += p * vv;
                        }
                    }
                };
                match diff {
                    None => {
                        y.par_chunks_mut(hs).enumerate().for_each(|(idx, out)| {
                            let (i, hq) = (idx / h, idx % h);
                            let (lo, probs) =
                                attend(&q[idx * hs..(idx + 1) * hs], &k[hq / qpk], p0 + i);
                            mix(out, lo, &probs, &v[hq / qpk]);
                        });
                    }
                    Some(d) => {
                        // Pair j: queries 2j, 2j+1; kv heads 2jj, 2jj+1 with jj = j / qpk.
                        // O1 − λ·O2 per pair (width 2hs), then subln and (1 − λ_init).
                        let lambdas = Lambdas {
                            q1: &params[d.q1],
                            k1: &params[d.k1],
                            q2: &params[d.q2],
                            k2: &params[d.k2],
                        };
                        let (lambda, _, _) = lambda_full(&lambdas, d.lambda_init);
                        let mut diff_rows = vec![0.0f32; c * h * hs];
                        diff_rows
                            .par_chunks_mut(2 * hs)
                            .enumerate()
                            .for_each(|(idx, out)| {
                                let (i, j) = (idx / (h / 2), idx % (h / 2));
                                let jj = j / qpk;
                                let (k1, k2) = (&k[2 * jj], &k[2 * jj + 1]);
                                let (v1, v2) = (&v[2 * jj], &v[2 * jj + 1]);
                                let q1 = &q[(i * h + 2 * j) * hs..(i * h + 2 * j + 1) * hs];
                                let q2 = &q[(i * h + 2 * j + 1) * hs..(i * h + 2 * j + 2) * hs];
                                let (lo1, a1) = attend(q1, k1, p0 + i);
                                let (lo2, a2) = attend(q2, k2, p0 + i);
                                let mut o2 = vec![0.0f32; 2 * hs];
                                mix(&mut out[..hs], lo1, &a1, v1);
                                mix(&mut out[hs..], lo1, &a1, v2);
                                mix(&mut o2[..hs], lo2, &a2, v1);
                                mix(&mut o2[hs..], lo2, &a2, v2);
                                for (o, b) in out.iter_mut().zip(&o2) {
                                    *o -= lambda * b;
                                }
                            });
                        let mut rstd = vec![0.0f32; c * h / 2];
                        rmsnorm_forward(
                            &mut y,
                            &mut rstd,
                            &diff_rows,
                            &params[d.subln],
                            2 * hs,
                            SUBLN_EPS,
                        );
                        let post = (1.0 - d.lambda_init) as f32;
                        y.iter_mut().for_each(|x| *x *= post);
                    }
                }
                *branch = lin(*proj, &y, params, c);
                Ok(y)
            }
            MixerRef::Mamba {
                in_proj,
                conv_w,
                conv_b,
                x_proj,
                dt_w,
                dt_b,
                a_log,
                d_skip,
                out_proj,
            } => {
                let m = cfg.mamba.ok_or_else(|| err("Mamba sizes missing"))?;
                let (n, d, r, ns, k) = (cfg.n_embd, m.d_inner, m.dt_rank, m.d_state, m.d_conv);
                let w_in = &params[*in_proj];
                let mut xs = vec![0.0f32; c * d];
                let mut z = vec![0.0f32; c * d];
                linear_forward(&mut xs, u, &w_in[..d * n], None, c, n, d);
                linear_forward(&mut z, u, &w_in[d * n..], None, c, n, d);
                let LayerState::Mamba { conv, ssm } = &mut self.state.layers[l] else {
                    return Err(err(format!(
                        "layer {l}: decoder state does not match the model"
                    )));
                };
                // Causal depthwise conv over [state ‖ chunk], then SiLU.
                let (cw, cb) = (&params[*conv_w], &params[*conv_b]);
                let mut window: Vec<f32> = conv.clone();
                window.extend_from_slice(&xs);
                let mut xc = vec![0.0f32; c * d];
                for i in 0..c {
                    for ch in 0..d {
                        let mut acc = cb[ch];
                        for j in 0..k {
                            acc += cw[ch * k + j] * window[(i + j) * d + ch];
                        }
                        xc[i * d + ch] = silu(acc);
                    }
                }
                let keep = (k - 1) * d;
                conv.copy_from_slice(&window[window.len() - keep..]);
                let w_x = &params[*x_proj];
                let mut dtr = vec![0.0f32; c * r];
                let mut bm = vec![0.0f32; c * ns];
                let mut cm = vec![0.0f32; c * ns];
                linear_forward(&mut dtr, &xc, &w_x[..r * d], None, c, d, r);
                linear_forward(&mut bm, &xc, &w_x[r * d..(r + ns) * d], None, c, d, ns);
                linear_forward(&mut cm, &xc, &w_x[(r + ns) * d..], None, c, d, ns);
                let mut delta = vec![0.0f32; c * d];
                linear_forward(&mut delta, &dtr, &params[*dt_w], None, c, r, d);
                let (bias, alog, dsk) = (&params[*dt_b], &params[*a_log], &params[*d_skip]);
                let mut y = vec![0.0f32; c * d];
                // The recurrence runs per channel; channels are independent.
                let mut y_cm = vec![0.0f32; d * c];
                ssm.par_chunks_mut(ns)
                    .zip(y_cm.par_chunks_mut(c))
                    .enumerate()
                    .for_each(|(ch, (hstate, yrow))| {
                        for i in 0..c {
                            let xv = xc[i * d + ch];
                            let dt = softplus(delta[i * d + ch] + bias[ch]);
                            let (bt, ct) = (&bm[i * ns..(i + 1) * ns], &cm[i * ns..(i + 1) * ns]);
                            let mut acc = 0.0f32;
                            for kk in 0..ns {
                                let a = -alog[ch * ns + kk].exp();
                                hstate[kk] = (dt * a).exp() * hstate[kk] + dt * bt[kk] * xv;
                                acc += ct[kk] * hstate[kk];
                            }
                            yrow[i] = acc + dsk[ch] * xv;
                        }
                    });
                for i in 0..c {
                    for ch in 0..d {
                        y[i * d + ch] = y_cm[ch * c + i];
                    }
                }
                let mut gated = vec![0.0f32; c * d];
                silu_gate_forward(&mut gated, &y, &z);
                let mut out = vec![0.0f32; c * n];
                linear_forward(&mut out, &gated, &params[*out_proj], None, c, d, n);
                *branch = out;
                Ok(y)
            }
            MixerRef::Gmu {
                in_proj,
                out_proj,
                memory_from,
            } => {
                let gate = lin(*in_proj, u, params, c);
                let mem = memories[*memory_from].as_ref().ok_or_else(|| {
                    err(format!(
                        "layer {l}: memory of layer {memory_from} is missing"
                    ))
                })?;
                let mut hmid = vec![0.0f32; gate.len()];
                silu_gate_forward(&mut hmid, mem, &gate);
                *branch = lin(*out_proj, &hmid, params, c);
                Ok(Vec::new())
            }
        }
    }
}

fn softplus(u: f32) -> f32 {
    if u > 20.0 {
        u
    } else {
        u.exp().ln_1p()
    }
}

/// GPT-NeoX rotate-half RoPE of one head vector at position `t` (table values are bf16-rounded).
fn rotate(x: &mut [f32], table: &RopeTable, t: usize) {
    let half = table.half;
    let (cos, sin) = (
        &table.cos[t * half..(t + 1) * half],
        &table.sin[t * half..(t + 1) * half],
    );
    for i in 0..half {
        let (a, b) = (x[i], x[i + half]);
        x[i] = a * cos[i] - b * sin[i];
        x[i + half] = b * cos[i] + a * sin[i];
    }
}

fn add_scaled(x: &mut [f32], h: &[f32], scale: f32) {
    for (a, b) in x.iter_mut().zip(h) {
        *a += scale * b;
    }
}

fn lin(l: Lin, x: &[f32], params: &[Vec<f32>], rows: usize) -> Vec<f32> {
    let mut y = vec![0.0f32; rows * l.d_out];
    linear_forward(
        &mut y,
        x,
        &params[l.w],
        l.b.map(|b| params[b].as_slice()),
        rows,
        l.d_in,
        l.d_out,
    );
    y
}

fn norm(kind: Norm, x: &[f32], params: &[Vec<f32>], n: usize, eps: f64) -> Vec<f32> {
    let rows = x.len() / n;
    let mut y = vec![0.0f32; x.len()];
    let mut rstd = vec![0.0f32; rows];
    match kind {
        Norm::Rms { w } => rmsnorm_forward(&mut y, &mut rstd, x, &params[w], n, eps),
        Norm::Layer { w, b } => {
            let mut mean = vec![0.0f32; rows];
            layernorm_forward(
                &mut y, &mut mean, &mut rstd, x, &params[w], &params[b], n, eps,
            )
        }
    }
    y
}
