#!/bin/bash
# Data-parallel check on a 2-GPU machine (device tool, kind nvidia-h200-x2), from the
# repository root with gpu-carry/ carried (stripped release binary, kcache/, parity data).
# Trains the same world-2 plan (bench/parity/shakespeare.toml, gpus_per_node=2) twice:
# one process running both ranks on GPU 0 (the exact reference), and `--gpus 2` (two
# processes, NCCL all-reduce). Prints both loss columns side by side.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export ARCHSCALE_KERNEL_CACHE=$PWD/gpu-carry/kcache
export NCCL_NVLS_ENABLE=0
# NCCL from the system, else the one pip installs with PyTorch.
if ! ldconfig -p 2>/dev/null | grep -q libnccl.so; then
  NL=$(python3 -c 'import nvidia.nccl as n, os; print(os.path.join(list(n.__path__)[0], "lib"))' 2>/dev/null)
  [ -n "$NL" ] && export LD_LIBRARY_PATH=$NL:$LD_LIBRARY_PATH && echo "NCCL from $NL"
fi
BIN=${BIN:-gpu-carry/archscale}
STEPS=${STEPS:-30}
SET=(--set cluster.gpus_per_node=2 --set train.micro_batch=2 --set train.log_interval=1
     --set train.save_interval=1000 --set train.eval_interval=1000)
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$OUT/smi.txt" 2>&1
date -u +%Y-%m-%dT%H:%MZ >> "$OUT/smi.txt"
cat "$OUT/smi.txt"
timeout 200 $BIN run bench/parity/shakespeare.toml "${SET[@]}" --set train.out_dir=$OUT/ref \
  --backend cuda --max-steps "$STEPS" > "$OUT/ref.txt" 2>&1; echo "ref rc=$?"
timeout 200 $BIN run bench/parity/shakespeare.toml "${SET[@]}" --set train.out_dir=$OUT/dp \
  --backend cuda --gpus 2 --max-steps "$STEPS" > "$OUT/dp.txt" 2>&1; echo "dp2 rc=$?"
tail -n 3 "$OUT/ref.txt" "$OUT/dp.txt"
python3 - "$OUT" <<'PY'
import json, sys, glob
out = sys.argv[1]
def losses(d):
    f = glob.glob(f"{out}/{d}/*/metrics.jsonl")
    rows = [json.loads(l) for l in open(f[0])] if f else []
    return {r["step"]: (r["loss"], r.get("tokens_per_s")) for r in rows if "loss" in r}
a, b = losses("ref"), losses("dp")
print("step  ref(1 proc, 2 ranks)  dp(2 procs)  |diff|   tok/s ref / dp")
worst = 0.0
for s in sorted(a):
    if s in b:
        d = abs(a[s][0] - b[s][0]); worst = max(worst, d)
        print(f"{s:4d}  {a[s][0]:.5f}  {b[s][0]:.5f}  {d:.2e}  {a[s][1]:.0f} / {b[s][1]:.0f}")
print(f"steps compared {len(set(a) & set(b))}, max |diff| {worst:.3e}")
PY
ls $OUT/dp/*/ 2>/dev/null
