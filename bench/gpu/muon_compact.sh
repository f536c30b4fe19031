#!/bin/bash
# AdamW's second moments kept for AdamW tensors only (Muon matrices have none; session 7):
# the full selftest, the runtime's planned bytes against its own allocations (the ignored
# GPU test of runtime/tests/planned_memory.rs, built with `cargo test --release -p
# archscale-runtime --test planned_memory --no-run` and stripped to gpu-carry/planned_memory),
# and Transformer++ d8 (micro 4) with Muon and with AdamW, old binary then new: losses and peaks.
#   OLD=gpu-carry/old-archscale bash bench/gpu/muon_compact.sh     (logs under $OUT)
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export ARCHSCALE_KERNEL_CACHE=$PWD/gpu-carry/kcache
B=${B:-gpu-carry/archscale}
if [ -z "${SKIP_SELFTEST:-}" ]; then
  timeout 300 $B selftest > "$OUT/selftest.txt" 2>&1; echo "selftest rc=$?"
  grep -E "^adamw|passed, " "$OUT/selftest.txt" | cut -c1-160
fi
if [ -x gpu-carry/planned_memory ]; then
  timeout 200 gpu-carry/planned_memory --ignored > "$OUT/planned_memory.txt" 2>&1
  echo "planned_memory --ignored rc=$?"; grep -E "^test |test result" "$OUT/planned_memory.txt"
fi
# the new binary's Muon twice: CUDA runs are not bitwise repeatable (fp32 atomics)
for run in ${OLD:+$OLD:muon $OLD:adamw} $B:muon $B:adamw $B:muon; do
  bin=${run%:*}; opt=${run#*:}
  f="$OUT/bench-$(basename $bin)-$opt-$RANDOM.txt"
  timeout 200 $bin bench bench/transformer_ctx4096.toml --set "depth=[8]" --set train.optimizer=$opt \
    --micro 4 --steps 6 --warmup 2 > "$f" 2>&1
  python3 - "$f" "$(basename $bin)" $opt <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith('{')]
for r in rows:
    print(f"{sys.argv[2]:>14} {sys.argv[3]:>5}: loss {r['loss']!r} tok/s {r['tokens_per_s']:.0f} "
          f"peak {r['peak_gib']:.3f} GiB planned {r['planned_gib']:.3f} GiB")
if not rows: print(sys.argv[2], sys.argv[3], 'no result:', open(sys.argv[1]).read()[-400:])
PY
done
