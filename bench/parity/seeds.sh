#!/bin/bash
# Several seeds of the 300-step Shakespeare parity plan, each from one init and one batch order:
# our CUDA run twice (run-to-run spread), ArchScale's model in PyTorch fp32 (the CPU
# reference's stand-in: bench/parity/torch_parity.py matches our CPU curve) and under bf16
# autocast. The init of each seed is the step-1 checkpoint of a 1-step run (lr 0 at step 1);
# for seed 3407 it is checked against the CPU's ($C/init.safetensors). SEEDS="3407 1 2".
set -u
C=${C:-gpu-carry-parity}; OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export ARCHSCALE_KERNEL_CACHE=$PWD/$C/kcache
E=$C/shakespeare_b4096.toml
for S in ${SEEDS:-3407 1 2 3 4 5}; do
  timeout 60 $C/archscale run $E --backend cuda --set train.seed=$S --set train.tokens=4096 \
    --set train.save_interval=1 --set train.out_dir=$OUT/init$S > $OUT/init$S.log 2>&1
  cp $OUT/init$S/*/checkpoints/step-00000001/model.safetensors $OUT/init_s$S.safetensors; rm -rf $OUT/init$S
  [ $S = 3407 ] && { cmp $OUT/init_s$S.safetensors $C/init.safetensors && echo "seed 3407: CUDA init == CPU init"; }
  for r in a b; do
    timeout 120 $C/archscale run $E --backend cuda --set train.seed=$S --set train.out_dir=$OUT/c \
      > $OUT/cuda_s${S}_$r.log 2>&1
    cp $OUT/c/*/metrics.jsonl $OUT/cuda_s${S}_$r.jsonl; rm -rf $OUT/c
  done
  PYTHONUNBUFFERED=1 timeout 300 python3 bench/parity/torch_parity.py --init $OUT/init_s$S.safetensors \
    --data $C/parity/shakespeare --out $OUT --runs fp32,bf16 --seed $S --tag _s$S > $OUT/torch_s$S.txt 2>&1
  rm -f $OUT/init_s$S.safetensors
  tail -1 $OUT/torch_s$S.txt
done
python3 bench/parity/seeds_table.py $OUT
