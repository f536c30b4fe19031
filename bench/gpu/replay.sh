#!/bin/bash
# Is a grad-norm spike a property of the weights or nondeterminism? Trains the parity model
# (world-2 plan in one process, 4096 tokens/step) for 9 steps, then replays step 10 from the
# step-9 checkpoint several times and prints each replay's loss and grad norm.
set -u
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export ARCHSCALE_KERNEL_CACHE=$PWD/gpu-carry/kcache
B=gpu-carry/archscale; P=bench/parity/shakespeare.toml; O=$OUT/replay
S=(--backend cuda --set base.batch_tokens=4096 --set train.micro_batch=1 --set train.log_interval=1
   --set train.eval_interval=1000 --set train.save_interval=1000 --set cluster.gpus_per_node=2)
pick() { grep -o 'step *[0-9]*  loss [0-9.]*  lr [0-9.e-]*  grad_norm [0-9.]*' "$1" | awk '{printf "%s:%s/%s ", $2, $4, $8}'; }
timeout 120 $B run $P "${S[@]}" --set train.out_dir=$O/base --max-steps 9 > $O-base.log 2>&1
echo "base rc=$? $(pick $O-base.log)"
ck=$(ls -d $O/base/*/checkpoints/step-00000009)
for i in 1 2 3 4 5 6; do
  timeout 60 $B run $P "${S[@]}" --set train.out_dir=$O/r$i --resume "$ck" --max-steps 3 > $O-r$i.log 2>&1
  echo "replay $i rc=$? $(pick $O-r$i.log)"
done
