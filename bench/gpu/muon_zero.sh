#!/bin/bash
# Muon under ZeRO-1 / ZeRO-3 / hybrid shard, on ONE GPU (ranks as simulated hosts, see
# bench/gpu/sim_ranks.sh).
# From the repository root on the GPU machine with gpu-carry/ carried (stripped release
# binary, kcache/, parity/shakespeare data).
#   bash bench/gpu/muon_zero.sh
# Runs (Shakespeare parity model, 4096 tokens per step, micro 1, Muon, 30 steps, checkpoint
# at 15):
#   ref   world-4 plan in one process (every rank computed in turn): replicated Muon
#   dp    4 ranks, data parallel         z1  4 ranks (4 "nodes" x 1), ZeRO-1
#   z3    4 ranks, ZeRO-3                hs  4 ranks (2 "nodes" x 2), hybrid shard
#   z3r2  z1's step-15 checkpoint resumed under ZeRO-3 on 2 ranks (re-sharded), to step 30
#   r1    z1's step-15 checkpoint resumed in one process (sharded momentum -> momentum_buffer)
#   z1r, z3r  z1's / z3's step-15 checkpoint resumed on the same 4 ranks and layout (each
#         rank reads only its own optimizer shard)
#   cpu   a CPU-written step-2 Muon checkpoint (world-4 plan, one process) resumed under
#         ZeRO-1 on 4 ranks
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
B=${BIN:-gpu-carry/archscale}
P=bench/parity/shakespeare.toml
PS=(--set base.batch_tokens=4096 --set train.micro_batch=1 --set train.log_interval=1
    --set train.eval_interval=15 --set train.save_interval=15 --set train.optimizer=muon
    --set parametrization=mup++)
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1 | tee "$OUT/smi.txt"
date -u +%Y-%m-%dT%H:%MZ | tee -a "$OUT/smi.txt"
source bench/gpu/sim_ranks.sh
one ref --max-steps 30
ranks dp 4 1 data_parallel --max-steps 30
ranks z1 4 1 zero1 --max-steps 30
ranks z3 4 1 zero3 --max-steps 30
ranks hs 2 2 hybrid_shard --max-steps 30
ck=$(ls -d $OUT/z1/*/checkpoints/step-00000015 2>/dev/null | head -1)
ls "$ck" > "$OUT/ck-files.txt" 2>&1
ranks z3r2 2 1 zero3 --resume "$ck" --max-steps 15
one r1 --resume "$ck" --max-steps 15
# the same world and layout: every rank reads only its own optimizer shard
ranks z1r 4 1 zero1 --resume "$ck" --max-steps 15
ck3=$(ls -d $OUT/z3/*/checkpoints/step-00000015 2>/dev/null | head -1)
ranks z3r 4 1 zero3 --resume "$ck3" --max-steps 15
grep -h "resumed from" $OUT/z1r/*/events.log $OUT/z3r/*/events.log 2>/dev/null | cut -c1-200
timeout 120 $B run $P --backend cpu "${PS[@]}" --set cluster.gpus_per_node=4 \
  --set cluster.sharding=data_parallel --set train.out_dir=$OUT/cpu-ck --max-steps 2 > "$OUT/cpu-ck.log" 2>&1
echo "cpu-ck rc=$?"
cck=$(ls -d $OUT/cpu-ck/*/checkpoints/step-* 2>/dev/null | tail -1)
[ -n "$cck" ] && ranks cpu 4 1 zero1 --resume "$cck" --max-steps 3
sim_errors
echo "== Muon: loss agreement (same global batch, 4096 tokens/step)"
sim_compare ref:dp ref:z1 ref:z3 ref:hs z1:z3r2 z1:r1 z1:z1r z3:z3r
python3 - "$OUT" <<'PY'
import json, sys, glob
out = sys.argv[1]
def losses(d):
    f = sorted(glob.glob(f"{out}/{d}/*/metrics.jsonl"))
    return {r["step"]: r["loss"] for r in map(json.loads, open(f[0])) if "loss" in r} if f else {}
c, c0, ref = losses("cpu"), losses("cpu-ck"), losses("ref")
if c:
    print(f"  cpu (steps 1-2 {[round(c0[s], 4) for s in sorted(c0)]}) resumed under ZeRO-1 on 4 ranks: "
          f"steps {min(c)}..{max(c)}, loss {[round(c[s], 4) for s in sorted(c)]}; ref at those steps "
          f"{[round(ref.get(s, float('nan')), 4) for s in sorted(c)]}")
PY
# checkpoints stay on the machine (they are large); metrics and logs come back
rm -rf "$OUT"/*/*/checkpoints
