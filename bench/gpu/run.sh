#!/bin/bash
# Runs on the GPU machine (device tool), from the repository root, with
# gpu-carry/ carried along: archscale (stripped release build), torch_ref.py, kcache/.
#   bash bench/gpu/run.sh [selftest] [bench] [torch]      (default: all three)
# Logs go to $OUT; a short summary is printed last.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export ARCHSCALE_KERNEL_CACHE=$PWD/gpu-carry/kcache
BIN=${BIN:-gpu-carry/archscale}
STEPS=${STEPS:-10}
MICRO=${MICRO:-8,4,4}
what=${*:-selftest bench torch}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv > "$OUT/smi.txt" 2>&1
date -u +%Y-%m-%dT%H:%MZ >> "$OUT/smi.txt"
for w in $what; do
  case $w in
    selftest) timeout ${SELFTEST_T:-300} $BIN selftest > "$OUT/selftest.txt" 2>&1; echo "selftest rc=$?" >> "$OUT/selftest.txt" ;;
    bench) timeout ${BENCH_T:-420} $BIN bench bench/transformer_ctx4096.toml --micro "$MICRO" --steps "$STEPS" --warmup 3 \
             --json "$OUT/bench.json" ${PROFILE:+--profile} > "$OUT/bench.txt" 2>&1; echo "bench rc=$?" >> "$OUT/bench.txt" ;;
    torch) PYTHONUNBUFFERED=1 timeout ${TORCH_T:-540} python3 gpu-carry/torch_ref.py --micro "$MICRO" --steps 20 > "$OUT/torch.txt" 2>&1
           echo "torch rc=$?" >> "$OUT/torch.txt" ;;
  esac
done
cat "$OUT/smi.txt"
for f in selftest bench torch; do
  [ -f "$OUT/$f.txt" ] && { echo "=== $f"; grep -v "^bench " "$OUT/$f.txt" | tail -n 70; }
done
