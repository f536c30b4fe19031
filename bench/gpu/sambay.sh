#!/bin/bash
# Issue 6 throughput target: SambaY d8 and d16 at ctx 4096 (micro 4) beside Transformer++ of
# the same depth, one GPU, one call; PROFILE=1 adds the per-op breakdown of SambaY d16.
# Usage (repo root, after `strip -o gpu-carry/archscale target/release/archscale`):
#   bash bench/gpu/sambay.sh
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export ARCHSCALE_KERNEL_CACHE=$PWD/gpu-carry/kcache
B=${B:-gpu-carry/archscale}
for d in 8 16; do
  timeout 200 $B bench bench/samba_ctx4096.toml --set arch=sambay --set "depth=[$d]" --micro 4 --steps 6 --warmup 2 \
    ${PROFILE:+--profile} > $OUT/bench-sambay-d$d.txt 2>&1; echo "sambay d$d rc=$?"
  timeout 200 $B bench bench/transformer_ctx4096.toml --set "depth=[$d]" --micro 4 --steps 6 --warmup 2 \
    > $OUT/bench-tf-d$d.txt 2>&1; echo "transformer d$d rc=$?"
done
for f in $OUT/bench-sambay-d8.txt $OUT/bench-tf-d8.txt $OUT/bench-sambay-d16.txt $OUT/bench-tf-d16.txt; do
  grep -v "^bench " $f | grep -iE "tok|error|mfu" | tail -2
done
