#!/bin/bash
# Warp-specialised flash forward (flash_sm90_ws.cu) against the wgmma forward, one call.
# Runs on the GPU machine from the repository root with the carry dir (default
# gpu-carry-fa3/: stripped release `archscale`, kcache/ compiled off the GPU) carried:
#   bash gpu-carry-fa3/flash_ws.sh [selftest] [selftestnopp] [bench] [benchnopp] [ncu]  (default: selftest bench)
# selftest: `archscale selftest --only flash` (variants sm80, sm90, sm90ws, sm90ws-bwd);
#   selftestnopp: the same with ARCHSCALE_FLASH_WS=nopp (sm90ws without ping-pong).
# bench: the d16 ctx-4096 step, --profile, with ARCHSCALE_FLASH=each of $VARIANTS (default
#   sm90 sm90ws sm90ws-bwd; a variant whose selftest in this call did not pass is skipped);
#   benchnopp: sm90ws with ARCHSCALE_FLASH_WS=nopp.
# ncu: one d128 launch of the forward and backward kernels of sm90 and sm90ws-bwd.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
C=${CARRY:-gpu-carry-fa3}
export ARCHSCALE_KERNEL_CACHE=$PWD/$C/kcache
BIN=$C/archscale
what=${*:-selftest bench}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv > "$OUT/smi.txt" 2>&1
date -u +%Y-%m-%dT%H:%MZ >> "$OUT/smi.txt"
passed() {  # variant: its selftest lines exist and all end in ok (true when no selftest ran)
  [ -f "$OUT/selftest.txt" ] || return 0
  grep -qF "[$1]" "$OUT/selftest.txt" && ! grep -F "[$1]" "$OUT/selftest.txt" | grep -qv " ok$"
}
step() {  # name, env..., then the bench
  local name=$1; shift
  env "$@" timeout ${BENCH_T:-150} $BIN bench bench/transformer_ctx4096.toml --set 'depth=[16]' \
    --micro 4 --steps ${STEPS:-6} --warmup 2 --profile > "$OUT/bench_$name.txt" 2>&1
  echo "bench rc=$?" >> "$OUT/bench_$name.txt"
}
for w in $what; do
  case $w in
    selftest) SECONDS=0; ARCHSCALE_NVRTC_LOG=1 timeout ${SELFTEST_T:-180} $BIN selftest --only flash > "$OUT/selftest.txt" 2>&1
              echo "selftest rc=$? (${SECONDS}s)" >> "$OUT/selftest.txt" ;;
    selftestnopp) passed sm90ws || continue
              ARCHSCALE_FLASH_WS=nopp timeout ${SELFTEST_T:-180} $BIN selftest --only flash > "$OUT/selftest_nopp.txt" 2>&1
              echo "selftest rc=$?" >> "$OUT/selftest_nopp.txt" ;;
    bench) for v in ${VARIANTS:-sm90 sm90ws sm90ws-bwd}; do
             passed $v && step $v ARCHSCALE_FLASH=$v
           done ;;
    benchws) passed sm90ws && step sm90ws ARCHSCALE_FLASH=sm90ws ;;
    benchnopp) passed sm90ws && step nopp ARCHSCALE_FLASH=sm90ws ARCHSCALE_FLASH_WS=nopp ;;
    bench90) step sm90 ARCHSCALE_FLASH=sm90 ;;
    ncu)
         for v in ${NCU_VARIANTS:-sm90ws-bwd}; do
           passed $v || continue
           ARCHSCALE_FLASH=$v timeout ${NCU_T:-120} ncu --clock-control none -k regex:'flash_(fwd|bwd)_(sm90|ws)_d128' -s 15 -c 2 \
             --section SpeedOfLight --section WarpStateStats --section SchedulerStats --print-details all \
             $BIN bench bench/transformer_ctx4096.toml --set 'depth=[16]' --micro 4 --steps 1 --warmup 1 \
             > "$OUT/ncu_$v.txt" 2>&1
           echo "ncu rc=$?" >> "$OUT/ncu_$v.txt"
         done ;;
  esac
done
cat "$OUT/smi.txt"
for f in selftest selftest_nopp; do
  [ -f "$OUT/$f.txt" ] && { echo "=== $f (largest relative error per output and variant)"
    grep "^flash" "$OUT/$f.txt" | awk '{v=$(NF-2)+0; for(i=1;i<=NF;i++) if($i ~ /^\[sm/) var=$i; key=$3" "var; if(v>m[key]) m[key]=v; n[key]++; if($NF!="ok") bad[key]++} END {for(k in m) printf "  %-20s n=%d max=%.3e bad=%d\n", k, n[k], m[k], bad[k]}' | sort
    grep -v "^flash" "$OUT/$f.txt" | grep -i "passed\|rc=\|error\|panic\|fail" | head -8; }
done
for v in sm90 sm90ws sm90ws-bwd nopp; do
  [ -f "$OUT/bench_$v.txt" ] && { echo "=== bench $v"; grep -E "attn|step|tokens|transformer|error|rc=" "$OUT/bench_$v.txt" | grep -v "^{" | head -12; }
done
for v in sm90 sm90ws sm90ws-bwd; do
  [ -f "$OUT/ncu_$v.txt" ] && { echo "=== ncu $v"; grep -E "flash_|Duration|Throughput|Issue Slots Busy|Warp Cycles Per Issued|rc=|==ERR" "$OUT/ncu_$v.txt" | head -16; }
done
true
