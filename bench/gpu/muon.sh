#!/bin/bash
# Issue 6: Muon on the CUDA backend. (1) selftest muon suite: one GPU Muon step against the
# CPU muon_step per shape; (2) a tiny Transformer++ (μP++, AdamW vectors + Muon matrices),
# 30 steps on --backend cpu and --backend cuda from the same init: per-step loss diff;
# (3) Transformer++ d8 at ctx 4096, step time with Muon vs AdamW (per-op profile).
# Usage (repo root, after `strip -o gpu-carry-muon/archscale target/release/archscale`):
#   bash bench/gpu/muon.sh    (SKIP_SELFTEST=1 / SKIP_BENCH=1 leave out parts 1 / 3)
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export ARCHSCALE_KERNEL_CACHE=${ARCHSCALE_KERNEL_CACHE:-$PWD/gpu-carry-muon/kcache}
B=${B:-gpu-carry-muon/archscale}

if [ -z "${SKIP_SELFTEST:-}" ]; then
  timeout 120 $B selftest --only muon --seed 11 > $OUT/selftest-muon.txt 2>&1
  echo "selftest muon rc=$?"; grep -iE "muon|error|passed|failed" $OUT/selftest-muon.txt | tail -40
fi

# tiny-transformer with head size 64 (the CUDA flash kernels take 64 and 128)
sed -e 's/^heads = 4/heads = 2/' -e 's/^kv_groups = 2/kv_groups = 1/' -e 's/^head_dim = 32/head_dim = 64/' \
  -e 's/^name = .*/name = "tiny-transformer-hs64"/' experiments/archs/tiny-transformer.toml > $OUT/tiny-hs64.toml

cat > $OUT/muon_e2e.toml <<TOML
arch = "$OUT/tiny-hs64.toml"
depth = 4
parametrization = "mup++"

[base]
depth = 4
lr = 3e-3
batch_tokens = 512
warmup_tokens = 1536

[train]
tokens = 15360                  # 30 steps of 2 x 256 tokens
seq_len = 256
micro_batch = 2
optimizer = "muon"
eval_interval = 1000
save_interval = 1000
log_interval = 1

[data]
train = [{ synthetic = { corpus = "text", seed = 1234, tokens = 200_000 } }]
val = [{ synthetic = { corpus = "text", seed = 4321, tokens = 20_000 } }]

[cluster]
nodes = 1
gpus_per_node = 1
TOML
for be in cpu cuda; do
  rm -rf $OUT/runs-$be
  sed "s|^log_interval = 1|log_interval = 1\nout_dir = \"$OUT/runs-$be\"|" $OUT/muon_e2e.toml > $OUT/muon_e2e_$be.toml
  timeout 120 $B run $OUT/muon_e2e_$be.toml --backend $be > $OUT/run-$be.txt 2>&1
  echo "run $be rc=$?"; tail -3 $OUT/run-$be.txt
done
python3 - "$OUT" <<'PY'
import json, glob, sys
out = sys.argv[1]
def losses(be):
    f = glob.glob(f"{out}/runs-{be}/*/metrics.jsonl")
    if not f:
        return {}
    d = {}
    for line in open(f[0]):
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if "loss" in r and "step" in r:
            d[r["step"]] = r["loss"]
    return d
c, g = losses("cpu"), losses("cuda")
steps = sorted(set(c) & set(g))
if not steps:
    print("no common logged steps", len(c), len(g)); sys.exit(0)
diffs = [abs(c[s] - g[s]) for s in steps]
for s in steps:
    print(f"step {s:3d}  cpu {c[s]:.5f}  cuda {g[s]:.5f}  diff {abs(c[s]-g[s]):.2e}")
print(f"max |loss diff| over {len(steps)} steps: {max(diffs):.3e} (step {steps[diffs.index(max(diffs))]}); "
      f"first {c[steps[0]]:.4f} -> last cpu {c[steps[-1]]:.4f} cuda {g[steps[-1]]:.4f}")
PY

if [ -z "${SKIP_BENCH:-}" ]; then
  for opt in adamw muon; do
    timeout 150 $B bench bench/transformer_ctx4096.toml --set "depth=[8]" --set train.optimizer=$opt \
      --micro 4 --steps 6 --warmup 2 --profile > $OUT/bench-d8-$opt.txt 2>&1
    echo "bench d8 $opt rc=$?"; grep -v "^bench " $OUT/bench-d8-$opt.txt | grep -iE "tok|error|adamw|muon|mfu" | tail -5
  done
fi
