#!/bin/bash
# One call for a session's closing figures (gpu-carry/ carried: archscale, kcache/,
# torch_ref.py, parity/ data):
#   1. archscale selftest (every kernel and family vs the CPU reference);
#   2. Transformer++ d8/d12/d16 at ctx 4096 (micro 8,4,4), then d8 and d16 again (the repeat
#      shows run-to-run noise; cuBLASLt tuning is off in both);
#   3. SambaY d8/d16 beside Transformer++ d8/d16 at micro 4 (issue 6 ratio);
#   4. the CUDA side of the 300-step Shakespeare parity run (PARITY=toml; its CPU side runs
#      elsewhere: the CPU reference is the same binary's CPU backend);
#   DQ=frag|smem adds the flash backward with that dQ conversion (ARCHSCALE_FLASH_DQ; smem
#      is the default since 2026-11-29 03:52): selftest --only flash and the d8/d16 steps;
#   5. PyTorch + torch.compile, torch_ref.py at the same depths and micro-batches.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export ARCHSCALE_KERNEL_CACHE=$PWD/gpu-carry/kcache
B=gpu-carry/archscale
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv,noheader > "$OUT/card.txt"
date -u +%Y-%m-%dT%H:%MZ >> "$OUT/card.txt"
timeout 300 $B selftest > "$OUT/selftest.txt" 2>&1; echo "selftest rc=$?" >> "$OUT/selftest.txt"
timeout 300 $B bench bench/transformer_ctx4096.toml --micro 8,4,4 --steps 10 --warmup 3 > "$OUT/tf.txt" 2>&1
timeout 200 $B bench bench/transformer_ctx4096.toml --set 'depth=[8,16]' --micro 8,4 \
  --steps 10 --warmup 3 > "$OUT/tf_repeat.txt" 2>&1
if [ -n "${DQ:-}" ]; then  # the other dQ conversion of the flash backward
  ARCHSCALE_FLASH_DQ=$DQ timeout 200 $B selftest --only flash > "$OUT/selftest_dq2.txt" 2>&1
  echo "selftest rc=$?" >> "$OUT/selftest_dq2.txt"
  ARCHSCALE_FLASH_DQ=$DQ timeout 200 $B bench bench/transformer_ctx4096.toml --set 'depth=[8,16]' --micro 8,4 \
    --steps 10 --warmup 3 > "$OUT/tf_dq2.txt" 2>&1
fi
for d in 8 16; do
  timeout 200 $B bench bench/samba_ctx4096.toml --set arch=sambay --set "depth=[$d]" --micro 4 --steps 6 --warmup 2 \
    > "$OUT/sambay_d$d.txt" 2>&1
  timeout 200 $B bench bench/transformer_ctx4096.toml --set "depth=[$d]" --micro 4 --steps 6 --warmup 2 \
    > "$OUT/tf4_d$d.txt" 2>&1
done
if [ -n "${PARITY:-}" ]; then
  timeout 200 $B run "$PARITY" --backend cuda --set train.out_dir=$OUT/parity > "$OUT/parity_cuda.log" 2>&1
  cp $OUT/parity/*/metrics.jsonl "$OUT/parity_cuda_metrics.jsonl" 2>/dev/null
  rm -rf $OUT/parity
fi
PYTHONUNBUFFERED=1 timeout 400 python3 gpu-carry/torch_ref.py --micro 8,4,4 --depths 8,12,16 --steps 20 > "$OUT/torch.txt" 2>&1
cat "$OUT/card.txt"
grep -E 'passed|FAIL' "$OUT/selftest.txt" | tail -5; tail -1 "$OUT/selftest.txt"
[ -f "$OUT/selftest_dq2.txt" ] && { echo "== selftest flash, ARCHSCALE_FLASH_DQ=$DQ"; grep -E 'passed|FAIL|rc=' "$OUT/selftest_dq2.txt" | tail -4; }
for f in tf tf_repeat tf_dq2 sambay_d8 tf4_d8 sambay_d16 tf4_d16; do
  [ -f "$OUT/$f.txt" ] && { echo "== $f"; grep -E '^scaling|error' "$OUT/$f.txt"; }
done
[ -f "$OUT/parity_cuda.log" ] && { echo "== parity cuda"; grep -E 'step +300|error' "$OUT/parity_cuda.log" | tail -3; }
echo "== torch"; grep -E '^\{|error|Error' "$OUT/torch.txt" | tail -4
