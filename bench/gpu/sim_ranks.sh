# Sourced by the one-GPU multi-rank checks (muon_zero.sh, hybrid_zero.sh). Every rank is its
# own process on device 0 and claims its own host to NCCL (NCCL_HOSTID), so NCCL accepts
# several ranks on one GPU and links them by its socket transport over loopback: the same
# collectives and sharded code paths as on a multi-GPU machine, only slower.
# Needs: B (binary), P (experiment file), PS (array of --set overrides), OUT.
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export ARCHSCALE_KERNEL_CACHE=$PWD/gpu-carry/kcache NCCL_NVLS_ENABLE=0
if ! ldconfig -p 2>/dev/null | grep -q libnccl.so; then
  NL=$(python3 -c 'import nvidia.nccl as n, os; print(os.path.join(list(n.__path__)[0], "lib"))' 2>/dev/null)
  [ -n "$NL" ] && export LD_LIBRARY_PATH=$NL:$LD_LIBRARY_PATH
fi
sim_port=29611
# ranks name nodes gpus_per_node sharding extra...: one process per rank, all on GPU 0
ranks() {
  local name=$1 nodes=$2 gpn=$3 sh=$4; shift 4
  local world=$((nodes * gpn)) pids=() r
  sim_port=$((sim_port + 1))
  for ((r = 0; r < world; r++)); do
    RANK=$r WORLD_SIZE=$world LOCAL_RANK=$((r % gpn)) LOCAL_WORLD_SIZE=$gpn \
    MASTER_ADDR=127.0.0.1 MASTER_PORT=$sim_port NCCL_HOSTID=simhost-$name-$r \
    NCCL_SOCKET_IFNAME=lo NCCL_IB_DISABLE=1 \
      timeout 400 $B run $P --backend cuda "${PS[@]}" --set cluster.nodes=$nodes \
      --set cluster.gpus_per_node=$gpn --set cluster.sharding=$sh \
      --set train.out_dir=$OUT/$name "$@" > "$OUT/$name.rank$r.log" 2>&1 &
    pids+=($!)
  done
  local rc=0
  for p in "${pids[@]}"; do wait $p || rc=$?; done
  echo "$name rc=$rc"
}
# one name extra...: one process, the world-4 plan (every rank's micro-batches in turn)
one() {
  local name=$1; shift
  timeout 300 $B run $P --backend cuda "${PS[@]}" --set cluster.gpus_per_node=4 \
    --set cluster.sharding=data_parallel --set train.out_dir=$OUT/$name "$@" > "$OUT/$name.log" 2>&1
  echo "$name rc=$?"
}
# the error lines of every log under $OUT
sim_errors() {
  for f in $OUT/*.log; do
    if grep -qi "error\|panick" "$f"; then echo "== $f"; grep -i "error\|panick" "$f" | head -5; fi
  done
}
# per-step loss agreement of run pairs: sim_compare "ref:z1" "ref:z3" ...
sim_compare() {
  python3 - "$OUT" "$@" <<'PY'
import json, sys, glob
out = sys.argv[1]
def losses(d):
    f = sorted(glob.glob(f"{out}/{d}/*/metrics.jsonl"))
    rows = [json.loads(l) for l in open(f[0])] if f else []
    return {r["step"]: r["loss"] for r in rows if "loss" in r}
for pair in sys.argv[2:]:
    a, b = pair.split(":")
    A, B = losses(a), losses(b)
    common = sorted(set(A) & set(B))
    if not common:
        print(f"{a:>10} vs {b:<10} no common steps"); continue
    d = [abs(A[s] - B[s]) for s in common]
    print(f"{a:>10} vs {b:<10} steps {common[0]}..{common[-1]} ({len(common)})  "
          f"max|dloss| first 3 {max(d[:3]):.2e}, all {max(d):.2e}  "
          f"loss {A[common[0]]:.4f} -> {A[common[-1]]:.4f} / {B[common[0]]:.4f} -> {B[common[-1]]:.4f}")
PY
}
