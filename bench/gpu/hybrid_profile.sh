#!/bin/bash
# SambaY beside Transformer++ at micro MICRO (4), each with one profiled step (ms per op kind), for the
# issue-6 ratio and where SambaY's extra time goes: DEPTHS="8 16" MICRO=4 C=gpu-carry bash bench/gpu/hybrid_profile.sh
set -u
C=${C:-gpu-carry}; OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export ARCHSCALE_KERNEL_CACHE=$PWD/$C/kcache
for d in ${DEPTHS:-8 16}; do
  timeout 200 $C/archscale bench bench/samba_ctx4096.toml --set arch=sambay --set "depth=[$d]" --micro ${MICRO:-4} \
    --steps 6 --warmup 2 --profile > "$OUT/sambay_prof_d$d.txt" 2>&1
  timeout 200 $C/archscale bench bench/transformer_ctx4096.toml --set "depth=[$d]" --micro ${MICRO:-4} \
    --steps 6 --warmup 2 --profile > "$OUT/tf4_prof_d$d.txt" 2>&1
  echo "== d$d"; grep -hE '^scaling|error' "$OUT/sambay_prof_d$d.txt" "$OUT/tf4_prof_d$d.txt"
done
