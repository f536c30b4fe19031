#!/bin/bash
# Weak scaling of Transformer++ d12 at ctx 4096 (micro 4 per GPU, gas 1) over 1, 2 and 4 GPUs
# with data parallelism, plus NCCL all-reduce bus bandwidth in the same call.
set -u
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export ARCHSCALE_KERNEL_CACHE=$PWD/gpu-carry/kcache NCCL_NVLS_ENABLE=0
B=gpu-carry/archscale; E=bench/weak/transformer_d12.toml; STEPS=${STEPS:-40}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1
for n in 1 2 4; do
  gpus=""; [ $n -gt 1 ] && gpus="--gpus $n"
  timeout 240 $B run $E --backend cuda $gpus --max-steps $STEPS --set cluster.gpus_per_node=$n \
    --set base.batch_tokens=$((16384*n)) --set train.tokens=$((16384*n*200)) \
    --set cluster.sharding=data_parallel --set train.out_dir=$OUT/w$n > $OUT/w$n.log 2>&1
  echo "gpus $n rc=$?"
done
python3 -m torch.distributed.run --nproc_per_node 4 bench/weak/allreduce.py 2>&1 | grep allreduce
python3 - <<'PY'
import json, glob, os
out = os.environ["OUT"]; base = None
for n in (1, 2, 4):
    f = glob.glob(f"{out}/w{n}/*/metrics.jsonl")
    if not f: print(f"gpus {n}: no metrics"); continue
    rows = [json.loads(l) for l in open(f[0])]
    tps = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][1:]  # first window holds setup + step-0 eval
    med = sorted(tps)[len(tps)//2]; per = med / n; base = base or per
    print(f"gpus {n}: median {med:,.0f} tokens/s over {len(tps)} windows of 5 steps, per GPU {per:,.0f} = {100*per/base:.1f}% of 1 GPU")
PY
