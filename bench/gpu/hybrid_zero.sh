#!/bin/bash
# The hybrid families under ZeRO-1 and ZeRO-3 on ONE GPU (ranks as simulated hosts, see
# bench/gpu/sim_ranks.sh): GMU memory export, YOCO shared KV, differential attention and
# LayerNorm/biases cross unit boundaries in the backward pass, where gradients are reduced
# unit by unit while the backward goes on. Each family's tiny parity model (synthetic data of
# 400k tokens, 7 shards, so each of 4 ranks gets one; 2,048 tokens per step = 4 ranks x
# micro 2 x 256) trains 20 steps as the world-4 plan in one process (ref) and on 4 ranks
# under ZeRO-1 and ZeRO-3; SambaY also with Muon under ZeRO-3.
# From the repository root with gpu-carry/ carried:  bash bench/gpu/hybrid_zero.sh [family...]
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
B=${BIN:-gpu-carry/archscale}
source bench/gpu/sim_ranks.sh
fams=${*:-sambay sambayda phi4 samba}
pairs=()
for f in $fams; do
  P=bench/${f}_parity.toml
  PS=(--set base.batch_tokens=2048 --set train.micro_batch=2 --set train.log_interval=1
      --set train.eval_interval=1000 --set train.save_interval=1000
      --set 'data.train=[{ synthetic = { seed = 1, tokens = 400_000 } }]')
  one $f-ref --max-steps 20
  ranks $f-z1 4 1 zero1 --max-steps 20
  ranks $f-z3 4 1 zero3 --max-steps 20
  pairs+=("$f-ref:$f-z1" "$f-ref:$f-z3")
  if [ $f = sambay ]; then
    PS+=(--set train.optimizer=muon --set parametrization=mup++)
    one $f-muon-ref --max-steps 20
    ranks $f-muon-z3 4 1 zero3 --max-steps 20
    pairs+=("$f-muon-ref:$f-muon-z3")
  fi
done
sim_errors
echo "== hybrid families: loss agreement with the one-process world-4 reference"
sim_compare "${pairs[@]}"
