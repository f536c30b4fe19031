#!/bin/bash
# The residual add in the next RMSNorm for the Mamba and GMU out-projections (hybrids): selftest,
# hybrid model parity (--seed 1), and SambaY d8/d16 next to Transformer++ (micro 4) with
# ARCHSCALE_RESIDUAL_ADD=gemm (A) and the default interleaved. C = carry dir (archscale, kcache/).
# (Measured at commit 04b61a0; reverted by ea6c4da and relanded by 152da2a with the selftest's
# two-draw tolerance: bench/NOTES.md, session 4.)
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
C=${C:-gpu-carry}
export ARCHSCALE_KERNEL_CACHE=$PWD/$C/kcache
B=$C/archscale
date -u +%T > "$OUT/phases.txt"
timeout 120 $B selftest > "$OUT/selftest.txt" 2>&1; echo "selftest rc=$?" >> "$OUT/selftest.txt"
for m in bench/sambay_parity.toml bench/sambayda_parity.toml bench/samba_parity.toml bench/sambayoco_parity.toml; do
  timeout 100 $B selftest --only none --model $m --seed 1 >> "$OUT/models.txt" 2>&1
  echo "$m rc=$?" >> "$OUT/models.txt"
done
date -u +%T >> "$OUT/phases.txt"
for r in 1 2; do
  for v in gemm default; do
    if [ $v = gemm ]; then E=ARCHSCALE_RESIDUAL_ADD=gemm; else E=ARCHSCALE_RESIDUAL_ADD=norm; fi
    for d in 8 16; do
      env $E timeout 100 $B bench bench/samba_ctx4096.toml \
        --set arch=sambay --set "depth=[$d]" --micro 4 --steps 6 --warmup 2 > "$OUT/sambay_${v}_d${d}_r$r.txt" 2>&1
    done
  done
  for d in 8 16; do
    timeout 100 $B bench bench/transformer_ctx4096.toml --set "depth=[$d]" --micro 4 --steps 6 --warmup 2 \
      > "$OUT/tf4_d${d}_r$r.txt" 2>&1
  done
done
date -u +%T >> "$OUT/phases.txt"
cat "$OUT/phases.txt"; grep -E 'passed|rc=' "$OUT/selftest.txt" | tail -2; grep -E 'passed|FAIL|rc=' "$OUT/models.txt"
for f in "$OUT"/sambay_*.txt "$OUT"/tf4_*.txt; do
  printf '%-28s %s\n' "$(basename $f .txt)" "$(grep -E '^scaling' $f | awk '{print $6, $10}')"
done
tar czf /tmp/00_logs.tgz -C "$OUT" . && find "$OUT" -type f -delete && mv /tmp/00_logs.tgz "$OUT/"
