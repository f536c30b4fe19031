#!/bin/bash
# Multi-GPU checks on an NG-GPU machine (NG=4: kind nvidia-h200-x4; NG=2: nvidia-h200-x2),
# from the repository root with gpu-carry/ carried (stripped release binary, kcache/,
# parity data, allreduce.py).
#   NG=4 bash bench/gpu/zero.sh [parity] [resume] [memory] [weak]     (default: all)
# parity: 50 steps of the Shakespeare parity model at one global batch (4096 tokens):
#         the world-2 and world-4 plans in one process (the exact reference: every rank
#         computed in turn on GPU 0) against DP=2, DP=4, ZeRO-1 and ZeRO-3 over NCCL.
# resume: ZeRO-1 on 4 GPUs resumed from its sharded step-25 checkpoint on 4 GPUs (must
#         reproduce the uninterrupted run) and on 2 GPUs under ZeRO-3 (re-sharded).
# memory: Transformer++ d16, ctx 4096, micro 1, 4 GPUs: ZeRO-1 vs ZeRO-3 per-GPU memory.
# weak:   d12 ctx 4096 weak scaling 1/2/4 GPUs (data parallel and ZeRO-1, gradient
#         reduction overlapped with the backward pass) + NCCL all-reduce bus bandwidth.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export ARCHSCALE_KERNEL_CACHE=$PWD/gpu-carry/kcache NCCL_NVLS_ENABLE=0
if ! ldconfig -p 2>/dev/null | grep -q libnccl.so; then
  NL=$(python3 -c 'import nvidia.nccl as n, os; print(os.path.join(list(n.__path__)[0], "lib"))' 2>/dev/null)
  [ -n "$NL" ] && export LD_LIBRARY_PATH=$NL:$LD_LIBRARY_PATH
fi
B=${BIN:-gpu-carry/archscale}
NG=${NG:-4}
what=${*:-parity resume memory weak}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1 | tee "$OUT/smi.txt"
date -u +%Y-%m-%dT%H:%MZ | tee -a "$OUT/smi.txt"
P=bench/parity/shakespeare.toml
PS=(--set base.batch_tokens=4096 --set train.micro_batch=1 --set train.log_interval=1
    --set train.eval_interval=25 --set train.save_interval=25)
run() { # name gpus sharding extra...
  local name=$1 n=$2 sh=$3; shift 3
  local g=""; [ "$n" -gt 1 ] && g="--gpus $n"
  timeout 300 $B run $P --backend cuda $g "${PS[@]}" --set cluster.sharding=$sh \
    --set train.out_dir=$OUT/$name "$@" > "$OUT/$name.log" 2>&1
  echo "$name rc=$?"
}
for w in $what; do case $w in
parity)
  run ref2 1 data_parallel --set cluster.gpus_per_node=2 --max-steps 50
  run dp2 2 data_parallel --set cluster.gpus_per_node=2 --max-steps 50
  run refN 1 data_parallel --set cluster.gpus_per_node=$NG --max-steps 50
  [ $NG -ge 4 ] && run dp4 4 data_parallel --set cluster.gpus_per_node=4 --max-steps 50
  run z1 $NG zero1 --set cluster.gpus_per_node=$NG --max-steps 50
  run z3 $NG zero3 --set cluster.gpus_per_node=$NG --max-steps 50 ;;
resume)
  ck=$(ls -d $OUT/z1/*/checkpoints/step-00000025 2>/dev/null | head -1)
  ls "$ck" > "$OUT/ck-files.txt" 2>&1
  run z1r4 $NG zero1 --set cluster.gpus_per_node=$NG --resume "$ck" --max-steps 25
  run z3r2 $((NG/2)) zero3 --set cluster.gpus_per_node=$((NG/2)) --resume "$ck" --max-steps 25 ;;
memory)
  for sh in zero1 zero3; do
    timeout 300 $B run bench/weak/transformer_d12.toml --backend cuda --gpus $NG --set depth=16 \
      --set cluster.gpus_per_node=$NG --set train.micro_batch=1 --set base.batch_tokens=$((4096*NG)) \
      --set train.tokens=1638400 --set train.log_interval=1 --set cluster.sharding=$sh \
      --set train.out_dir=$OUT/mem-$sh --max-steps 6 > "$OUT/mem-$sh.log" 2>&1
    echo "mem-$sh rc=$?"
  done ;;
weak)
  cfgs=("1 data_parallel" "2 data_parallel"); [ $NG -ge 4 ] && cfgs+=("4 data_parallel")
  cfgs+=("$NG zero1" "$NG zero3")
  for cfg in "${cfgs[@]}"; do
    set -- $cfg; n=$1; sh=$2; g=""; [ $n -gt 1 ] && g="--gpus $n"
    timeout 240 $B run bench/weak/transformer_d12.toml --backend cuda $g --max-steps 40 \
      --set cluster.gpus_per_node=$n --set base.batch_tokens=$((16384*n)) \
      --set train.tokens=$((16384*n*200)) --set cluster.sharding=$sh \
      --set train.out_dir=$OUT/w$n-$sh > "$OUT/w$n-$sh.log" 2>&1
    echo "weak $n $sh rc=$?"
  done
  python3 -m torch.distributed.run --nproc_per_node $NG gpu-carry/allreduce.py 2>&1 | grep allreduce ;;
esac; done
for f in z3 z3r2 mem-zero3 w$NG-zero3; do [ -f $OUT/$f.log ] && { echo "== $f.log"; grep -v "^step\|val_loss" $OUT/$f.log | tail -4; }; done
python3 - "$OUT" "$NG" <<'PY'
import json, sys, glob
out, ng = sys.argv[1], int(sys.argv[2])
def rows(d):
    f = glob.glob(f"{out}/{d}/*/metrics.jsonl")
    return [json.loads(l) for l in open(f[0])] if f else []
def losses(d):
    return {r["step"]: r["loss"] for r in rows(d) if "loss" in r}
def vals(d):
    return {r["step"]: r["val_loss@1x"] for r in rows(d) if "val_loss@1x" in r}
def cmp(a, b):
    A, B = losses(a), losses(b)
    common = sorted(set(A) & set(B))
    if not common: return f"{a} vs {b}: no common steps"
    d = [abs(A[s] - B[s]) for s in common]
    last = common[-1]
    va, vb = vals(a), vals(b)
    vs = sorted(set(va) & set(vb))
    vtxt = f", val@{vs[-1]} {va[vs[-1]]:.4f}/{vb[vs[-1]]:.4f}" if vs else ""
    return (f"{a:>5} vs {b:<5} steps {len(common):3d}  max|dloss| {max(d):.2e}  "
            f"loss@{last} {A[last]:.4f}/{B[last]:.4f}{vtxt}")
print("== loss agreement (same global batch, 4096 tokens/step)")
for a, b in [("ref2","dp2"),("refN","dp4"),("refN","z1"),("refN","z3"),("z1","z3"),("z1","z1r4")]:
    print(cmp(a, b))
z = losses("z3r2")
if z: print(f"z3r2 (world-{ng} ZeRO-1 checkpoint resumed on {ng//2} GPUs, ZeRO-3): steps {min(z)}..{max(z)}, loss {z[min(z)]:.4f} -> {z[max(z)]:.4f}; z1 at those steps {losses('z1').get(min(z),float('nan')):.4f} -> {losses('z1').get(max(z),float('nan')):.4f}")
print(f"== memory, d16 ctx 4096 micro 1, {ng} GPUs (rank 0)")
mem = {}
for sh in ("zero1", "zero3"):
    r = [x for x in rows(f"mem-{sh}") if "peak_mem_bytes" in x]
    if r:
        mem[sh] = (r[-1]["peak_mem_bytes"], r[-1]["model_state_bytes"], r[-1]["tokens_per_s"])
        print(f"{sh}: peak {mem[sh][0]/2**30:.2f} GiB, params+grads+optimizer {mem[sh][1]/2**30:.2f} GiB, {mem[sh][2]:,.0f} tokens/s")
if len(mem) == 2:
    print(f"zero3/zero1: peak {100*mem['zero3'][0]/mem['zero1'][0]:.1f}%, model state {100*mem['zero3'][1]/mem['zero1'][1]:.1f}%")
print("== weak scaling d12 ctx 4096 micro 4 per GPU")
base = None
for n, sh in [(1,"data_parallel"),(2,"data_parallel"),(4,"data_parallel"),(ng,"zero1"),(ng,"zero3")]:
    t = [x["tokens_per_s"] for x in rows(f"w{n}-{sh}") if "tokens_per_s" in x][1:]
    if not t: print(f"{n} {sh}: no metrics"); continue
    med = sorted(t)[len(t)//2]; per = med / n; base = base or per
    print(f"{n} GPU {sh:>13}: median {med:,.0f} tokens/s, per GPU {per:,.0f} = {100*per/base:.1f}% of 1 GPU")
PY
