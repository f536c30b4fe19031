#!/bin/bash
# Nsight Compute of the scan kernels inside a SambaY step (clocks left alone), with the
# per-SASS-instruction stall samples: DEPTH=8 KERNELS="fwd bwd" C=gpu-carry bash bench/gpu/scan_ncu.sh
# Writes ncu-<k>.txt (sections) and sass-<k>.csv (source page) under $OUT.
set -u
C=${C:-gpu-carry}; OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export ARCHSCALE_KERNEL_CACHE=$PWD/$C/kcache
for k in ${KERNELS:-fwd bwd}; do
  timeout 120 ncu --clock-control none --set full --import-source no -k regex:"^selective_scan_${k}_split8?\$" -s 0 -c 1 \
    -o /tmp/scan-$k -f $C/archscale bench bench/samba_ctx4096.toml --set arch=sambay --set "depth=[${DEPTH:-8}]" \
    --micro 4 --steps 1 --warmup 0 > "$OUT/ncu-run-$k.txt" 2>&1; echo "ncu $k rc=$?"
  ncu -i /tmp/scan-$k.ncu-rep --print-details all > "$OUT/ncu-$k.txt" 2>&1
  ncu -i /tmp/scan-$k.ncu-rep --page source --csv --print-source sass > "$OUT/sass-$k.csv" 2>&1
  grep -E "Duration|Issue Slots Busy|No Eligible|Achieved Occupancy|Registers Per|Warp Cycles Per Issued" "$OUT/ncu-$k.txt" | head -8
done
