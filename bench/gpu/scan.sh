#!/bin/bash
# Mamba selective scan on one GPU, one call: the mamba selftest (conv + scan, every kernel set:
# split, split2, legacy), the isolated scan benchmark at the SambaY-d16 shape, and SambaY d8 and
# d16 steps with the scan kernel sets in $KERNELS (default "split split2"), profiled; NCU=1 adds
# Nsight Compute (clocks left alone) on one bench-shape launch each of the default forward and
# backward (-s 7 skips the 7 selftest-case launches that come first).
# Usage (repo root, after `strip -o $C/archscale target/release/archscale`):
#   C=gpu-carry-scan bash bench/gpu/scan.sh
set -u
C=${C:-gpu-carry-scan}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export ARCHSCALE_KERNEL_CACHE=$PWD/$C/kcache
B=$C/archscale
KERNELS=${KERNELS:-split split2}
DEPTHS=${DEPTHS:-8 16}
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv,noheader
timeout 240 $B selftest --only mamba > $OUT/selftest.txt 2>&1; echo "selftest rc=$?"
timeout 120 $B selftest --only mamba_scan --bench-scan > $OUT/bench-scan.txt 2>&1; echo "bench-scan rc=$?"
for d in $DEPTHS; do
  for k in $KERNELS; do
    ARCHSCALE_SCAN_KERNEL=$k timeout 150 $B bench bench/samba_ctx4096.toml --set arch=sambay --set "depth=[$d]" \
      --micro 4 --steps 4 --warmup 2 --profile > $OUT/sambay-d$d-$k.txt 2>&1; echo "sambay d$d $k rc=$?"
  done
done
if [ -n "${NCU:-}" ]; then
  for k in fwd bwd; do
    timeout 150 ncu --clock-control none -k regex:"^selective_scan_${k}_split\$" -s 7 -c 1 \
      --section SpeedOfLight --section WarpStateStats --section ComputeWorkloadAnalysis \
      --section SchedulerStats --section Occupancy --print-details all \
      --metrics regex:'smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio' \
      $B selftest --only mamba_scan --bench-scan > $OUT/ncu-$k.txt 2>&1; echo "ncu $k rc=$?"
  done
fi
echo "== selftest: worst rel err per check and kernel set"
grep -E "^mamba " $OUT/selftest.txt | awk '{
  n=split($0,a,/  +/); chk=a[1]; shp=a[2]; split(shp,s," "); k=s[1];
  if (chk ~ /conv1d/) k="-";
  key=chk" ["k"]"; e=a[3]+0; if (!(key in m) || e>m[key]) m[key]=e; if ($0 ~ /FAIL/) f[key]++ }
  END { for (x in m) printf "%-55s %.3e %s\n", x, m[x], (x in f ? "FAIL" : "") }' | sort
grep -E "passed|ERROR" $OUT/selftest.txt | tail -3
echo "== scan bench (SambaY-d16 shape)"
grep -E "^scan|^conv|ERROR|finite" $OUT/bench-scan.txt
echo "== SambaY steps"
for d in $DEPTHS; do
  for k in $KERNELS; do
    echo "-- d$d $k"; grep -iE "tok/s|scan|error" $OUT/sambay-d$d-$k.txt | grep -vE "^bench |^\{" | tail -6
    grep -oE '"step_s":[0-9.]+,"tokens_per_s":[0-9.]+' $OUT/sambay-d$d-$k.txt
  done
done
if [ -n "${NCU:-}" ]; then
  echo "== ncu (stall reasons > 0.3 cycles per issue)"
  for k in fwd bwd; do
    echo "-- $k"; grep -E "Duration|Executed Ipc Active|Issue Slots Busy|Achieved Active Warps|Registers Per|No Eligible|Warp Cycles Per Issued" $OUT/ncu-$k.txt | head -8
    grep -E "issue_stalled_.*per_issue_active" $OUT/ncu-$k.txt | awk '$NF+0 > 0.3 {print $1, $NF}' | sed 's/smsp__average_warps_issue_stalled_//'
  done
fi
