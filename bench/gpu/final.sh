#!/bin/bash
# One call for a session's closing figures (C=gpu-carry by default, carried: archscale, kcache/,
# torch_ref.py, parity/ data):
#   1. archscale selftest (every kernel and family vs the CPU reference);
#   2. Transformer++ d8/d12/d16 at ctx 4096 (micro 8,4,4), then d8 and d16 again (the repeat
#      shows run-to-run noise; cuBLASLt tuning is off in both);
#   3. SambaY d8/d16 beside Transformer++ d8/d16 at micro 4 (issue 6 ratio);
#   4. the CUDA side of the 300-step Shakespeare parity run (PARITY=toml; its CPU side runs
#      elsewhere: the CPU reference is the same binary's CPU backend);
#   MODELS="a.toml b.toml" adds whole-model parity (selftest --only none --model M --seed 1);
#   AB="VAR=value" adds Transformer++ d8/d16 with that environment, interleaved with a repeat
#      of the default (a same-call A/B of an opt-in kernel choice);
#   SAMBAY=0 leaves out step 3; FIT=1 adds Transformer++ at --micro fit; PROFILE=1 a profiled d8/d16 step; TORCH_ROUNDS=2 runs
#   ours and PyTorch a second time in turn; phases.txt has each phase's start time;
#   5. PyTorch + torch.compile, torch_ref.py at the same depths and micro-batches.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
C=${C:-gpu-carry}
export ARCHSCALE_KERNEL_CACHE=$PWD/$C/kcache
B=$C/archscale
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv,noheader > "$OUT/card.txt"
date -u +%Y-%m-%dT%H:%MZ >> "$OUT/card.txt"
stamp() { echo "$1 $(date -u +%T)" >> "$OUT/phases.txt"; }
stamp selftest
timeout 300 $B selftest > "$OUT/selftest.txt" 2>&1; echo "selftest rc=$?" >> "$OUT/selftest.txt"
stamp models
for m in ${MODELS:-}; do
  timeout 100 $B selftest --only none --model $m --seed 1 >> "$OUT/selftest_models.txt" 2>&1
  echo "$m rc=$?" >> "$OUT/selftest_models.txt"
done
stamp tf
timeout 300 $B bench bench/transformer_ctx4096.toml --micro 8,4,4 --steps 10 --warmup 3 > "$OUT/tf.txt" 2>&1
# the A/B rounds below repeat the default; without them, one plain repeat
[ -z "${AB:-}" ] && timeout 200 $B bench bench/transformer_ctx4096.toml --set 'depth=[8,16]' --micro 8,4 \
  --steps 10 --warmup 3 > "$OUT/tf_repeat.txt" 2>&1
stamp ab
if [ -n "${AB:-}" ]; then
  for r in 1 2; do
    env $AB timeout 200 $B bench bench/transformer_ctx4096.toml --set 'depth=[8,16]' --micro 8,4 \
      --steps 10 --warmup 3 > "$OUT/tf_ab_$r.txt" 2>&1
    timeout 200 $B bench bench/transformer_ctx4096.toml --set 'depth=[8,16]' --micro 8,4 \
      --steps 10 --warmup 3 > "$OUT/tf_default_$r.txt" 2>&1
  done
fi
stamp sambay
# SAMBAY=0 leaves out the issue-6 pair
[ "${SAMBAY:-1}" = 0 ] || for d in 8 16; do
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
if [ -n "${FIT:-}" ]; then
  stamp fit
  timeout 200 $B bench bench/transformer_ctx4096.toml --micro fit --steps 6 --warmup 2 > "$OUT/tf_fit.txt" 2>&1
fi
if [ -n "${PROFILE:-}" ]; then
  stamp profile
  timeout 200 $B bench bench/transformer_ctx4096.toml --set 'depth=[8,16]' --micro 8,4 --steps 4 --warmup 2 \
    --profile > "$OUT/tf_profile.txt" 2>&1
fi
stamp torch
PYTHONUNBUFFERED=1 timeout 400 python3 $C/torch_ref.py --micro 8,4,4 --depths 8,12,16 --steps 20 > "$OUT/torch.txt" 2>&1
# TORCH_ROUNDS=2: ours and PyTorch once more, in turn (drift within the call shows)
for r in $(seq 2 ${TORCH_ROUNDS:-1}); do
  stamp "round $r"
  timeout 300 $B bench bench/transformer_ctx4096.toml --micro 8,4,4 --steps 10 --warmup 3 > "$OUT/tf_r$r.txt" 2>&1
  PYTHONUNBUFFERED=1 timeout 400 python3 $C/torch_ref.py --micro 8,4,4 --depths 8,12,16 --steps 20 > "$OUT/torch_r$r.txt" 2>&1
done
stamp end
cat "$OUT/card.txt" "$OUT/phases.txt"
grep -E 'passed|FAIL' "$OUT/selftest.txt" | tail -5; tail -1 "$OUT/selftest.txt"
[ -f "$OUT/selftest_models.txt" ] && { echo "== model parity (seed 1)"; grep -E 'passed|FAIL|rc=' "$OUT/selftest_models.txt"; }
[ -n "${AB:-}" ] && echo "== A/B: $AB (tf_ab_*) against the default (tf_default_*)"
for f in tf tf_r2 tf_r3 tf_fit tf_repeat tf_ab_1 tf_default_1 tf_ab_2 tf_default_2 sambay_d8 tf4_d8 sambay_d16 tf4_d16; do
  [ -f "$OUT/$f.txt" ] && { echo "== $f"; grep -E '^scaling|error' "$OUT/$f.txt"; }
done
[ -f "$OUT/parity_cuda.log" ] && { echo "== parity cuda"; grep -E 'step +300|error' "$OUT/parity_cuda.log" | tail -3; }
for f in torch torch_r2 torch_r3; do
  [ -f "$OUT/$f.txt" ] && { echo "== $f"; grep -E '^\{|error|Error' "$OUT/$f.txt" | tail -4; }
done
# The device tool returns a handful of files: everything goes back as one archive.
tar czf /tmp/00_logs.tgz -C "$OUT" . && find "$OUT" -type f -delete && mv /tmp/00_logs.tgz "$OUT/"
