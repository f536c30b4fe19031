set -u
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export ARCHSCALE_KERNEL_CACHE=$PWD/gpu-carry/kcache NCCL_NVLS_ENABLE=0
B=gpu-carry/archscale; P=bench/parity/shakespeare.toml
PS=(--set base.batch_tokens=4096 --set train.log_interval=1 --set train.eval_interval=1000 --set train.save_interval=1000 --set cluster.gpus_per_node=2)
r() { local name=$1; shift; timeout 120 $B run $P --backend cuda "${PS[@]}" --set train.out_dir=$OUT/$name "$@" --max-steps 3 > $OUT/$name.log 2>&1; echo "$name rc=$? $(grep -o 'step *[0-9]*  loss [0-9.]*  lr [0-9.e-]*  grad_norm [0-9.]*' $OUT/$name.log | awk '{printf "%s/%s ", $4, $8}')"; }
r refA --set train.micro_batch=1
r refB --set train.micro_batch=1
r dp4 --set train.micro_batch=1 --gpus 2
ARCHSCALE_OVERLAP_REDUCE=0 r dp4noov --set train.micro_batch=1 --gpus 2
r ref4g1 --set train.micro_batch=4
r dp4g1 --set train.micro_batch=4 --gpus 2
r z1 --set train.micro_batch=1 --gpus 2 --set cluster.sharding=zero1
r z3 --set train.micro_batch=1 --gpus 2 --set cluster.sharding=zero3
tail -5 $OUT/z3.log
