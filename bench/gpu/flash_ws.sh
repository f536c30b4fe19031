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
# selftestdqw: the selftest with ARCHSCALE_FLASH_WS_BWD=dqw (sm90ws-bwd with a dQ writer warp);
#   benchdqw: the step with ARCHSCALE_FLASH=sm90ws-bwd ARCHSCALE_FLASH_WS_BWD=dqw.
# ncu: one d128 launch of the forward and backward kernels of $NCU_VARIANTS (default sm90ws-bwd).
# nsys: per-kernel device times of 3 steps of the default variant inside the real step (Nsight
#   Systems, if installed), with the SM clock and power sampled by nvidia-smi meanwhile.
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
    selftestdqw) ARCHSCALE_FLASH_WS_BWD=dqw timeout ${SELFTEST_T:-180} $BIN selftest --only flash > "$OUT/selftest_dqw.txt" 2>&1
              echo "selftest rc=$?" >> "$OUT/selftest_dqw.txt" ;;
    benchdqw) [ -f "$OUT/selftest_dqw.txt" ] && grep -qF "[sm90ws-bwd]" "$OUT/selftest_dqw.txt" && \
                ! grep -F "[sm90ws-bwd]" "$OUT/selftest_dqw.txt" | grep -qv " ok$" && \
                step dqw ARCHSCALE_FLASH=sm90ws-bwd ARCHSCALE_FLASH_WS_BWD=dqw ;;
    nsys) NSYS=$(command -v nsys || ls /usr/local/cuda/bin/nsys /opt/nvidia/nsight-systems/*/bin/nsys 2>/dev/null | head -1)
          nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw --format=csv,noheader -lms 100 > "$OUT/clocks.txt" 2>&1 &
          smi_pid=$!
          if [ -n "$NSYS" ]; then
            timeout ${NSYS_T:-120} $NSYS profile -t cuda -f true -o /tmp/fa3prof $BIN bench bench/transformer_ctx4096.toml \
              --set 'depth=[16]' --micro 4 --steps 2 --warmup 1 --profile > "$OUT/nsys_run.txt" 2>&1
            echo "nsys rc=$?" >> "$OUT/nsys_run.txt"
            $NSYS stats -r cuda_gpu_kern_sum,cuda_gpu_mem_time_sum -f csv -o /tmp/fa3stats /tmp/fa3prof.nsys-rep > "$OUT/nsys_stats_log.txt" 2>&1
            cp /tmp/fa3stats*.csv "$OUT/" 2>/dev/null
          else
            echo "no nsys" > "$OUT/nsys_run.txt"
            step clocks
          fi
          kill $smi_pid ;;
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
for f in selftest selftest_nopp selftest_dqw; do
  [ -f "$OUT/$f.txt" ] && { echo "=== $f (largest relative error per output and variant)"
    grep "^flash" "$OUT/$f.txt" | awk '{v=$(NF-2)+0; for(i=1;i<=NF;i++) if($i ~ /^\[sm/) var=$i; key=$3" "var; if(v>m[key]) m[key]=v; n[key]++; if($NF!="ok") bad[key]++} END {for(k in m) printf "  %-20s n=%d max=%.3e bad=%d\n", k, n[k], m[k], bad[k]}' | sort
    grep -v "^flash" "$OUT/$f.txt" | grep -i "passed\|rc=\|error\|panic\|fail" | head -8; }
done
for v in sm90 sm90ws sm90ws-bwd dqw nopp; do
  [ -f "$OUT/bench_$v.txt" ] && { echo "=== bench $v"; grep -E "attn|step|tokens|transformer|error|rc=" "$OUT/bench_$v.txt" | grep -v "^{" | head -12; }
done
for v in sm90 sm90ws sm90ws-bwd; do
  [ -f "$OUT/ncu_$v.txt" ] && { echo "=== ncu $v"; grep -E "flash_|Duration|Throughput|Issue Slots Busy|Warp Cycles Per Issued|rc=|==ERR" "$OUT/ncu_$v.txt" | head -16; }
done
[ -f "$OUT/nsys_run.txt" ] && { echo "=== nsys (kernels with flash/memset in the name; ns)"; tail -2 "$OUT/nsys_run.txt"
  for f in "$OUT"/fa3stats*.csv; do [ -f "$f" ] && grep -iE "flash|memset|Name" "$f" | cut -c1-200 | head -14; done; }
[ -f "$OUT/clocks.txt" ] && { echo "=== SM clock MHz / power W while it ran (min, median, max of samples)"
  awk -F', ' '{c=$2+0; p=$3+0; if (c>0) {print c, p}}' "$OUT/clocks.txt" | sort -n | awk '{c[NR]=$1; p[NR]=$2} END {if (NR) printf "  n=%d clock %d / %d / %d MHz\n", NR, c[1], c[int((NR+1)/2)], c[NR]}'
  awk -F', ' '{p=$3+0; if (p>0) print p}' "$OUT/clocks.txt" | sort -n | awk '{p[NR]=$1} END {if (NR) printf "  power %.0f / %.0f / %.0f W\n", p[1], p[int((NR+1)/2)], p[NR]}'; }
true
