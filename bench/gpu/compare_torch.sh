#!/bin/bash
# Runs on the GPU machine with gpu-carry/ carried. Per-op time of our step (--profile) beside
# PyTorch + torch.compile's per-kernel-class time (bench/gpu/torch_profile.py), same call,
# with SM clock and power sampled every second (nvidia-smi dmon) while both run.
#   DEPTHS="8:8 16:4" bash bench/gpu/compare_torch.sh      (depth:micro pairs)
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export ARCHSCALE_KERNEL_CACHE=$PWD/gpu-carry/kcache
B=gpu-carry/archscale
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv,noheader > "$OUT/card.txt"
nvidia-smi dmon -s pc -d 1 > "$OUT/dmon.txt" 2>&1 &
DMON=$!
for dm in ${DEPTHS:-8:8 16:4}; do
  d=${dm%:*}; m=${dm#*:}
  echo "ours d$d start $(date +%T)" >> "$OUT/phases.txt"
  timeout 240 $B bench bench/transformer_ctx4096.toml --set "depth=[$d]" --micro $m --steps ${STEPS:-8} --warmup 3 --profile \
    > "$OUT/ours_d$d.txt" 2>&1
  echo "torch d$d start $(date +%T)" >> "$OUT/phases.txt"
  PYTHONUNBUFFERED=1 timeout 300 python3 bench/gpu/torch_profile.py gpu-carry/torch_ref.py --depth $d --micro $m \
    > "$OUT/torch_d$d.txt" 2>&1
done
echo "end $(date +%T)" >> "$OUT/phases.txt"
kill $DMON 2>/dev/null
cat "$OUT/card.txt" "$OUT/phases.txt"
for dm in ${DEPTHS:-8:8 16:4}; do
  d=${dm%:*}
  echo "=== ours d$d"; grep -v '^{' "$OUT/ours_d$d.txt" | tail -45
  echo "=== torch d$d"; tail -40 "$OUT/torch_d$d.txt"
done
echo "=== dmon: per phase, SM clock (MHz) and power (W), median / min over busy samples"
python3 - "$OUT" <<'PY'
import sys, statistics as st
out = sys.argv[1]
hdr, rows = None, []
for l in open(f"{out}/dmon.txt"):
    if l.startswith("# gpu"): hdr = l[1:].split(); continue
    if l.startswith("#") or not l.strip() or hdr is None: continue
    v = l.split()
    if len(v) == len(hdr): rows.append(dict(zip(hdr, v)))
def num(r, k):
    try: return float(r[k])
    except (KeyError, ValueError): return None
busy = [r for r in rows if (num(r, "pwr") or 0) > 300]
for k in ("pclk", "pwr"):
    xs = [num(r, k) for r in busy if num(r, k) is not None]
    if xs: print(f"  {k}: median {st.median(xs):.0f}  min {min(xs):.0f}  max {max(xs):.0f}  ({len(xs)} samples > 300 W)")
PY
