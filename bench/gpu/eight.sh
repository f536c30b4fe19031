#!/bin/bash
# Issue 8 on an 8-GPU node (device kind nvidia-h200-x8), from the repository root with
# gpu-carry/ carried (stripped release binary, kcache/, allreduce.py):
#   bash bench/gpu/eight.sh [weak] [recipe]      (default: both)
# weak:   Transformer++ d12 and d16, ctx 4096, micro 4 per GPU, ZeRO-1, 1/2/4/8 GPUs, plus
#         NCCL all-reduce bus bandwidth over 8 GPUs; per-GPU tokens/s vs 1 GPU (target >= 90%).
# recipe: experiments/sambay_flops_scaling.toml at d8 exactly as a user launches it
#         (`archscale run --gpus 8`), 200 steps of 2,097,152 tokens on the built-in synthetic
#         corpus (the machine has no network), checkpoint at step 100, then resumed to 200.
#         SambaY (GMU, YOCO cross-attention) runs on the CUDA backend since 2026-11-28.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export ARCHSCALE_KERNEL_CACHE=$PWD/gpu-carry/kcache NCCL_NVLS_ENABLE=0
B=gpu-carry/archscale
what=${*:-weak recipe}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1; date -u +%Y-%m-%dT%H:%MZ
for w in $what; do case $w in
weak)
  for depth in 12 16; do for n in 1 2 4 8; do
    g=""; [ $n -gt 1 ] && g="--gpus $n"
    timeout 300 $B run bench/weak/transformer_d12.toml --backend cuda $g --max-steps 30 --set depth=$depth \
      --set cluster.gpus_per_node=$n --set base.batch_tokens=$((16384*n)) --set train.tokens=$((16384*n*200)) \
      --set cluster.sharding=zero1 --set train.out_dir=$OUT/d$depth-w$n > $OUT/d$depth-w$n.log 2>&1
    echo "d$depth gpus $n rc=$?"
  done; done
  python3 -m torch.distributed.run --nproc_per_node 8 gpu-carry/allreduce.py 2>&1 | grep allreduce
  python3 - "$OUT" <<'PY'
import json, sys, glob
out = sys.argv[1]
for depth in (12, 16):
    base = None
    for n in (1, 2, 4, 8):
        f = glob.glob(f"{out}/d{depth}-w{n}/*/metrics.jsonl")
        t = [json.loads(l)["tokens_per_s"] for l in open(f[0]) if "tokens_per_s" in l][1:] if f else []
        if not t: print(f"d{depth} {n} GPUs: no metrics"); continue
        med = sorted(t)[len(t)//2]; per = med / n; base = base or per
        print(f"d{depth} {n} GPUs ZeRO-1: {med:,.0f} tokens/s, per GPU {per:,.0f} = {100*per/base:.1f}% of 1 GPU")
PY
  ;;
recipe)
  R=(experiments/sambay_flops_scaling.toml --run scaling_mup_sambay_d8_ctx4096 --backend cuda --gpus 8
     --set 'data.train=[{ synthetic = { seed = 11, tokens = 50_000_000 } }]'
     --set 'data.val=[{ synthetic = { seed = 12, tokens = 5_000_000 } }]'
     --set train.save_interval=100 --set train.eval_interval=100 --set train.log_interval=10
     --set train.out_dir=$OUT/recipe)
  timeout 580 $B run "${R[@]}" --max-steps 100 > $OUT/recipe-a.log 2>&1; echo "recipe 0-100 rc=$?"
  timeout 580 $B run "${R[@]}" --resume auto --max-steps 100 > $OUT/recipe-b.log 2>&1; echo "recipe 100-200 rc=$?"
  grep -h "step .*loss\|val_loss\|error" $OUT/recipe-a.log $OUT/recipe-b.log | tail -25 ;;
esac; done
