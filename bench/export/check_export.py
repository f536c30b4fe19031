#!/usr/bin/env python3
"""Load an `archscale export --format hf` directory into a pure-PyTorch model and check it.

    python3 check_export.py EXPORT_DIR [--device cpu|cuda] [--tolerance X]

Needs python3 and torch only. The model is built from `config.json` (dimensions, the
per-layer `blocks`, the forward multipliers; the multipliers are also re-derived from the
lit-gpt overrides as ArchScale does, and must agree) and `model.safetensors` (parsed by hand:
8-byte little-endian header length, JSON header, raw little-endian data), using ArchScale's
parameter names (arch-spec §1.14). It runs the token rows of `verify.json` (written by
`archscale export`) and compares log-probabilities with archscale's CPU decoder.

Covers every family `archscale run` trains: attention (fused grouped QKV, GQA, RoPE with
bf16 tables, sliding window, biases, μP scales), YOCO cross-attention, differential
attention, Mamba-1, GMU (plain gate), RMSNorm/LayerNorm, SwiGLU, tied or untied heads.
Math runs in float64; the RoPE cos/sin tables are computed in float32 and rounded to
bfloat16, as ArchScale (and archscale) do.

Prints one line `PASS ...` (exit 0) or `FAIL ...` (exit 1).
"""

import argparse
import json
import math
import os
import struct
import sys

import torch
import torch.nn.functional as F

DTYPES = {
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "F64": (torch.float64, 8),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
}


def load_safetensors(path):
    """{name: tensor} from a .safetensors file, without the safetensors package."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        raise ValueError(f"{path}: shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", data[:8])
    if 8 + n > len(data):
        raise ValueError(f"{path}: header length {n} exceeds the file")
    header = json.loads(data[8 : 8 + n].decode("utf-8"))
    body = memoryview(data)[8 + n :]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype, size = DTYPES[info["dtype"]]
        start, end = info["data_offsets"]
        shape = info["shape"]
        count = math.prod(shape) if shape else 1
        if end - start != count * size or end > len(body):
            raise ValueError(f"{path}: tensor {name} has bad offsets {start}..{end}")
        if count == 0:
            out[name] = torch.empty(shape, dtype=dtype)
            continue
        if sys.byteorder != "little":
            raise ValueError("this loader reads little-endian data on little-endian hosts only")
        t = torch.frombuffer(bytearray(body[start:end]), dtype=dtype)
        out[name] = t.reshape(shape).clone()
    return out


def rms_norm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdim=True)
    var = (x - mu).pow(2).mean(-1, keepdim=True)
    return (x - mu) * torch.rsqrt(var + eps) * w + b


def rope_tables(seq, hs, base, device):
    """cos/sin [seq, hs/2]: θ_i = base^(-2i/hs) and t·θ in float32, rounded to bf16.

    Computed on the CPU (as archscale's tables are), so a GPU's float32 cos cannot move a
    value across a bf16 rounding boundary; then moved to `device`."""
    half = hs // 2
    i = torch.arange(half, dtype=torch.float32)
    theta = 1.0 / (torch.tensor(base, dtype=torch.float32) ** (2 * i / hs))
    t = torch.arange(seq, dtype=torch.float32)
    angle = t[:, None] * theta[None, :]
    cos = angle.cos().to(torch.bfloat16).to(torch.float64)
    sin = angle.sin().to(torch.bfloat16).to(torch.float64)
    return cos.to(device), sin.to(device)


def rotate(x, cos, sin):
    """GPT-NeoX rotate-half on [..., T, hs] with tables [T, hs/2]."""
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


def attend(q, k, v, scale, window):
    """q [Hq, T, hs], k/v [Hq, T, hs] (already expanded for GQA): causal (sliding) softmax."""
    t = q.shape[1]
    scores = scale * q @ k.transpose(-1, -2)
    pos = torch.arange(t, device=q.device)
    allowed = pos[None, :] <= pos[:, None]
    if window is not None:
        allowed &= pos[None, :] > pos[:, None] - window
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


class Model:
    def __init__(self, cfg, tensors, device):
        self.cfg = cfg
        r = cfg["resolved"]
        self.n = r["n_embd"]
        self.h = r["n_head"]
        self.g = r["n_query_groups"]
        self.hs = r["head_size"]
        self.inter = r["intermediate_size"]
        self.padded_vocab = r["padded_vocab_size"]
        self.eps = r["norm_eps"]
        self.layernorm = r["_norm_class"] == "LayerNorm"
        self.blocks = cfg["blocks"]
        self.mamba = cfg.get("mamba")
        self.rope_base = cfg.get("rope_base")
        mult = cfg["multipliers"]
        self.logit_scale = mult["logit_scale"]
        self.residual_scale = mult["residual_scale"]
        self.attn_scale = mult["attn_scale"]
        self.t = {k: v.to(device=device, dtype=torch.float64) for k, v in tensors.items()}
        self.device = device
        if cfg.get("mlp", "swiglu") != "swiglu":
            raise ValueError(f"MLP kind {cfg['mlp']} is not implemented here")

    def p(self, name):
        if name not in self.t:
            raise KeyError(f"tensor {name} missing from model.safetensors")
        return self.t[name]

    def opt(self, name):
        return self.t.get(name)

    def linear(self, x, prefix):
        y = x @ self.p(prefix + ".weight").T
        b = self.opt(prefix + ".bias")
        return y + b if b is not None else y

    def norm(self, x, prefix):
        if self.layernorm:
            return layer_norm(x, self.p(prefix + ".weight"), self.p(prefix + ".bias"), self.eps)
        return rms_norm(x, self.p(prefix + ".weight"), self.eps)

    def attention(self, i, plan, u, kv_cache, cos, sin):
        """Returns (branch output, own K/V for later cross layers, pre-proj y)."""
        a = f"transformer.h.{i}.attn"
        T = u.shape[0]
        h, g, hs = self.h, self.g, self.hs
        qpk = h // g
        proj_in = self.linear(u, a + ".attn")
        if plan["kv_from"] is None:
            grouped = proj_in.view(T, g, qpk + 2, hs)
            q = grouped[:, :, :qpk, :].reshape(T, h, hs).transpose(0, 1)  # [h, T, hs]
            k = grouped[:, :, qpk, :].transpose(0, 1)  # [g, T, hs]
            v = grouped[:, :, qpk + 1, :].transpose(0, 1)
            if plan["rope"]:
                k = rotate(k, cos[:T], sin[:T])
            own_kv = (k, v)
        else:
            q = proj_in.view(T, h, hs).transpose(0, 1)
            k, v = kv_cache[plan["kv_from"]]
            own_kv = None
        if plan["rope"]:
            q = rotate(q, cos[:T], sin[:T])
        window = plan["window"]
        diff = plan.get("differential")
        if diff is None:
            kx = k.repeat_interleave(qpk, dim=0)
            vx = v.repeat_interleave(qpk, dim=0)
            y = attend(q, kx, vx, self.attn_scale, window)  # [h, T, hs]
            y = y.transpose(0, 1).reshape(T, h * hs)
        else:
            # Pair j: queries 2j (q1), 2j+1 (q2); kv heads 2jj, 2jj+1 with jj = j // qpk.
            lam_init = diff["lambda_init"]
            dot = lambda x, y: (self.p(f"{a}.da.{x}") * self.p(f"{a}.da.{y}")).sum()
            lam = torch.exp(dot("lambda_q1", "lambda_k1")) - torch.exp(dot("lambda_q2", "lambda_k2")) + lam_init
            pairs = []
            for j in range(h // 2):
                jj = j // qpk
                k1, k2, v1, v2 = k[2 * jj], k[2 * jj + 1], v[2 * jj], v[2 * jj + 1]
                a1 = attend(q[2 * j][None], k1[None], torch.cat([v1, v2], -1)[None], self.attn_scale, window)[0]
                a2 = attend(q[2 * j + 1][None], k2[None], torch.cat([v1, v2], -1)[None], self.attn_scale, window)[0]
                pairs.append(a1 - lam * a2)  # [T, 2hs]
            o = torch.stack(pairs, dim=1)  # [T, h/2, 2hs]
            o = rms_norm(o, self.p(f"{a}.da.subln.weight"), 1e-5) * (1.0 - lam_init)
            y = o.reshape(T, h * hs)
        return self.linear(y, a + ".proj"), own_kv, y

    def mamba_mixer(self, i, u):
        a = f"transformer.h.{i}.attn"
        m = self.mamba
        d, r, ns, kc = m["d_inner"], m["dt_rank"], m["d_state"], m["d_conv"]
        T = u.shape[0]
        xz = u @ self.p(a + ".in_proj.weight").T
        x, z = xz[:, :d], xz[:, d:]
        w = self.p(a + ".conv1d.weight").reshape(d, kc)
        xp = torch.cat([torch.zeros(kc - 1, d, dtype=x.dtype, device=x.device), x], 0)
        conv = self.p(a + ".conv1d.bias").clone().expand(T, d).clone()
        for j in range(kc):
            conv = conv + w[:, j] * xp[j : j + T]
        xc = F.silu(conv)
        dbc = xc @ self.p(a + ".x_proj.weight").T
        dtr, B, C = dbc[:, :r], dbc[:, r : r + ns], dbc[:, r + ns :]
        pre = dtr @ self.p(a + ".dt_proj.weight").T + self.p(a + ".dt_proj.bias")
        delta = torch.where(pre > 20, pre, torch.log1p(torch.exp(pre)))
        A = -torch.exp(self.p(a + ".A_log"))  # [d, ns]
        Dskip = self.p(a + ".D")
        state = torch.zeros(d, ns, dtype=x.dtype, device=x.device)
        ys = []
        for t in range(T):
            dt = delta[t][:, None]
            state = torch.exp(dt * A) * state + dt * B[t][None, :] * xc[t][:, None]
            ys.append(state @ C[t] + Dskip * xc[t])
        y = torch.stack(ys, 0)
        out = (y * F.silu(z)) @ self.p(a + ".out_proj.weight").T
        return out, y

    def forward(self, idx):
        """Log-softmax [T, padded_vocab] of one row of token ids."""
        T = idx.shape[0]
        x = self.p("transformer.wte.weight")[idx]
        cos = sin = None
        if self.rope_base is not None:
            cos, sin = rope_tables(T, self.hs, float(self.rope_base), self.device)
        kv_cache, memories = {}, {}
        rs = self.residual_scale
        for plan in self.blocks:
            i = plan["index"]
            p = f"transformer.h.{i}"
            u = self.norm(x, p + ".norm_1")
            mixer = plan["mixer"]
            kind = mixer["kind"]
            if kind == "attention":
                branch, own_kv, y = self.attention(i, mixer, u, kv_cache, cos, sin)
                if own_kv is not None:
                    kv_cache[i] = own_kv
                if mixer.get("exports_memory"):
                    memories[i] = y
            elif kind == "mamba":
                branch, y = self.mamba_mixer(i, u)
                if mixer.get("export_memory"):
                    memories[i] = y
            elif kind == "gmu":
                if mixer.get("gated_norm"):
                    raise ValueError(f"layer {i}: gated-norm GMU is not implemented here")
                gate = self.linear(u, f"{p}.attn.gmu.in_proj")
                mem = memories[mixer["memory_from"]]
                branch = self.linear(mem * F.silu(gate), f"{p}.attn.gmu.out_proj")
            else:
                raise ValueError(f"layer {i}: mixer {kind} is not implemented here")
            x = x + rs * branch
            u2 = self.norm(x, p + ".norm_2")
            h1 = self.linear(u2, p + ".mlp.w1")
            gate, up = h1[:, : self.inter], h1[:, self.inter :]
            if plan.get("mlp_exports_memory"):
                memories[i] = up
            x = x + rs * self.linear(F.silu(gate) * up, p + ".mlp.w3")
        x = self.norm(x, "transformer.ln_f") * self.logit_scale
        head = self.opt("lm_head.weight")
        if head is None:
            head = self.p("transformer.wte.weight")
        logits = x @ head.T
        return torch.log_softmax(logits, dim=-1)


def archscale_multipliers(cfg):
    """The forward multipliers as ArchScale's model.py derives them from the overrides."""
    o, r = cfg["overrides"], cfg["resolved"]
    mup, ori = o["mup"], o["original_mup"]
    n_layer, hs = r["n_layer"], r["head_size"]
    scale = 1.0 / math.sqrt(hs)
    if mup:
        scale *= math.sqrt(o["mup_hd0"]) / math.sqrt(hs)
    return {
        "logit_scale": o["mup_d0"] / n_layer if mup else 1.0,
        "residual_scale": 1.0 / math.sqrt(2 * n_layer) if (mup and not ori) else 1.0,
        "attn_scale": scale,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("export_dir")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tolerance", type=float, default=None, help="max |Δ log p| (default: verify.json's)")
    args = ap.parse_args()
    d = args.export_dir
    try:
        with open(os.path.join(d, "config.json")) as f:
            cfg = json.load(f)
        with open(os.path.join(d, "verify.json")) as f:
            ver = json.load(f)
        tensors = load_safetensors(os.path.join(d, "model.safetensors"))
    except Exception as e:  # noqa: BLE001 - any unreadable input is a FAIL
        print(f"FAIL reading {d}: {e}")
        return 1
    tol = args.tolerance if args.tolerance is not None else ver["tolerance"]
    problems = []

    # 1. Tensors: every ArchScale name present with the resolved shapes.
    r = cfg["resolved"]
    n, v = r["n_embd"], r["padded_vocab_size"]
    for name, shape in [("transformer.wte.weight", [v, n]), ("transformer.ln_f.weight", [n])]:
        if name not in tensors:
            problems.append(f"missing {name}")
        elif list(tensors[name].shape) != shape:
            problems.append(f"{name} has shape {list(tensors[name].shape)}, expected {shape}")
    if len(cfg["blocks"]) != r["n_layer"]:
        problems.append(f"{len(cfg['blocks'])} blocks for n_layer {r['n_layer']}")

    # 2. The lit-gpt overrides imply the multipliers the exporter resolved.
    derived = archscale_multipliers(cfg)
    for key, value in derived.items():
        got = cfg["multipliers"][key]
        if abs(got - value) > 1e-9 * max(1.0, abs(value)):
            problems.append(f"{key}: overrides give {value}, config says {got}")

    # 3. The forward pass agrees with archscale's.
    torch.set_grad_enabled(False)
    try:
        model = Model(cfg, tensors, torch.device(args.device))
        worst_target = worst_full = 0.0
        total, count = 0.0, 0
        for r_i, row in enumerate(ver["rows"]):
            ids = torch.tensor(row, dtype=torch.long, device=model.device)
            logp = model.forward(ids[:-1]).cpu()
            ours = logp[torch.arange(len(row) - 1), ids[1:].cpu()]
            ref = torch.tensor(ver["target_logprobs"][r_i], dtype=torch.float64)
            worst_target = max(worst_target, (ours - ref).abs().max().item())
            total -= ours.sum().item()
            count += len(row) - 1
            vocab_ids = torch.tensor(ver["full_vocab_ids"], dtype=torch.long)
            for k, pos in enumerate(ver["full_positions"]):
                ref_full = torch.tensor(ver["full_logprobs"][r_i][k], dtype=torch.float64)
                worst_full = max(worst_full, (logp[pos, vocab_ids] - ref_full).abs().max().item())
    except Exception as e:  # noqa: BLE001
        print(f"FAIL forward pass: {type(e).__name__}: {e}")
        return 1
    loss = total / count
    loss_diff = abs(loss - ver["mean_loss"])
    summary = (
        f"{cfg['name']} ({cfg.get('family')}, {r['n_layer']} layers, {len(tensors)} tensors, {cfg.get('dtype')}): "
        f"max |Δ log p| targets {worst_target:.3e}, full rows {worst_full:.3e}; "
        f"mean loss torch {loss:.6f} vs archscale {ver['mean_loss']:.6f} (Δ {loss_diff:.2e}); tolerance {tol:g}"
    )
    if not math.isfinite(worst_target) or worst_target > tol:
        problems.append(f"target log-probs differ by {worst_target:.3e}")
    if not math.isfinite(worst_full) or worst_full > tol:
        problems.append(f"full log-prob rows differ by {worst_full:.3e}")
    if not math.isfinite(loss_diff) or loss_diff > tol:
        problems.append(f"mean loss differs by {loss_diff:.3e}")
    if problems:
        print("FAIL " + summary + " | " + "; ".join(problems))
        return 1
    print("PASS " + summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
