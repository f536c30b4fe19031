#!/bin/bash
# Which learning rate makes the 300-step Shakespeare parity plan well-posed? For each LR in
# $LRS (min_lr = LR/10) and seed in $SEEDS, from one init and one batch order: ArchScale's
# model in PyTorch fp32 (our CPU reference's stand-in), the same with every weight nudged by
# 2^-20 once (the plan's own chaos), under bf16 autocast, and our CUDA run twice.
#   C=gpu-carry-parity LRS="2e-3 1e-3 5e-4" SEEDS="1 2 3" CUDA_RUNS="a b" bash bench/parity/plan_search.sh
set -u
C=${C:-gpu-carry-parity}; OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export ARCHSCALE_KERNEL_CACHE=$PWD/$C/kcache
E=$C/shakespeare_b4096.toml
for L in ${LRS:-2e-3 1e-3 5e-4}; do
  M=$(python3 -c "print($L / 10)")
  for S in ${SEEDS:-1 2 3}; do
    tag=_lr${L}_s$S
    set_lr="--set base.lr=$L --set base.min_lr=$M --set train.seed=$S"
    timeout 60 $C/archscale run $E --backend cuda $set_lr --set train.tokens=4096 \
      --set train.save_interval=1 --set train.out_dir=$OUT/init > $OUT/init$tag.log 2>&1
    cp $OUT/init/*/checkpoints/step-00000001/model.safetensors $OUT/init.safetensors; rm -rf $OUT/init
    for r in ${CUDA_RUNS:-a b}; do
      timeout 120 $C/archscale run $E --backend cuda $set_lr --set train.out_dir=$OUT/c > $OUT/cuda${tag}_$r.log 2>&1
      cp $OUT/c/*/metrics.jsonl $OUT/cuda${tag}_$r.jsonl; rm -rf $OUT/c
    done
    PYTHONUNBUFFERED=1 timeout 300 python3 bench/parity/torch_parity.py --init $OUT/init.safetensors \
      --data $C/parity/shakespeare --out $OUT --runs fp32,fp32_perturbed,bf16 --seed $S --lr $L --min-lr $M \
      --tag $tag > $OUT/torch$tag.txt 2>&1 || tail -3 $OUT/torch$tag.txt
    rm -f $OUT/init.safetensors
  done
  echo "== lr $L"; python3 bench/parity/seeds_table.py $OUT _lr$L
done
