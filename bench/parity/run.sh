#!/bin/bash
# CUDA vs CPU: 300 steps of the same plan, same init, same data; compare logged losses.
set -u
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export ARCHSCALE_KERNEL_CACHE=$PWD/gpu-carry/kcache
B=gpu-carry/archscale; E=bench/parity/shakespeare.toml
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/card.txt
( time $B run $E --backend cpu --set train.out_dir=$OUT/cpu ) > $OUT/cpu.log 2>&1 &
CPU=$!
( time $B run $E --backend cuda --set train.out_dir=$OUT/cuda ) > $OUT/cuda.log 2>&1
wait $CPU
python3 - <<'PY'
import json, glob, os
out = os.environ["OUT"]
def load(kind):
    f = glob.glob(f"{out}/{kind}/*/metrics.jsonl")[0]
    tr, va = {}, {}
    for l in open(f):
        r = json.loads(l)
        if "loss" in r: tr[r["step"]] = r["loss"]
        if "val_loss@1x" in r: va[r["step"]] = r["val_loss@1x"]
    return tr, va
(ct, cv), (gt, gv) = load("cpu"), load("cuda")
rows = [(s, ct[s], gt[s], abs(ct[s]-gt[s])) for s in sorted(ct) if s in gt]
for s, a, b, d in rows: print(f"step {s:4d}  cpu {a:.4f}  cuda {b:.4f}  |diff| {d:.4f}")
for s in sorted(cv):
    if s in gv: print(f"val step {s:4d}  cpu {cv[s]:.4f}  cuda {gv[s]:.4f}  |diff| {abs(cv[s]-gv[s]):.4f}")
print(f"logged steps {len(rows)}  max |diff| {max(r[3] for r in rows):.4f}  (target < 0.03)")
PY
cat $OUT/card.txt; grep -E "real|tokens/s" $OUT/cpu.log $OUT/cuda.log | tail -6
