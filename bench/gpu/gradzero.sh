#!/bin/bash
# Gradients overwritten by the first weight-gradient products instead of zeroed after each
# optimizer step (bench/NOTES.md, "Gradient zeroing"): correctness, the same runs with the
# binary before (OLD) and after (NEW), throughput interleaved old/new/old/new. Carry dir $C
# holds archscale (new), archscale-main (old), kcache/ with both loss_optim cubins, and
# parity/ (bench/parity/shakespeare_b4096.toml and shakes-arch.toml with the data dirs
# pointing at $C/parity/shakespeare, and the data):
#   C=gpu-carry-gradzero bash bench/gpu/gradzero.sh
# Logs go to /tmp/gzw/logs (the device tool returns only about 8 files from $OUT); $OUT gets
# summary.txt and logs.tgz.
set -u
C=${C:-gpu-carry-gradzero}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; W=/tmp/gzw; rm -rf $W; L=$W/logs; mkdir -p $L
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export ARCHSCALE_KERNEL_CACHE=$PWD/$C/kcache
export ARCHSCALE_EXPERIMENTAL_MAMBA=1
NEW=$C/archscale; OLD=$C/archscale-main
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
stamp() { echo "$(el)s $*" >> "$L/times.txt"; }
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv,noheader > "$L/card.txt"
date -u +%Y-%m-%dT%H:%MZ >> "$L/card.txt"

# 1. model parity + the two-step accumulation check (new binary), AdamW kernel check
E=$C/parity/shakespeare_b4096.toml
timeout 100 $NEW selftest --only adamw --model $E --set train.micro_batch=8 --seed 1 > "$L/selftest_shakes.txt" 2>&1
echo "rc=$?" >> "$L/selftest_shakes.txt"; stamp selftest shakes
for m in sambaymlp phi4; do
  timeout 60 $NEW selftest --only none --model bench/${m}_parity.toml --seed 1 > "$L/selftest_$m.txt" 2>&1
  echo "rc=$?" >> "$L/selftest_$m.txt"; stamp selftest $m
done

# 2. 30 steps of the Shakespeare parity run: old, new, old again (run-to-run noise);
#    gas 2 (micro 8) old and new; new stopped at 15 and resumed to 30 (checkpoint path).
run() {  # tag binary extra-args...
  local tag=$1 b=$2; shift 2
  timeout 60 $b run $E --backend cuda --set train.log_interval=1 --set train.eval_interval=10 \
    --set train.out_dir=$W/run_$tag "$@" >> "$L/run_$tag.log" 2>&1
  echo "rc=$?" >> "$L/run_$tag.log"; stamp run $tag
  mkdir -p "$L/run_$tag"; cp $W/run_$tag/*/metrics.jsonl "$L/run_$tag/" 2>/dev/null
}
run old $OLD --max-steps 30
run new $NEW --max-steps 30
run old2 $OLD --max-steps 30
run gas2_old $OLD --max-steps 30 --set train.micro_batch=8
run gas2_new $NEW --max-steps 30 --set train.micro_batch=8
run resume $NEW --max-steps 15 --set train.micro_batch=8
run resume $NEW --max-steps 15 --set train.micro_batch=8 --resume auto

# 3. throughput, interleaved old/new/old/new (d16 micro 4, then d8 micro 8)
for cfg in "16 4" "8 8"; do
  set -- $cfg
  for r in 1 2; do
    for v in old new; do
      if [ "$(el)" -gt 290 ]; then stamp "skip bench d$1 $v $r (time)"; continue; fi
      b=$OLD; [ $v = new ] && b=$NEW
      timeout 45 $b bench bench/transformer_ctx4096.toml --set "depth=[$1]" --micro $2 --steps 6 --warmup 3 \
        > "$L/bench_d$1_${v}_$r.txt" 2>&1
      stamp bench d$1 $v $r
    done
  done
done
python3 bench/gpu/gradzero_summary.py "$L" | tee "$OUT/summary.txt"
tar czf "$OUT/logs.tgz" -C $W logs
