#!/bin/bash
# Runs on the GPU machine (device tool) from the repository root with gpu-carry-flash/
# carried: archscale (stripped release build), kcache/, and torch_ref.py for `torch`.
#   bash bench/gpu/flash_sm90.sh [selftest] [selftestp] [bench] [bench90] [bench80] [benchp] [nodq] [ncu] [torch]
#   (default: selftest bench)
# selftestp / benchp: with ARCHSCALE_FLASH_FWD=overlap (forward whose softmax overlaps P V).
# bench: the d16 step with sm90 and sm80; bench90 / bench80: one of them.
# nodq: the sm90 step again with the backward's dQ reduction compiled out (wrong dQ, timing only).
# ncu: Nsight Compute (clocks left alone) on one d128 forward and one backward launch of the
#   d16 step: speed of light, warp stall reasons, pipes.
# Flash attention on sm_90: selftest of both variants (sm90 = wgmma, sm80 = mma.sync), then
# the d16 ctx-4096 step profiled with each (ARCHSCALE_FLASH), then optionally PyTorch.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
C=gpu-carry-flash
export ARCHSCALE_KERNEL_CACHE=$PWD/$C/kcache
BIN=$C/archscale
what=${*:-selftest bench}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv > "$OUT/smi.txt" 2>&1
date -u +%Y-%m-%dT%H:%MZ >> "$OUT/smi.txt"
for w in $what; do
  case $w in
    selftest) ARCHSCALE_NVRTC_LOG=1 timeout 240 $BIN selftest --only flash > "$OUT/selftest.txt" 2>&1
              echo "selftest rc=$?" >> "$OUT/selftest.txt" ;;
    selftestp) ARCHSCALE_FLASH_FWD=overlap timeout 240 $BIN selftest --only flash > "$OUT/selftest_overlap.txt" 2>&1
              echo "selftest rc=$?" >> "$OUT/selftest_overlap.txt" ;;
    benchp) ARCHSCALE_FLASH_FWD=overlap ARCHSCALE_FLASH=sm90 timeout 200 $BIN bench bench/transformer_ctx4096.toml \
              --set 'depth=[16]' --micro 4 --steps ${STEPS:-6} --warmup 2 --profile > "$OUT/bench_overlap.txt" 2>&1
            echo "bench rc=$?" >> "$OUT/bench_overlap.txt" ;;
    bench) for v in sm90 sm80; do
             ARCHSCALE_FLASH=$v timeout 200 $BIN bench bench/transformer_ctx4096.toml --set 'depth=[16]' \
               --micro 4 --steps ${STEPS:-6} --warmup 2 --profile > "$OUT/bench_$v.txt" 2>&1
             echo "bench rc=$?" >> "$OUT/bench_$v.txt"
           done ;;
    bench80) ARCHSCALE_FLASH=sm80 timeout 200 $BIN bench bench/transformer_ctx4096.toml --set 'depth=[16]' \
               --micro 4 --steps ${STEPS:-6} --warmup 2 --profile > "$OUT/bench_sm80.txt" 2>&1
             echo "bench rc=$?" >> "$OUT/bench_sm80.txt" ;;
    bench90) ARCHSCALE_FLASH=sm90 timeout 200 $BIN bench bench/transformer_ctx4096.toml --set 'depth=[16]' \
               --micro 4 --steps ${STEPS:-6} --warmup 2 --profile > "$OUT/bench_sm90.txt" 2>&1
             echo "bench rc=$?" >> "$OUT/bench_sm90.txt" ;;
    ncu) ARCHSCALE_FLASH=sm90 timeout 200 ncu --clock-control none -k regex:'flash_(fwd|bwd)_sm90_d128' -s 15 -c 2 \
           --section SpeedOfLight --section WarpStateStats --section ComputeWorkloadAnalysis \
           --section MemoryWorkloadAnalysis --section SchedulerStats --print-details all \
           --metrics regex:'smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio' \
           $BIN bench bench/transformer_ctx4096.toml --set 'depth=[16]' --micro 4 --steps 1 --warmup 1 \
           > "$OUT/ncu.txt" 2>&1
         echo "ncu rc=$?" >> "$OUT/ncu.txt" ;;
    nodq) ARCHSCALE_KERNEL_DEFINES=F9_NO_DQ_ATOMICS ARCHSCALE_FLASH=sm90 timeout 200 $BIN bench bench/transformer_ctx4096.toml \
            --set 'depth=[16]' --micro 4 --steps ${STEPS:-6} --warmup 2 --profile > "$OUT/bench_nodq.txt" 2>&1 ;;
    torch) PYTHONUNBUFFERED=1 timeout ${TORCH_T:-300} python3 $C/torch_ref.py --micro 4 --depths 16 --steps 10 > "$OUT/torch.txt" 2>&1
           echo "torch rc=$?" >> "$OUT/torch.txt" ;;
  esac
done
cat "$OUT/smi.txt"
for f in selftest selftest_overlap; do
  [ -f "$OUT/$f.txt" ] && { echo "=== $f (largest relative error per output and variant)"
    grep "^flash" "$OUT/$f.txt" | awk '{k=$3" "$NF; v=$(NF-2)+0; for(i=1;i<=NF;i++) if($i ~ /^\[sm/) var=$i; key=$3" "var; if(v>m[key]) m[key]=v; n[key]++; if($NF!="ok") bad[key]++} END {for(k in m) printf "  %-16s n=%d max=%.3e bad=%d\n", k, n[k], m[k], bad[k]}' | sort
    grep "passed\|rc=" "$OUT/$f.txt"; }
done
for v in sm90 overlap sm80 nodq; do
  [ -f "$OUT/bench_$v.txt" ] && { echo "=== bench $v"; grep -v "^{" "$OUT/bench_$v.txt" | head -45; }
done
[ -f "$OUT/ncu.txt" ] && { echo "=== ncu"; grep -E "flash_|Duration|Throughput|stalled_(barrier|long_scoreboard|short_scoreboard|wait|math|mio|lg_thr|membar|dispatch|no_inst|sleep|branch|not_sel|selected|misc|drain|imc|tex)[a-z_]*_per|Issue Slots Busy|Executed Ipc A|Warp Cycles Per Issued|ncu rc|==ERR|==WARN" "$OUT/ncu.txt" | head -90; }
[ -f "$OUT/torch.txt" ] && { echo "=== torch"; tail -n 8 "$OUT/torch.txt"; }
true
