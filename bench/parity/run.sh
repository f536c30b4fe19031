#!/bin/bash
# CUDA vs CPU: 300 steps of the same plan, same init, same data; compare logged losses.
set -u
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export ARCHSCALE_KERNEL_CACHE=$PWD/gpu-carry/kcache
B=gpu-carry/archscale; E=${E:-bench/parity/shakespeare.toml}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $OUT/card.txt
( time $B run $E --backend cpu --set train.out_dir=$OUT/cpu ) > $OUT/cpu.log 2>&1 &
CPU=$!
( time $B run $E --backend cuda --set train.out_dir=$OUT/cuda ) > $OUT/cuda.log 2>&1
wait $CPU
python3 bench/parity/compare.py $OUT/cpu/*/metrics.jsonl $OUT/cuda/*/metrics.jsonl
cat $OUT/card.txt; grep -E "real|tokens/s" $OUT/cpu.log $OUT/cuda.log | tail -6
