#!/bin/bash
# Whole-model parity (CUDA loss and every gradient vs the CPU reference) of several families
# at several seeds: SEEDS="1 2" MODELS="a.toml b.toml" bash bench/gpu/model_parity.sh
set -u
C=${C:-gpu-carry}; OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export ARCHSCALE_KERNEL_CACHE=$PWD/$C/kcache
for s in ${SEEDS:-1}; do
  for m in $MODELS; do
    timeout 100 $C/archscale selftest --only none --model $m --seed $s > "$OUT/log" 2>&1
    echo "seed $s $m rc=$? $(grep -E 'passed' "$OUT/log" | tail -1)"
    grep FAIL "$OUT/log" | cut -c1-150
  done
done
rm -f "$OUT/log"
