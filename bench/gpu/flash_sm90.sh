#!/bin/bash
# Runs on the GPU machine (device tool) from the repository root with gpu-carry-flash/
# carried: archscale (stripped release build), kcache/, and torch_ref.py for `torch`.
#   bash bench/gpu/flash_sm90.sh [selftest] [bench] [nodq] [torch]    (default: selftest bench)
# nodq: the sm90 step again with the backward's dQ atomics compiled out (wrong dQ, timing only).
# Flash attention on sm_90: selftest of both variants (sm90 = wgmma, sm80 = mma.sync), then
# the d16 ctx-4096 step profiled with each (ARCHSCALE_FLASH), then optionally PyTorch.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
C=gpu-carry-flash
export ARCHSCALE_KERNEL_CACHE=$PWD/$C/kcache
BIN=$C/archscale
what=${*:-selftest bench}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv > "$OUT/smi.txt" 2>&1
date -u +%Y-%m-%dT%H:%MZ >> "$OUT/smi.txt"
for w in $what; do
  case $w in
    selftest) ARCHSCALE_NVRTC_LOG=1 timeout 240 $BIN selftest --only flash > "$OUT/selftest.txt" 2>&1
              echo "selftest rc=$?" >> "$OUT/selftest.txt" ;;
    bench) for v in sm90 sm80; do
             ARCHSCALE_FLASH=$v timeout 200 $BIN bench bench/transformer_ctx4096.toml --set 'depth=[16]' \
               --micro 4 --steps ${STEPS:-6} --warmup 2 --profile > "$OUT/bench_$v.txt" 2>&1
             echo "bench rc=$?" >> "$OUT/bench_$v.txt"
           done ;;
    nodq) ARCHSCALE_KERNEL_DEFINES=F9_NO_DQ_ATOMICS ARCHSCALE_FLASH=sm90 timeout 200 $BIN bench bench/transformer_ctx4096.toml \
            --set 'depth=[16]' --micro 4 --steps ${STEPS:-6} --warmup 2 --profile > "$OUT/bench_nodq.txt" 2>&1 ;;
    torch) PYTHONUNBUFFERED=1 timeout ${TORCH_T:-300} python3 $C/torch_ref.py --micro 4 --depths 16 --steps 10 > "$OUT/torch.txt" 2>&1
           echo "torch rc=$?" >> "$OUT/torch.txt" ;;
  esac
done
cat "$OUT/smi.txt"
[ -f "$OUT/selftest.txt" ] && { echo "=== selftest"; grep -v "^ptxas\|Compile time\|^\[nvrtc\|^$" "$OUT/selftest.txt" | tail -n 50; grep -A3 "flash_fwd_sm90\|flash_bwd_d" "$OUT/selftest.txt" | grep "registers\|spill" | head -8; }
for v in sm90 sm80 nodq; do
  [ -f "$OUT/bench_$v.txt" ] && { echo "=== bench $v"; grep -v "^{" "$OUT/bench_$v.txt" | head -45; }
done
[ -f "$OUT/torch.txt" ] && { echo "=== torch"; tail -n 8 "$OUT/torch.txt"; }
true
