#!/bin/bash
# Samba on the CUDA backend (one GPU): whole-model parity against the CPU reference (Samba
# d4 and Transformer++ d4), 30 training steps of bench/samba_parity.toml, and throughput of
# Samba d8 beside Transformer++ d8 at ctx 4096 (micro 4).
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export ARCHSCALE_KERNEL_CACHE=$PWD/gpu-carry/kcache
B=gpu-carry/archscale
timeout 200 $B selftest --only mamba --model bench/samba_parity.toml > $OUT/parity-samba.txt 2>&1; echo "samba parity rc=$?"
grep -i "model\|fail\|error" $OUT/parity-samba.txt | tail -12
timeout 200 $B selftest --only none --model bench/transformer_ctx4096.toml --set 'depth=[4]' --set train.seq_len=256 \
  --set train.micro_batch=2 --set parametrization=sp > $OUT/parity-tf.txt 2>&1; echo "transformer parity rc=$?"
tail -4 $OUT/parity-tf.txt
timeout 120 $B run bench/samba_parity.toml --backend cuda --max-steps 30 --set train.log_interval=5 \
  --set train.out_dir=$OUT/samba-run > $OUT/samba-run.txt 2>&1; echo "samba run rc=$?"
grep -o "step *[0-9]*  loss [0-9.]*" $OUT/samba-run.txt | tr '\n' ' '; echo
timeout 200 $B bench bench/samba_ctx4096.toml --micro 4 --steps 8 --warmup 2 > $OUT/bench-samba.txt 2>&1; echo "bench samba rc=$?"
timeout 200 $B bench bench/transformer_ctx4096.toml --set 'depth=[8]' --micro 4 --steps 8 --warmup 2 > $OUT/bench-tf.txt 2>&1; echo "bench tf rc=$?"
grep -v "^bench " $OUT/bench-samba.txt | tail -5; grep -v "^bench " $OUT/bench-tf.txt | tail -5
