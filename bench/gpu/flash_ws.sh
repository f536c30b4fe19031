#!/bin/bash
# Flash attention on one Hopper GPU, one call: the variants are sm90ws-leanv (the default:
# flash_sm90_ws.cu's warp-specialised forward and backward, flash_sm90.cu's prep and dQ
# conversion) and sm80 (flash.cu's mma.sync kernels). Runs on the GPU machine from the
# repository root with the carry dir (CARRY, default gpu-carry-fa3/: stripped release
# `archscale`, kcache/ compiled off the GPU, this script) carried:
#   bash gpu-carry-fa3/flash_ws.sh [selftest] [bench] [ncu] [nsys]   (default: selftest bench)
# selftest: `archscale selftest --only flash` (every variant the device runs).
# bench: `archscale bench bench/transformer_ctx4096.toml --set 'depth=[D]' --micro M --steps 8
#   --warmup 3 --profile` for D:M in $SHAPES (default "16:4 8:8") and ARCHSCALE_FLASH = each of
#   $VARIANTS (default sm90ws-leanv; one whose selftest in this call failed is skipped),
#   $ROUNDS times interleaved.
# ncu: one d128 launch of the forward and backward kernels, the prep and the dQ conversion of
#   the d16 step (--clock-control none).
# nsys: per-kernel device times of 2 steps of the default variant inside the real step (Nsight
#   Systems, if installed), with the SM clock and power sampled by nvidia-smi meanwhile.
# (Retired 2026-11-29 with their variants: flash_sm90.sh, flash_bwd2.sh; bench/NOTES.md,
# "Retired kernel variants".)
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
C=${CARRY:-gpu-carry-fa3}
export ARCHSCALE_KERNEL_CACHE=$PWD/$C/kcache
BIN=$C/archscale
what=${*:-selftest bench}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.draw --format=csv > "$OUT/smi.txt" 2>&1
date -u +%Y-%m-%dT%H:%MZ >> "$OUT/smi.txt"
passed() {  # variant: its selftest lines exist and all end in ok (true when no selftest ran)
  [ -f "$OUT/selftest.txt" ] || return 0
  grep -qF "[$1]" "$OUT/selftest.txt" && ! grep -F "[$1]" "$OUT/selftest.txt" | grep -qv " ok$"
}
for w in $what; do
  case $w in
    selftest) SECONDS=0; ARCHSCALE_NVRTC_LOG=1 timeout ${SELFTEST_T:-150} $BIN selftest --only flash > "$OUT/selftest.txt" 2>&1
              echo "selftest rc=$? (${SECONDS}s)" >> "$OUT/selftest.txt" ;;
    bench) for r in $(seq 1 ${ROUNDS:-1}); do   # rounds interleave the variants against drift
           for shape in ${SHAPES:-16:4 8:8}; do
             dep=${shape%:*}; mic=${shape#*:}
             for v in ${VARIANTS:-sm90ws-leanv}; do
               passed $v || continue
               f="$OUT/bench_d${dep}_${v}_r$r.txt"
               ARCHSCALE_FLASH=$v timeout ${BENCH_T:-60} $BIN bench bench/transformer_ctx4096.toml \
                 --set "depth=[$dep]" --micro $mic --steps ${STEPS:-8} --warmup 3 --profile > "$f" 2>&1
               echo "bench rc=$?" >> "$f"
             done
           done
           done ;;
    ncu) passed sm90ws-leanv || continue
         timeout ${NCU_T:-120} ncu --clock-control none -k regex:'flash_(fwd_ws|bwd_ws_leanv)_d128|flash_bwd_(prep|dq2)_sm90' \
           -s 15 -c 4 --section SpeedOfLight --section WarpStateStats --section SchedulerStats --print-details all \
           $BIN bench bench/transformer_ctx4096.toml --set 'depth=[16]' --micro 4 --steps 1 --warmup 1 \
           > "$OUT/ncu.txt" 2>&1
         echo "ncu rc=$?" >> "$OUT/ncu.txt" ;;
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
          fi
          kill $smi_pid ;;
  esac
done
cat "$OUT/smi.txt"
[ -f "$OUT/selftest.txt" ] && { echo "=== selftest (largest relative error per output and variant)"
  grep "^flash" "$OUT/selftest.txt" | awk '{v=$(NF-2)+0; for(i=1;i<=NF;i++) if($i ~ /^\[sm/) var=$i; key=$3" "var; if(v>m[key]) m[key]=v; n[key]++; if($NF!="ok") bad[key]++} END {for(k in m) printf "  %-22s n=%d max=%.3e bad=%d\n", k, n[k], m[k], bad[k]}' | sort
  grep -v "^flash" "$OUT/selftest.txt" | grep -i "passed\|rc=\|error\|panic\|fail" | head -8; }
echo "=== bench: shape variant round | attn bwd ms, attn fwd ms (profiled step) | step ms, tok/s"
for f in "$OUT"/bench_*.txt; do
  [ -f "$f" ] || continue
  n=$(basename $f .txt); n=${n#bench_}
  bw=$(grep -E "^  attn bwd" $f | awk '{print $3}'); fw=$(grep -E "^  attn fwd" $f | awk '{print $3}')
  st=$(grep -E "^scaling_" $f | awk '{printf "%.1f %s", $5*1000, $6}')
  echo "  $n | $bw $fw | $st $(grep -E 'rc=[^0]|rror' $f | head -1)"
done | sort
[ -f "$OUT/ncu.txt" ] && { echo "=== ncu"; grep -E "flash_|Duration|SM Frequency|Throughput|Issue Slots Busy|Warp Cycles Per Issued|rc=|==ERR" "$OUT/ncu.txt" | head -40; }
[ -f "$OUT/nsys_run.txt" ] && { echo "=== nsys (kernels with flash/memset in the name; ns)"; tail -2 "$OUT/nsys_run.txt"
  for f in "$OUT"/fa3stats*.csv; do [ -f "$f" ] && grep -iE "flash|memset|Name" "$f" | cut -c1-200 | head -14; done; }
[ -f "$OUT/clocks.txt" ] && { echo "=== SM clock MHz / power W while it ran (min, median, max of samples)"
  awk -F', ' '{c=$2+0; p=$3+0; if (c>0) {print c, p}}' "$OUT/clocks.txt" | sort -n | awk '{c[NR]=$1; p[NR]=$2} END {if (NR) printf "  n=%d clock %d / %d / %d MHz\n", NR, c[1], c[int((NR+1)/2)], c[NR]}'
  awk -F', ' '{p=$3+0; if (p>0) print p}' "$OUT/clocks.txt" | sort -n | awk '{p[NR]=$1} END {if (NR) printf "  power %.0f / %.0f / %.0f W\n", p[1], p[int((NR+1)/2)], p[NR]}'; }
true
