#!/bin/bash
# Which GEMM kernels each side runs in a d16 step, and their time alone under ncu (boost
# clock, no power cap in effect for one kernel): ours (cuBLASLt heuristic's first choice) and
# PyTorch + torch.compile (cuBLAS through aten::mm), same call. C=carry dir with archscale,
# kcache/, torch_ref.py. Summary: python3 bench/gpu/gemm_names.py OUT.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/gemm"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
C=${C:-gpu-carry}
export ARCHSCALE_KERNEL_CACHE=$PWD/$C/kcache
D=${DEPTH:-16}; M=${MICRO:-4}
K="regex:^(nvjet|sm90_xmma|cutlass|.*[Gg]emm)"
timeout 240 ncu --clock-control none --kernel-name "$K" --launch-count 400 --metrics gpu__time_duration.sum --csv \
  $C/archscale bench bench/transformer_ctx4096.toml --set "depth=[$D]" --micro $M --steps 1 --warmup 0 \
  > "$OUT/gemm/ours.csv" 2> "$OUT/gemm/ours.err"
timeout 300 ncu --clock-control none --profile-from-start off --kernel-name "$K" --metrics gpu__time_duration.sum --csv \
  python3 bench/gpu/torch_profile.py $C/torch_ref.py --depth $D --micro $M --ncu-step \
  > "$OUT/gemm/torch.csv" 2> "$OUT/gemm/torch.err"
python3 bench/gpu/gemm_names.py "$OUT/gemm" | tee "$OUT/gemm/summary.txt"
tar czf /tmp/01_gemm.tgz -C "$OUT" gemm && rm -rf "$OUT/gemm" && mv /tmp/01_gemm.tgz "$OUT/"
