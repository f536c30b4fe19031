#!/bin/bash
# Several seeds of the 300-step Shakespeare parity plan, each from one init and one batch order:
# our CUDA run $CUDA_RUNS times (run-to-run spread), ArchScale's model in PyTorch fp32 (the CPU
# reference's stand-in: bench/parity/torch_parity.py matches our CPU curve) and under bf16
# autocast ($TORCH_RUNS; fp32_perturbed adds the fp32 run with every weight nudged by 2^-20 once,
# the plan's own chaos). The init of each seed is the step-1 checkpoint of a 1-step run (lr 0 at
# step 1); for seed 3407 at the plan's LR it is checked against the CPU's ($C/init.safetensors).
# LRS="1e-3 5e-4" repeats all of it per learning rate (base.lr, min_lr = LR/10), one table each
# (bench/parity/plan_search.sh). SEEDS="3407 1 2".
set -u
C=${C:-gpu-carry-parity}; OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export ARCHSCALE_KERNEL_CACHE=$PWD/$C/kcache
E=$C/shakespeare_b4096.toml
for L in ${LRS:-plan}; do
  lr_tag=; lr_set=; lr_args=
  if [ "$L" != plan ]; then
    M=$(python3 -c "print($L / 10)")
    lr_tag=_lr$L; lr_set="--set base.lr=$L --set base.min_lr=$M"; lr_args="--lr $L --min-lr $M"
  fi
  for S in ${SEEDS:-3407 1 2 3 4 5}; do
    tag=${lr_tag}_s$S
    timeout 60 $C/archscale run $E --backend cuda $lr_set --set train.seed=$S --set train.tokens=4096 \
      --set train.save_interval=1 --set train.out_dir=$OUT/init$S > $OUT/init$tag.log 2>&1
    cp $OUT/init$S/*/checkpoints/step-00000001/model.safetensors $OUT/init$tag.safetensors; rm -rf $OUT/init$S
    [ $S = 3407 ] && [ -z "$lr_tag" ] && { cmp $OUT/init$tag.safetensors $C/init.safetensors && echo "seed 3407: CUDA init == CPU init"; }
    for r in ${CUDA_RUNS:-a b}; do
      timeout 120 $C/archscale run $E --backend cuda $lr_set --set train.seed=$S --set train.out_dir=$OUT/c \
        > $OUT/cuda${tag}_$r.log 2>&1
      cp $OUT/c/*/metrics.jsonl $OUT/cuda${tag}_$r.jsonl; rm -rf $OUT/c
    done
    PYTHONUNBUFFERED=1 timeout 300 python3 bench/parity/torch_parity.py --init $OUT/init$tag.safetensors \
      --data $C/parity/shakespeare --out $OUT --runs ${TORCH_RUNS:-fp32,bf16} --seed $S $lr_args --tag $tag \
      > $OUT/torch$tag.txt 2>&1
    rm -f $OUT/init$tag.safetensors
    tail -1 $OUT/torch$tag.txt
  done
  [ -n "$lr_tag" ] && echo "== lr $L"
  python3 bench/parity/seeds_table.py $OUT $lr_tag
done
