"""ArchScale's Transformer++ in PyTorch, trained from archscale's own initial checkpoint on
archscale's batches, in fp32 and under bf16 autocast: how far does the reference's own bf16
run sit from its fp32 run, and which of our runs does each follow?

The model is the parity plan of bench/parity/shakespeare_b4096.toml (Transformer++ d4,
n_embd 128, 2 heads of 64, 1 KV group, SwiGLU I = 4n, tied GPT-2 vocabulary padded to 50304,
RMSNorm, NeoX RoPE with bf16 tables, SP init, one AdamW over everything), written from
../shared/reference/archscale-arch-spec.md §1.3–1.7, §1.13, §3, §4.2, §6.2–6.5. The data
order is ArchScale's (§4.2: sorted shards, random.seed(3407) shuffle, 8 files per group, a
numpy default_rng(3407) permutation of their 257-token blocks).

    python3 bench/parity/torch_parity.py --init INIT/model.safetensors --data DIR --out OUT

writes OUT/torch_{fp32,bf16,fp32_perturbed,bf16_again}TAG.jsonl in archscale's metrics format (compare them
with bench/parity/compare.py) and prints the fp32-vs-bf16 table."""
import argparse, glob, json, math, os, random, struct
import numpy as np
import torch, torch.nn.functional as F

p = argparse.ArgumentParser()
p.add_argument("--init", required=True, help="model.safetensors of archscale's step-1 checkpoint (lr 0 at step 1, so the init)")
p.add_argument("--data", required=True, help="directory of train_*.bin LITPKDS shards")
p.add_argument("--out", required=True)
p.add_argument("--steps", type=int, default=300)
p.add_argument("--runs", default="fp32,bf16,fp32_perturbed,bf16_again")
p.add_argument("--seed", type=int, default=3407, help="the plan's train.seed (ArchScale's data seed)")
p.add_argument("--tag", default="", help="suffix of the output file names")
p.add_argument("--lr", type=float, default=2e-3, help="the plan's base.lr (SP: used as is)")
p.add_argument("--min-lr", type=float, default=None, help="the plan's base.min_lr (default lr / 10)")
a = p.parse_args()
os.makedirs(a.out, exist_ok=True)
dev = "cuda"

N, H, G, HS, I, L, V = 128, 2, 1, 64, 512, 4, 50304
T, MICRO, SEED, N_CHUNKS = 256, 16, a.seed, 8
LR, WARMUP, WD, BETAS, EPS, CLIP = a.lr, 15, 0.1, (0.9, 0.95), 1e-8, 1.0
MIN_LR = a.min_lr if a.min_lr is not None else a.lr / 10


def read_safetensors(path):
    b = open(path, "rb").read()
    n = struct.unpack("<Q", b[:8])[0]
    head = json.loads(b[8:8 + n])
    out = {}
    for k, v in head.items():
        if k == "__metadata__":
            continue
        assert v["dtype"] == "F32", (k, v["dtype"])
        s, e = v["data_offsets"]
        out[k] = torch.from_numpy(np.frombuffer(b[8 + n + s:8 + n + e], dtype="<f4").copy()).view(v["shape"])
    return out


def batches(data_dir, steps):
    """ArchScale's PackedDataset order for rank 0 of world 1, drop_last wrap (§4.2)."""
    files = sorted(glob.glob(os.path.join(data_dir, "train*.bin")))
    random.seed(SEED)
    random.shuffle(files)
    rng = np.random.default_rng(SEED)
    block = T + 1

    def load(f):
        b = open(f, "rb").read()
        assert b[:7] == b"LITPKDS" and b[15] == 8, f  # u16 tokens
        chunk = struct.unpack("<Q", b[16:24])[0]
        return np.frombuffer(b[24:24 + 2 * chunk], dtype="<u2")

    fi, order, blocks, cursor = 0, [], [], 0
    rows = []
    while len(rows) < steps * MICRO:
        if cursor >= len(order):
            if N_CHUNKS > len(files) - fi:
                fi = 0
            group = [load(f) for f in files[fi:fi + N_CHUNKS]]
            fi += N_CHUNKS
            blocks = [g[i * block:(i + 1) * block] for g in group for i in range(len(g) // block)]
            order = rng.permutation(len(blocks))
            cursor = 0
        rows.append(blocks[order[cursor]].astype(np.int64))
        cursor += 1
    x = torch.from_numpy(np.stack(rows)).view(steps, MICRO, block)
    return x


def lr_at(it, max_iters):
    if it < WARMUP:
        return LR * it / WARMUP
    if it > max_iters:
        return MIN_LR
    r = (it - WARMUP) / (max_iters - WARMUP)
    return MIN_LR + 0.5 * (1 + math.cos(math.pi * r)) * (LR - MIN_LR)


def rope_tables():
    theta = 10000.0 ** (-torch.arange(0, HS, 2, dtype=torch.float32) / HS)
    ang = torch.arange(T, dtype=torch.float32)[:, None] * theta[None]
    return ang.cos().to(torch.bfloat16).to(dev), ang.sin().to(torch.bfloat16).to(dev)


COS, SIN = None, None


def rope(x):  # x: [B, T, heads, HS]; NeoX rotate-half, fp32 math, tables bf16
    c, s = COS.float()[None, :, None], SIN.float()[None, :, None]
    xf = x.float()
    x1, x2 = xf[..., :HS // 2], xf[..., HS // 2:]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), -1).to(x.dtype)


def rms(x, w):  # fp32 math, output in the input's dtype (fp32 residual)
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5) * w).to(x.dtype)


def forward(P, idx, tgt, bf16):
    x = F.embedding(idx, P["lm_head.weight"])  # tied: wte is lm_head, fp32 lookup
    B = idx.shape[0]
    for l in range(L):
        pre = f"transformer.h.{l}."
        h = rms(x, P[pre + "norm_1.weight"])
        qkv = F.linear(h, P[pre + "attn.attn.weight"]).view(B, T, G, H // G + 2, HS)
        q = qkv[:, :, :, :H // G].reshape(B, T, H, HS)
        k, v = qkv[:, :, :, H // G], qkv[:, :, :, H // G + 1]
        q, k = rope(q), rope(k)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True, enable_gqa=True, scale=1.0 / math.sqrt(HS))
        x = x + F.linear(y.transpose(1, 2).reshape(B, T, H * HS), P[pre + "attn.proj.weight"]).float()
        gu = F.linear(rms(x, P[pre + "norm_2.weight"]), P[pre + "mlp.w1.weight"])
        g, u = gu[..., :I], gu[..., I:]
        act = (F.silu(g.float()) * u.float()).to(gu.dtype)  # one rounding, as ArchScale's jiterator
        x = x + F.linear(act, P[pre + "mlp.w3.weight"]).float()
    logits = F.linear(rms(x, P["transformer.ln_f.weight"]), P["lm_head.weight"])
    return F.cross_entropy(logits.float().view(-1, V), tgt.reshape(-1))


def train(name, init, data):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    bf16 = name.startswith("bf16")  # bf16_again: the same bf16 run, for run-to-run spread
    P = {k: v.clone().to(dev).requires_grad_(True) for k, v in init.items()}
    if name == "fp32_perturbed":  # one relative 2^-20 nudge per weight: the fp32 run's own chaos
        g = torch.Generator(device="cpu").manual_seed(1)
        with torch.no_grad():
            for v in P.values():
                v.mul_(1 + 2.0 ** -20 * torch.randn(v.shape, generator=g).to(dev))
    opt = torch.optim.AdamW(list(P.values()), lr=0.0, betas=BETAS, eps=EPS, weight_decay=WD, fused=True)
    recs = []
    for step in range(a.steps):
        rows = data[step].to(dev)
        with torch.autocast("cuda", torch.bfloat16, enabled=bf16):
            loss = forward(P, rows[:, :T], rows[:, 1:], bf16)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(list(P.values()), CLIP).item()
        lr = lr_at(step, a.steps)
        for grp in opt.param_groups:
            grp["lr"] = lr
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % 10 == 0 or step == 0:
            recs.append(dict(step=step + 1, loss=loss.item(), grad_norm=gn, lr=lr))
    with open(os.path.join(a.out, f"torch_{name}{a.tag}.jsonl"), "w") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")
    return {r["step"]: r["loss"] for r in recs}


COS, SIN = rope_tables()
init = read_safetensors(a.init)
data = batches(a.data, a.steps)
curves = {}
for name in a.runs.split(","):
    curves[name] = train(name, init, data)
names = list(curves)
print("step  " + "  ".join(f"{n:>14}" for n in names) + "   |fp32-bf16|")
worst = 0.0
for s in sorted(curves[names[0]]):
    d = abs(curves["fp32"][s] - curves["bf16"][s]) if "fp32" in curves and "bf16" in curves else float("nan")
    worst = max(worst, d) if s > 1 else worst
    print(f"{s:4d}  " + "  ".join(f"{curves[n][s]:14.4f}" for n in names) + f"   {d:.4f}")
print(f"torch fp32 vs bf16 autocast: max |diff| over logged steps {worst:.4f}")
