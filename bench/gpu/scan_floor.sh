#!/bin/bash
# The scan forward's arithmetic floor probe (mamba.cu scan_floor_fwd_p*) beside the real
# kernels: the scan selftest with its bench, then Nsight Compute's issue and MUFU (XU pipe)
# utilisation of the probes' launches at the d16 shape (the first 60; clocks left alone).
#   C=gpu-carry bash bench/gpu/scan_floor.sh     (logs under $OUT)
set -u
C=${C:-gpu-carry}; OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export ARCHSCALE_KERNEL_CACHE=$PWD/$C/kcache
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader | tee "$OUT/gpu.txt"
$C/archscale selftest --only mamba_scan --bench-scan > "$OUT/selftest.txt" 2>&1; echo "selftest rc=$?"
M=gpu__time_duration.sum,sm__cycles_elapsed.avg.per_second,smsp__issue_active.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active,sm__pipe_fma_cycles_active.avg.pct_of_peak_sustained_active,smsp__inst_executed.sum,sm__warps_active.avg.pct_of_peak_sustained_active
timeout 240 ncu --clock-control none --metrics $M -k regex:'^scan_floor_fwd_p[0-9]$' -c 60 \
  $C/archscale selftest --only mamba_scan --bench-scan > "$OUT/ncu.txt" 2>&1; echo "ncu rc=$?"
grep -E "scan fwd|scan bwd|passed|failed" "$OUT/selftest.txt" | cut -c1-220
python3 - "$OUT/ncu.txt" <<'PY'
import re, sys, collections
rows = collections.defaultdict(lambda: collections.defaultdict(list))
k = None
for line in open(sys.argv[1]):
    m = re.match(r'\s+(scan_floor_fwd_p\d+)', line)
    if m: k = m.group(1); continue
    m = re.match(r'\s+(\S+)\s+(\S+)\s+([\d.,]+)\s*$', line)
    if k and m: rows[k][m.group(1).split('__')[1] + '[' + m.group(2) + ']'].append(float(m.group(3).replace(',', '')))
for k, ms in rows.items():
    print(k, len(next(iter(ms.values()))), 'launches;', '; '.join(f'{n}={sum(v)/len(v):.4g}' for n, v in ms.items()))
PY
