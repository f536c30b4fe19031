#!/bin/bash
# Memory-bound Mamba/GMU kernels (conv1d+SiLU fwd/bwd, GMU gate fwd/bwd) on one GPU, one call:
# their selftest cases (mamba_conv, gmu; both paths each: two channels / 8 elements per
# thread and the element-wise fallback), the isolated benchmark at the SambaY-d16 and d8
# widths (`--bench-scan`, which also times the scan) with the default kernels and each timing
# toggle in $DEFINES (ARCHSCALE_KERNEL_DEFINES; see mamba.cu: CONV_FWD_NB8, CONV_BWD_2BLOCKS),
# then SambaY steps at $DEPTHS (profiled) and Transformer++ at the same depths for the ratio.
# Usage (repo root, after `strip -o $C/archscale target/release/archscale` and the kernel
# cache compiled into $C/kcache for each define set you run):
#   C=gpu-carry-ew bash $C/ew.sh      (e.g. DEPTHS=16 DEFINES="CONV_FWD_NB8")
set -u
C=${C:-gpu-carry-ew}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export ARCHSCALE_KERNEL_CACHE=$PWD/$C/kcache
B=$C/archscale
DEPTHS=${DEPTHS:-16 8}
DEFINES=${DEFINES:-CONV_FWD_NB8 CONV_BWD_2BLOCKS}
STEPS=${STEPS:-6}
t() { local s=$SECONDS; "$@"; local rc=$?; echo "rc=$rc $((SECONDS - s)) s"; }
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv,noheader
echo -n "selftest mamba (conv + scan): "; t timeout 90 $B selftest --only mamba > $OUT/selftest-mamba.txt 2>&1
echo -n "selftest gmu: "; t timeout 60 $B selftest --only gmu > $OUT/selftest-gmu.txt 2>&1
echo -n "bench default: "; t timeout 90 $B selftest --only none --bench-scan > $OUT/bench-default.txt 2>&1
for d in $DEFINES; do
  echo -n "bench $d: "
  ARCHSCALE_KERNEL_DEFINES=$d t timeout 90 $B selftest --only none --bench-scan > $OUT/bench-$d.txt 2>&1
done
for d in $DEPTHS; do
  echo -n "sambay d$d: "
  t timeout 90 $B bench bench/samba_ctx4096.toml --set arch=sambay --set "depth=[$d]" \
    --micro 4 --steps $STEPS --warmup 2 --profile > $OUT/sambay-d$d.txt 2>&1
  echo -n "transformer d$d: "
  t timeout 90 $B bench bench/transformer_ctx4096.toml --set "depth=[$d]" --micro 4 --steps $STEPS --warmup 2 \
    > $OUT/tf-d$d.txt 2>&1
done
echo "== selftest (conv, gmu lines; FAIL/ERROR first)"
grep -hE "FAIL|ERROR" $OUT/selftest-mamba.txt $OUT/selftest-gmu.txt | head -10
grep -hE "^mamba conv|^gmu" $OUT/selftest-mamba.txt $OUT/selftest-gmu.txt | wc -l | sed 's/^/conv + gmu checks: /'
grep -hE "passed" $OUT/selftest-mamba.txt $OUT/selftest-gmu.txt
echo "== isolated kernels (ms, % of 4.3 TB/s)"
for f in $OUT/bench-*.txt; do
  echo "-- $(basename $f .txt)"
  grep -E "^conv|^gmu|ERROR" $f | sed -E 's/; must move.*-> [0-9]+ GB\/s = / /; s/ of 4.3 TB\/s \(floor ([0-9.]+) ms\).*/ (floor \1)/'
done
echo "== SambaY / Transformer++ steps"
for d in $DEPTHS; do
  echo "-- sambay d$d"; grep -iE "conv|gmu|error" $OUT/sambay-d$d.txt | grep -vE "^bench |^\{|rc=" | tail -8
  grep -oE '"step_s":[0-9.]+,"tokens_per_s":[0-9.]+' $OUT/sambay-d$d.txt
  echo "-- transformer d$d"; grep -oE '"step_s":[0-9.]+,"tokens_per_s":[0-9.]+' $OUT/tf-d$d.txt
done
