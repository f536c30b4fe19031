#!/bin/bash
# Runs on the GPU machine with gpu-carry/ carried (archscale, gemm_tune, kcache/).
# cuBLASLt tuning: the candidates per product shape (gemm_tune), then Transformer++ d8 and
# d16 steps with the heuristic's first choice (ARCHSCALE_GEMM_TUNE=off, the default) and tuned (=10).
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export ARCHSCALE_KERNEL_CACHE=$PWD/gpu-carry/kcache
B=gpu-carry/archscale
[ "${SKIP_SHAPES:-0}" = 1 ] || ./gpu-carry/gemm_tune 10 > "$OUT/shapes.txt" 2>&1
for dm in ${DEPTHS:-8:8 16:4}; do
  d=${dm%:*}; m=${dm#*:}
  for t in off 10; do
    ARCHSCALE_GEMM_TUNE=$t timeout 200 $B bench bench/transformer_ctx4096.toml --set "depth=[$d]" --micro $m \
      --steps ${STEPS:-10} --warmup 3 ${PROFILE:+--profile} > "$OUT/bench_d${d}_$t.txt" 2>&1
  done
done
[ "${SELFTEST:-0}" = 1 ] && { timeout 300 $B selftest > "$OUT/selftest.txt" 2>&1; echo "selftest rc=$?" >> "$OUT/selftest.txt"; }
cat "$OUT/shapes.txt" 2>/dev/null
for f in "$OUT"/bench_*.txt; do echo "== $(basename $f)"; grep -E '^scaling|gemm' "$f"; done
[ -f "$OUT/selftest.txt" ] && { grep -E 'FAIL|passed|rc=' "$OUT/selftest.txt" | tail -8; }
