#!/bin/bash
# Mamba selective scan on one GPU, one call: the mamba selftest (conv + scan, both backward
# configurations: split (v4 bwd, with its T split rule), split-1seg (v4 bwd, one T segment)),
# the isolated scan and conv benchmark at the SambaY-d16 and d8 shapes, SambaY steps at
# $DEPTHS with the configurations in $KERNELS_<depth> or $KERNELS (profiled; split-nosplit
# turns the backward's T split off), and Transformer++ at $TF_DEPTHS for the ratio. NCU=1 adds Nsight Compute (clocks left alone) on one launch each of the forward
# and the default backward at the d16 shape (-s skips the selftest-case launches that come
# first: 21 forward, 14 of the default backward).
# Usage (repo root, after `strip -o $C/archscale target/release/archscale` and the kernel cache
# compiled into $C/kcache):
#   C=gpu-carry-scan2 bash $C/scan.sh    (e.g. DEPTHS="8 16" KERNELS_16=split NCU=1 NCU_KERNELS=bwd;
#   the v3 backward, split3, was retired 2026-11-29: bench/NOTES.md, "Retired kernel variants")
set -u
C=${C:-gpu-carry-scan2}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export ARCHSCALE_KERNEL_CACHE=$PWD/$C/kcache
B=$C/archscale
KERNELS=${KERNELS:-split split-nosplit}
DEPTHS=${DEPTHS:-8 16}
TF_DEPTHS=${TF_DEPTHS:-8 16}
STEPS=${STEPS:-6}
t() { local s=$SECONDS; "$@"; local rc=$?; echo "rc=$rc $((SECONDS - s)) s"; }
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv,noheader
echo -n "selftest mamba: "; t timeout 60 $B selftest --only mamba > $OUT/selftest.txt 2>&1
echo -n "bench-scan: "; t timeout 60 $B selftest --only mamba_scan --bench-scan > $OUT/bench-scan.txt 2>&1
for d in $DEPTHS; do
  kv=KERNELS_$d; for k in ${!kv:-$KERNELS}; do
    echo -n "sambay d$d $k: "
    case $k in *-nosplit) sp=0;; *) sp=;; esac
    ARCHSCALE_SCAN_TSPLIT=$sp t timeout 60 $B bench bench/samba_ctx4096.toml --set arch=sambay --set "depth=[$d]" \
      --micro 4 --steps $STEPS --warmup 2 --profile > $OUT/sambay-d$d-$k.txt 2>&1
  done
done
for d in $TF_DEPTHS; do
  echo -n "transformer d$d: "
  t timeout 60 $B bench bench/transformer_ctx4096.toml --set "depth=[$d]" --micro 4 --steps $STEPS --warmup 2 \
    > $OUT/tf-d$d.txt 2>&1
done
if [ -n "${NCU:-}" ]; then
  for k in ${NCU_KERNELS:-fwd bwd}; do
    timeout 45 ncu --clock-control none -k regex:"^selective_scan_${k}_split\$" -s $([ $k = fwd ] && echo 21 || echo 14) -c 1 \
      --section SpeedOfLight --section WarpStateStats --section ComputeWorkloadAnalysis \
      --section SchedulerStats --section Occupancy --section MemoryWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables --print-details all \
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
  kv=KERNELS_$d; for k in ${!kv:-$KERNELS}; do
    echo "-- sambay d$d $k"; grep -iE "scan|conv|error" $OUT/sambay-d$d-$k.txt | grep -vE "^bench |^\{|rc=" | tail -5
    grep -oE '"step_s":[0-9.]+,"tokens_per_s":[0-9.]+' $OUT/sambay-d$d-$k.txt
  done
done
for d in $TF_DEPTHS; do
  echo "-- transformer d$d"; grep -oE '"step_s":[0-9.]+,"tokens_per_s":[0-9.]+' $OUT/tf-d$d.txt; grep -i error $OUT/tf-d$d.txt | head -2
done
if [ -n "${NCU:-}" ]; then
  echo "== ncu (stall reasons > 0.3 cycles per issue)"
  for k in ${NCU_KERNELS:-fwd bwd}; do
    echo "-- $k"; grep -E "Duration|Executed Ipc Active|Issue Slots Busy|Achieved Active Warps|Registers Per|No Eligible|Warp Cycles Per Issued|Shared Memory|L1/TEX Hit|Mem Pipes|MIO" $OUT/ncu-$k.txt | head -14
    grep -E "issue_stalled_.*per_issue_active" $OUT/ncu-$k.txt | awk '$NF+0 > 0.3 {print $1, $NF}' | sed 's/smsp__average_warps_issue_stalled_//'
  done
fi
