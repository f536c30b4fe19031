#!/bin/bash
# Whole-model parity over several batches (seeds) of every model whose gradients have
# ill-conditioned blocks (Mamba x_proj B/C rows at init, differential attention's λ). The
# reference is the CPU on the GPU's bf16 weights; each block's tolerance is max(5e-2, 4 × its
# movement under weight rounding alone) (runtime/src/cuda/selftest.rs, `model_parity`).
# Usage (repo root, after `strip -o gpu-carry/archscale target/release/archscale`):
#   SEEDS="1 2 3" bash bench/gpu/conditioning.sh
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export ARCHSCALE_KERNEL_CACHE=$PWD/gpu-carry/kcache
B=${B:-gpu-carry/archscale}
for m in ${MODELS:-samba sambay sambaymlp sambayda phi4}; do
  for s in ${SEEDS:-1 2 3 4}; do
    f=$OUT/cond-$m-$s.txt
    timeout 200 $B selftest --only none --model bench/${m}_parity.toml --seed $s > $f 2>&1
    printf "%-10s seed %-3s rc=%s  %s  all %s  ill-conditioned %s  worst-ratio %s\n" $m $s $? "$(tail -1 $f)" \
      "$(grep -E '^all gradients' $f | awk '{print $(NF-2)}')" "$(grep -c 'ill-conditioned' $f)" \
      "$(grep -E '^grad ' $f | awk '{r=$(NF-2)/$(NF-1); if (r>m) {m=r; n=$2}} END {printf "%.2f %s", m, n}')"
    grep -E "FAIL|ERROR|error" $f | head -4
  done
done
