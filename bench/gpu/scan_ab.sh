#!/bin/bash
# A/B of a scan kernel change: mamba selftest, the isolated scan with the old and the new
# binary in turn (two rounds), whole-model parity of the Mamba families at two seeds, SambaY
# and Transformer++ d8 at micro 8 and 4 (new binary). gpu-carry/ holds both binaries and one
# kernel cache with both trees' cubins.
#   OLD=gpu-carry/old-archscale bash bench/gpu/scan_ab.sh      (logs under $OUT)
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export ARCHSCALE_KERNEL_CACHE=$PWD/gpu-carry/kcache
B=gpu-carry/archscale
timeout 200 $B selftest --only mamba > "$OUT/selftest-mamba.txt" 2>&1; echo "selftest mamba rc=$? $(tail -1 $OUT/selftest-mamba.txt)"
grep FAIL "$OUT/selftest-mamba.txt" | cut -c1-160 | head
for r in 1 2; do
  for b in ${OLD:-} $B; do
    timeout 200 $b selftest --only mamba_scan --bench-scan > "$OUT/bench-$r-$(basename $b).txt" 2>&1
    echo "round $r $(basename $b): $(grep -E '^scan (fwd|bwd) \(d_inner [0-9]+, (split|[48] lanes per channel)\)' "$OUT/bench-$r-$(basename $b).txt" | sed -E 's/: ([0-9.]+) ms.*/ \1/' | tr '\n' ';')"
  done
done
SEEDS="1 2" MODELS="bench/sambay_parity.toml bench/sambayda_parity.toml bench/sambayoco_parity.toml bench/phi4_parity.toml bench/samba_parity.toml" \
  C=gpu-carry bash bench/gpu/model_parity.sh
for m in 8 4; do
  for cfg in "bench/samba_ctx4096.toml --set arch=sambay" "bench/transformer_ctx4096.toml"; do
    timeout 200 $B bench $cfg --set "depth=[8]" --micro $m --steps 6 --warmup 2 2>&1 | grep -E "^scaling" | sed 's/  */ /g'
  done
done
