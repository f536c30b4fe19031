#!/bin/bash
# Mamba selective scan on one GPU, one call: the mamba selftest (conv + scan, every kernel
# configuration: split (v4 bwd, with its T split rule), split-1seg (v4 bwd, one T segment),
# split3 (v3 bwd)), the isolated scan benchmark at the SambaY-d16 and d8 shapes, SambaY steps
# at $DEPTHS with the scan kernel sets in $KERNELS (profiled), and Transformer++ at $TF_DEPTHS
# for the ratio. NCU=1 adds Nsight Compute (clocks left alone) on one bench-shape launch each
# of the forward and the default backward (-s skips the selftest-case launches that come first).
# Usage (repo root, after `strip -o $C/archscale target/release/archscale` and the kernel cache
# compiled into $C/kcache):
#   C=gpu-carry-scan2 bash $C/scan.sh
set -u
C=${C:-gpu-carry-scan2}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export ARCHSCALE_KERNEL_CACHE=$PWD/$C/kcache
B=$C/archscale
KERNELS=${KERNELS:-split split3}
DEPTHS=${DEPTHS:-8 16}
TF_DEPTHS=${TF_DEPTHS:-8 16}
STEPS=${STEPS:-6}
t() { local s=$(date +%s.%N); "$@"; local rc=$?; echo "rc=$rc $(echo "$(date +%s.%N) - $s" | bc | cut -c1-5) s"; }
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv,noheader
echo -n "selftest mamba: "; t timeout 150 $B selftest --only mamba > $OUT/selftest.txt 2>&1
echo -n "bench-scan: "; t timeout 120 $B selftest --only mamba_scan --bench-scan > $OUT/bench-scan.txt 2>&1
for d in $DEPTHS; do
  for k in $KERNELS; do
    echo -n "sambay d$d $k: "
    ARCHSCALE_SCAN_KERNEL=$k t timeout 150 $B bench bench/samba_ctx4096.toml --set arch=sambay --set "depth=[$d]" \
      --micro 4 --steps $STEPS --warmup 2 --profile > $OUT/sambay-d$d-$k.txt 2>&1
  done
done
for d in $TF_DEPTHS; do
  echo -n "transformer d$d: "
  t timeout 150 $B bench bench/transformer_ctx4096.toml --set "depth=[$d]" --micro 4 --steps $STEPS --warmup 2 \
    > $OUT/tf-d$d.txt 2>&1
done
if [ -n "${NCU:-}" ]; then
  for k in fwd bwd; do
    timeout 150 ncu --clock-control none -k regex:"^selective_scan_${k}_split\$" -s $([ $k = fwd ] && echo 21 || echo 14) -c 1 \
      --section SpeedOfLight --section WarpStateStats --section ComputeWorkloadAnalysis \
      --section SchedulerStats --section Occupancy --print-details all \
      --metrics regex:'smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio' \
      $B selftest --only mamba_scan --bench-scan > $OUT/ncu-$k.txt 2>&1; echo "ncu $k rc=$?"
  done
fi
echo "== selftest: worst rel err per check and kernel configuration"
grep -E "^mamba " $OUT/selftest.txt | awk '{
  n=split($0,a,/  +/); chk=a[1]; shp=a[2]; split(shp,s," "); k=s[1];
  if (chk ~ /conv1d/) k="-";
  key=chk" ["k"]"; e=a[3]+0; if (!(key in m) || e>m[key]) m[key]=e; if ($0 ~ /FAIL/) f[key]++ }
  END { for (x in m) printf "%-55s %.3e %s\n", x, m[x], (x in f ? "FAIL" : "") }' | sort
grep -c "2seg" $OUT/selftest.txt | sed 's/^/lines with a T split: /'
grep -E "passed|ERROR|FAIL" $OUT/selftest.txt | tail -5
echo "== scan bench"
grep -E "^scan|^conv|ERROR" $OUT/bench-scan.txt | sed -E 's/; must move.*-> / /; s/ \(floor.*//'
echo "== SambaY / Transformer++ steps"
for d in $DEPTHS; do
  for k in $KERNELS; do
    echo "-- sambay d$d $k"; grep -iE "scan|error" $OUT/sambay-d$d-$k.txt | grep -vE "^bench |^\{" | tail -4
    grep -oE '"step_s":[0-9.]+,"tokens_per_s":[0-9.]+' $OUT/sambay-d$d-$k.txt
  done
done
for d in $TF_DEPTHS; do
  echo "-- transformer d$d"; grep -oE '"step_s":[0-9.]+,"tokens_per_s":[0-9.]+' $OUT/tf-d$d.txt; grep -i error $OUT/tf-d$d.txt | head -2
done
