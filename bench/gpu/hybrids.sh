#!/bin/bash
# Issue 6: every runnable hybrid family on the CUDA backend (one GPU). Whole-model parity
# against the CPU reference (loss and every parameter gradient, same init and batch) of the
# tiny parity models in bench/*_parity.toml (SambaY, SambaYOCO, SambaY-MLP / -Attn memory,
# SambaY-DA, Phi-4-mini-flash's LayerNorm + biases + DA, all biases), then 30 training steps
# of each and of the real SambaY / SambaY-DA / SambaYOCO d8. FULL=1 also runs the kernel
# selftest and the Transformer++ parity.
# Usage (repo root, after `strip -o gpu-carry-hyb/archscale target/release/archscale`):
#   bash bench/gpu/hybrids.sh
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export ARCHSCALE_KERNEL_CACHE=$PWD/gpu-carry-hyb/kcache
B=${B:-gpu-carry-hyb/archscale}
MODELS=${MODELS:-"sambay sambayoco sambaymlp sambayattn lnbias sambayda phi4"}
SEED=${SEED:-1}
if [ "${FULL:-0}" = 1 ]; then
  timeout 300 $B selftest > $OUT/selftest.txt 2>&1; echo "selftest rc=$?"; tail -2 $OUT/selftest.txt
  grep -E "FAIL|ERROR" $OUT/selftest.txt | head -10
  timeout 200 $B selftest --only none --model bench/transformer_ctx4096.toml --set 'depth=[4]' --set train.seq_len=256 \
    --set train.micro_batch=2 --set parametrization=sp --seed $SEED > $OUT/parity-tf.txt 2>&1; echo "transformer parity rc=$?"
  grep -E "model loss|all gradients|passed" $OUT/parity-tf.txt
fi
for m in $MODELS; do
  timeout 200 $B selftest --only none --model bench/${m}_parity.toml --seed $SEED > $OUT/parity-$m.txt 2>&1
  echo "== $m parity rc=$?: $(grep -E "^model loss" $OUT/parity-$m.txt | awk '{print "loss", $(NF-2)}') $(grep -E "^all gradients" $OUT/parity-$m.txt | awk '{print "grads", $(NF-2)}') $(tail -1 $OUT/parity-$m.txt)"
  grep -E "FAIL|ERROR" $OUT/parity-$m.txt | head -8
  # the largest gradient errors
  grep -E "^grad " $OUT/parity-$m.txt | awk '{print "   ", $2, $(NF-2)}' | sort -g -k2 -r | head -3
done
for m in ${VARLEN:-sambay phi4}; do
  # document masking (EOS-separated documents; arch-spec §4.3) in attention, conv and scan
  timeout 200 $B selftest --only none --model bench/${m}_parity.toml --set train.varlen=true --set train.micro_batch=1 --seed $SEED > $OUT/parity-$m-varlen.txt 2>&1
  echo "== $m varlen parity rc=$?: $(grep -E "^model loss" $OUT/parity-$m-varlen.txt | awk '{print "loss", $(NF-2)}') $(grep -E "^all gradients" $OUT/parity-$m-varlen.txt | awk '{print "grads", $(NF-2)}') $(tail -1 $OUT/parity-$m-varlen.txt)"
  grep -E "FAIL|ERROR" $OUT/parity-$m-varlen.txt | head -5
done
for m in ${RUNS:-$MODELS}; do
  timeout 120 $B run bench/${m}_parity.toml --backend cuda --max-steps 30 --set train.log_interval=5 \
    --set train.out_dir=$OUT/run-$m > $OUT/run-$m.txt 2>&1; echo "run $m rc=$?: $(grep -o "step *[0-9]*  loss [0-9.]*" $OUT/run-$m.txt | tr '\n' ' ')"
  grep -iE "error|panic" $OUT/run-$m.txt | head -3
done
for a in ${REAL:-sambay sambayda sambayoco}; do
  timeout 150 $B run bench/samba_parity.toml --backend cuda --max-steps 30 --set train.log_interval=5 \
    --set arch=$a --set base.warmup_tokens=2048 --set base.lr=2e-3 --set 'depth=[8]' --set base.depth=8 --set train.out_dir=$OUT/run-$a-d8 > $OUT/run-$a-d8.txt 2>&1
  echo "run $a d8 rc=$?: $(grep -o "step *[0-9]*  loss [0-9.]*" $OUT/run-$a-d8.txt | tr '\n' ' ')"
  grep -iE "error|panic" $OUT/run-$a-d8.txt | head -3
done
if [ "${BENCH:-0}" = 1 ]; then
  # throughput at ctx 4096 (micro 4), beside Samba d8 (same recipe as bench/gpu/samba.sh)
  for a in samba sambay sambayda; do
    timeout 200 $B bench bench/samba_ctx4096.toml --set arch=$a --micro 4 --steps 6 --warmup 2 > $OUT/bench-$a.txt 2>&1
    echo "bench $a d8 rc=$?"; grep -v "^bench " $OUT/bench-$a.txt | tail -3
  done
fi
