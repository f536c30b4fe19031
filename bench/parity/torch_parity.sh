#!/bin/bash
# One device call: our CUDA side of the 300-step Shakespeare parity run and ArchScale's model in
# PyTorch (bench/parity/torch_parity.py) from the same initial checkpoint and batches, in fp32
# and under bf16 autocast. C names the carried folder: archscale, kcache/, parity/shakespeare/,
# init.safetensors (the step-1 checkpoint of a 1-step CPU run: lr is 0 at step 1, so it is the
# init) and shakespeare_b4096.toml pointing at C's data.
set -u
C=${C:-gpu-carry-parity}; OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export ARCHSCALE_KERNEL_CACHE=$PWD/$C/kcache
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$OUT/card.txt"
python3 -c "import torch; print('torch', torch.__version__)" >> "$OUT/card.txt"
timeout 120 $C/archscale run $C/shakespeare_b4096.toml --backend cuda --set train.out_dir=$OUT/cuda > "$OUT/cuda.log" 2>&1
cp $OUT/cuda/*/metrics.jsonl "$OUT/cuda_metrics.jsonl"; rm -rf $OUT/cuda
PYTHONUNBUFFERED=1 timeout 400 python3 bench/parity/torch_parity.py --init $C/init.safetensors \
  --data $C/parity/shakespeare --out "$OUT" > "$OUT/torch_parity.txt" 2>&1
cat "$OUT/card.txt"; tail -2 "$OUT/cuda.log"; tail -40 "$OUT/torch_parity.txt"
