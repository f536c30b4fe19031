#!/bin/bash
# Hybrid shard (ZeRO-3 within a node, replicated across nodes) on a 4-GPU machine posing as
# 2 nodes x 2 GPUs: four processes launched as torchrun would on two hosts (RANK, WORLD_SIZE,
# LOCAL_RANK, LOCAL_WORLD_SIZE; each "node" sees its own two GPUs through
# CUDA_VISIBLE_DEVICES). Shakespeare parity model, 4,096 tokens per step, 50 steps, against
# the same world-4 plan in one process; then resumed from its step-25 checkpoint twice: as
# hybrid shard again, and re-sharded as ZeRO-3 over 4 GPUs of one node.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export ARCHSCALE_KERNEL_CACHE=$PWD/gpu-carry/kcache NCCL_NVLS_ENABLE=0
B=gpu-carry/archscale; P=bench/parity/shakespeare.toml
PS=(--backend cuda --set base.batch_tokens=4096 --set train.micro_batch=1 --set train.log_interval=1
    --set train.eval_interval=25 --set train.save_interval=25)
two_nodes() { # name extra...
  local name=$1; shift
  for r in 0 1 2 3; do
    local vis=0,1; [ $r -ge 2 ] && vis=2,3
    CUDA_VISIBLE_DEVICES=$vis RANK=$r WORLD_SIZE=4 LOCAL_RANK=$((r % 2)) LOCAL_WORLD_SIZE=2 \
      MASTER_ADDR=127.0.0.1 MASTER_PORT=29611 timeout 300 $B run $P "${PS[@]}" \
      --set cluster.nodes=2 --set cluster.gpus_per_node=2 --set cluster.sharding=hybrid_shard \
      --set train.out_dir=$OUT/$name "$@" > $OUT/$name.$r.log 2>&1 &
  done
  wait; echo "$name done"; tail -n 2 $OUT/$name.0.log
}
timeout 300 $B run $P "${PS[@]}" --set cluster.gpus_per_node=4 --set train.out_dir=$OUT/ref \
  --max-steps 50 > $OUT/ref.log 2>&1; echo "ref rc=$?"
two_nodes hyb --max-steps 50
ck=$(ls -d $OUT/hyb/*/checkpoints/step-00000025 | head -1); ls $ck
two_nodes hybr --resume $ck --max-steps 25
timeout 300 $B run $P "${PS[@]}" --gpus 4 --set cluster.gpus_per_node=4 --set cluster.sharding=zero3 \
  --set train.out_dir=$OUT/z3from2 --resume $ck --max-steps 25 > $OUT/z3from2.log 2>&1; echo "z3from2 rc=$?"
tail -n 3 $OUT/z3from2.log
python3 - "$OUT" <<'PY'
import json, sys, glob
out = sys.argv[1]
def losses(d):
    f = glob.glob(f"{out}/{d}/*/metrics.jsonl")
    rows = [json.loads(l) for l in open(f[0])] if f else []
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in rows if "loss" in r}
ref, hyb = losses("ref"), losses("hyb")
for a, b, A, B in [("ref", "hyb", ref, hyb), ("hyb", "hybr", hyb, losses("hybr")), ("hyb", "z3from2", hyb, losses("z3from2"))]:
    c = sorted(set(A) & set(B))
    if not c: print(f"{a} vs {b}: no common steps"); continue
    d = max(abs(A[s][0] - B[s][0]) for s in c)
    first = "  ".join(f"{s}:{A[s][0]:.4f}/{A[s][1]:.3f}|{B[s][0]:.4f}/{B[s][1]:.3f}" for s in c[:3])
    print(f"{a} vs {b}: steps {c[0]}..{c[-1]}, max |dloss| {d:.2e}, last {A[c[-1]][0]:.4f}/{B[c[-1]][0]:.4f}; first: {first}")
PY
