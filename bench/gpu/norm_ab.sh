#!/bin/bash
# RMSNorm kernels A/B (ARCHSCALE_RMSNORM=block: one block per row, smem dgamma; regs: the
# register-resident default): selftest of the norms and the model parity of Transformer++, SambaY and Phi-4 (LayerNorm), then
# Transformer++ d8 (micro 8) and d16 (micro 4) steps interleaved block/regs/block/regs, and
# one profiled step of each. C names the carried folder (archscale, kcache/).
set -u
C=${C:-gpu-carry-lead}; OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export ARCHSCALE_KERNEL_CACHE=$PWD/$C/kcache
B=$C/archscale
nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv,noheader > "$OUT/card.txt"
timeout 120 $B selftest --only rmsnorm > "$OUT/selftest_norm.txt" 2>&1; echo "rc=$?" >> "$OUT/selftest_norm.txt"
ARCHSCALE_RMSNORM=block timeout 120 $B selftest --only rmsnorm > "$OUT/selftest_norm_block.txt" 2>&1; echo "rc=$?" >> "$OUT/selftest_norm_block.txt"
for m in $C/tpp_parity.toml bench/sambay_parity.toml bench/phi4_parity.toml; do
  timeout 100 $B selftest --only none --model $m >> "$OUT/selftest_models.txt" 2>&1; echo "$m rc=$?" >> "$OUT/selftest_models.txt"
done
for round in 1 2; do
  for k in block regs; do
    ARCHSCALE_RMSNORM=$k timeout 120 $B bench bench/transformer_ctx4096.toml --set 'depth=[8,16]' --micro 8,4 \
      --steps 10 --warmup 3 > "$OUT/tf_${k}_$round.txt" 2>&1
  done
done
for k in block regs; do
  ARCHSCALE_RMSNORM=$k timeout 120 $B bench bench/transformer_ctx4096.toml --set 'depth=[16]' --micro 4 \
    --steps 4 --warmup 2 --profile > "$OUT/prof_$k.txt" 2>&1
done
cat "$OUT/card.txt"
for f in selftest_norm selftest_norm_block selftest_models; do echo "== $f"; grep -E 'passed|FAIL|rc=' "$OUT/$f.txt" | tail -4; done
for round in 1 2; do for k in block regs; do echo "== $k $round"; grep -E '^scaling|error' "$OUT/tf_${k}_$round.txt"; done; done
for k in block regs; do echo "== profile $k"; grep -iE 'norm|step' "$OUT/prof_$k.txt" | head -12; done
