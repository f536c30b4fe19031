#!/bin/bash
# Flash backward round 2: the pair-barrier-free backward (sm90ws-np, sm90ws-nppp with ping-pong)
# against the current default (sm90ws-bwd), one call. Runs on the GPU machine from the
# repository root with the carry dir (default gpu-carry-fa3b/: stripped release `archscale`,
# kcache/ compiled off the GPU, this script) carried:
#   bash gpu-carry-fa3b/flash_bwd2.sh [selftest] [bench] [ncu]   (default: selftest bench)
# selftest: `archscale selftest --only flash` (every variant the device runs);
#   selftestdq2: the same with ARCHSCALE_FLASH_DQ=smem (the coalesced dQ conversion).
# bench: `archscale bench bench/transformer_ctx4096.toml --set 'depth=[D]' --micro M --steps 8
#   --warmup 3 --profile` for D:M in $SHAPES (default "16:4 8:8") and ARCHSCALE_FLASH = each of
#   $VARIANTS (default sm90ws-bwd sm90ws-np sm90ws-nppp; one whose selftest failed is skipped;
#   NAME_prepold runs NAME with ARCHSCALE_FLASH_PREP=old, NAME_dq2 with ARCHSCALE_FLASH_DQ=smem),
#   $ROUNDS times interleaved.
# ncu: the bwd kernel, delta/prep and dQ conversion of one d16 layer for each of $NCU_VARIANTS
#   (--clock-control none).
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
C=${CARRY:-gpu-carry-fa3b}
export ARCHSCALE_KERNEL_CACHE=$PWD/$C/kcache
BIN=$C/archscale
what=${*:-selftest bench}
VARIANTS=${VARIANTS:-sm90ws-bwd sm90ws-np sm90ws-nppp}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.draw --format=csv > "$OUT/smi.txt" 2>&1
date -u +%Y-%m-%dT%H:%MZ >> "$OUT/smi.txt"
passed() {  # variant: its selftest lines exist and all end in ok (true when no selftest ran)
  [ -f "$OUT/selftest.txt" ] || return 0
  grep -qF "[$1]" "$OUT/selftest.txt" && ! grep -F "[$1]" "$OUT/selftest.txt" | grep -qv " ok$"
}
for w in $what; do
  case $w in
    selftest) SECONDS=0; timeout ${SELFTEST_T:-150} $BIN selftest --only flash > "$OUT/selftest.txt" 2>&1
              echo "selftest rc=$? (${SECONDS}s)" >> "$OUT/selftest.txt" ;;
    selftestdq2) ARCHSCALE_FLASH_DQ=smem timeout ${SELFTEST_T:-150} $BIN selftest --only flash > "$OUT/selftest_dq2.txt" 2>&1
              echo "selftest rc=$?" >> "$OUT/selftest_dq2.txt" ;;
    bench) for r in $(seq 1 ${ROUNDS:-1}); do   # rounds interleave the variants against drift
           for shape in ${SHAPES:-16:4 8:8}; do
             dep=${shape%:*}; mic=${shape#*:}
             for v in $VARIANTS; do
               vv=${v%%_*}  # NAME[_prepold][_dq2]: ARCHSCALE_FLASH_PREP=old, ARCHSCALE_FLASH_DQ=smem
               passed $vv || continue
               prep=fused; case $v in *_prepold*) prep=old ;; esac
               dqk=frag; case $v in *_dq2*) dqk=smem ;; esac
               f="$OUT/bench_d${dep}_${v}_r$r.txt"
               ARCHSCALE_FLASH=$vv ARCHSCALE_FLASH_PREP=$prep ARCHSCALE_FLASH_DQ=$dqk timeout ${BENCH_T:-60} $BIN bench bench/transformer_ctx4096.toml \
                 --set "depth=[$dep]" --micro $mic --steps ${STEPS:-8} --warmup 3 --profile > "$f" 2>&1
               echo "bench rc=$?" >> "$f"
             done
           done
           done ;;
    ncu) for v in ${NCU_VARIANTS:-sm90ws-bwd sm90ws-np}; do
           passed $v || continue
           ARCHSCALE_FLASH=$v timeout ${NCU_T:-90} ncu --clock-control none -k regex:'flash_bwd_(ws|prep|delta|dq_sm90)' \
             -s 9 -c 3 --section SpeedOfLight --section WarpStateStats \
             $BIN bench bench/transformer_ctx4096.toml --set 'depth=[16]' --micro 4 --steps 1 --warmup 1 \
             > "$OUT/ncu_$v.txt" 2>&1
           echo "ncu rc=$?" >> "$OUT/ncu_$v.txt"
         done ;;
  esac
done
cat "$OUT/smi.txt"
for st in selftest selftest_dq2; do
[ -f "$OUT/$st.txt" ] && { echo "=== $st (largest relative error per output and variant)"
  grep "^flash" "$OUT/$st.txt" | awk '{v=$(NF-2)+0; for(i=1;i<=NF;i++) if($i ~ /^\[sm/) var=$i; key=$3" "var; if(v>m[key]) m[key]=v; n[key]++; if($NF!="ok") bad[key]++} END {for(k in m) printf "  %-22s n=%d max=%.3e bad=%d\n", k, n[k], m[k], bad[k]}' | sort
  grep -v "^flash" "$OUT/$st.txt" | grep -i "passed\|rc=\|error\|panic\|fail" | head -8; }
done
echo "=== bench: shape variant round | attn bwd ms, attn fwd ms (profiled step) | step ms, tok/s (8 steps)"
for f in "$OUT"/bench_*.txt; do
  [ -f "$f" ] || continue
  n=$(basename $f .txt); n=${n#bench_}
  bw=$(grep -E "^  attn bwd" $f | awk '{print $3}'); fw=$(grep -E "^  attn fwd" $f | awk '{print $3}')
  st=$(grep -E "^scaling_" $f | awk '{printf "%.1f %s", $5*1000, $6}')
  echo "  $n | $bw $fw | $st $(grep -E 'rc=[^0]|rror' $f | head -1)"
done | sort
echo "=== medians over rounds: shape variant attn_bwd step_ms tok/s"
for f in "$OUT"/bench_*.txt; do
  [ -f "$f" ] || continue
  n=$(basename $f .txt); n=${n#bench_}; n=${n%_r*}
  echo "$n $(grep -E '^  attn bwd' $f | awk '{print $3}') $(grep -E '^scaling_' $f | awk '{printf "%.2f %s", $5*1000, $6}')"
done | sort | awk '{k=$1; b[k]=b[k]" "$2; s[k]=s[k]" "$3; t[k]=t[k]" "$4} END {for (k in b) print k, "bwd:" b[k], "step:" s[k], "tok/s:" t[k]}' | sort
for f in "$OUT"/ncu_*.txt; do
  [ -f "$f" ] || continue
  echo "=== $(basename $f .txt)"
  grep -E "flash_bwd|Duration|SM Frequency|Memory Throughput|Compute \(SM\)|Warp Cycles Per Issued|rc=|==ERR" "$f" | head -24
done
true
