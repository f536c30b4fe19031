#!/bin/bash
# Samba CUDA-vs-CPU gradient diagnostics (one GPU): model parity at several shapes, with
# ARCHSCALE_POISON=1 (every new device buffer NaN-filled) so reads of unwritten memory show.
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export ARCHSCALE_KERNEL_CACHE=$PWD/gpu-carry/kcache
B=gpu-carry/archscale
for poison in "" 1; do
for cfg in "--set train.seq_len=32 --set train.swa_len=16 --set train.micro_batch=1" "--set train.micro_batch=2"; do
  for rep in 1 2; do
    echo "== poison=$poison $cfg rep $rep"
    env ${poison:+ARCHSCALE_POISON=1} timeout 100 $B selftest --only none --model bench/samba_parity.toml $cfg 2>&1 | grep -E "x_proj|all grad|NaN|nan" | grep -v "h.2"
  done
done
done
