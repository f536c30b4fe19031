#!/bin/bash
# RoPE backward fused into the flash backward (dQ conversion, dK store) against the separate
# rope_qkv pass (ARCHSCALE_ROPE_BWD=separate), one call. C names the carried folder
# (archscale, kcache/, tpp_parity.toml):
#   1. archscale selftest (every check, the new `flash bwd+rope` lines included);
#   2. Transformer++ model parity (seed 1), fused and separate;
#   3. a refused ARCHSCALE_ROPE_BWD value (the error must name the choices);
#   4. Transformer++ d8 (micro 8) and d16 (micro 4) steps, separate/default/separate/default;
#   5. one profiled d16 step of each (the `rope` and `attn bwd` segments).
set -u
C=${C:-gpu-carry-rope}; OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export ARCHSCALE_KERNEL_CACHE=$PWD/$C/kcache
B=$C/archscale
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv,noheader > "$OUT/card.txt"
date -u +%Y-%m-%dT%H:%MZ >> "$OUT/card.txt"
timeout 120 $B selftest > "$OUT/selftest.txt" 2>&1; echo "selftest rc=$?" >> "$OUT/selftest.txt"
timeout 60 $B selftest --only none --model $C/tpp_parity.toml --seed 1 > "$OUT/parity_fused.txt" 2>&1
echo "rc=$?" >> "$OUT/parity_fused.txt"
ARCHSCALE_ROPE_BWD=separate timeout 60 $B selftest --only none --model $C/tpp_parity.toml --seed 1 \
  > "$OUT/parity_separate.txt" 2>&1; echo "rc=$?" >> "$OUT/parity_separate.txt"
ARCHSCALE_ROPE_BWD=inline timeout 30 $B selftest --only rope > "$OUT/refused.txt" 2>&1; echo "rc=$?" >> "$OUT/refused.txt"
for round in 1 2; do
  for k in separate fused; do
    ARCHSCALE_ROPE_BWD=$k timeout 45 $B bench bench/transformer_ctx4096.toml --set 'depth=[8,16]' --micro 8,4 \
      --steps 10 --warmup 3 > "$OUT/tf_${k}_$round.txt" 2>&1
  done
done
for k in separate fused; do
  ARCHSCALE_ROPE_BWD=$k timeout 30 $B bench bench/transformer_ctx4096.toml --set 'depth=[16]' --micro 4 \
    --steps 4 --warmup 2 --profile > "$OUT/prof_$k.txt" 2>&1
done
tar czf /tmp/00_logs.tgz -C "$OUT" . && find "$OUT" -type f -delete && mv /tmp/00_logs.tgz "$OUT/"
cd /tmp && mkdir -p l && tar xzf "$OUT/00_logs.tgz" -C l && cd l
cat card.txt
echo "== selftest"; grep -E 'bwd\+rope' selftest.txt | head -60; grep -E 'passed|FAIL' selftest.txt | tail -3; tail -1 selftest.txt
for f in parity_fused parity_separate refused; do echo "== $f"; grep -E 'passed|FAIL|ROPE|rc=' $f.txt | tail -4; done
for k in separate fused; do echo "== profile $k"; grep -iE 'rope|attn bwd|step|total' prof_$k.txt | head -8; done
echo "== A/B (tok/s lines; separate = A)"
for round in 1 2; do for k in separate fused; do echo "-- $k $round"; grep -E '^scaling|error|Error' tf_${k}_$round.txt; done; done
