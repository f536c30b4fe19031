#!/bin/bash
# The decoding evals (phonebook, niah, choice) on CUDA against the CPU decoder: trains the
# Shakespeare Transformer++ (bench/parity/shakespeare.toml) and SambaY
# (bench/decode/shakespeare_sambay.toml) on the GPU for 300 steps, runs
# `archscale eval --task phonebook,niah,choice` on each with --backend cuda and --backend cpu,
# and compares the answers prompt by prompt and the choice log-likelihoods (the GPU works from
# bf16 logits, the CPU decoder in fp32, so near-ties may go different ways).
#   C=gpu-carry bash bench/gpu/decode_evals.sh     (gpu-carry: archscale, kcache/, parity/shakespeare)
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
C=${C:-gpu-carry}; export ARCHSCALE_KERNEL_CACHE=$PWD/$C/kcache
B=$C/archscale
EV=(--task phonebook,niah,choice --choices experiments/evals/quickstart_choice.jsonl --min-size 20 --max-size 60 --num-eval 2 --phonebook-batches 4
    --batch-size 2 --lengths 256,1024 --depths 0,0.5,1 --samples 2 --json)
for exp in bench/parity/shakespeare.toml bench/decode/shakespeare_sambay.toml; do
  name=$(basename $exp .toml)
  timeout 300 $B run $exp --backend cuda --set train.out_dir=$OUT/$name --max-steps 300 \
    > "$OUT/$name-train.log" 2>&1
  echo "$name train rc=$? $(grep -E 'step +300' "$OUT/$name-train.log" | tail -1 | cut -c1-100)"
  run=$(ls -d $OUT/$name/*/ | head -1)
  for be in cuda cpu; do
    s=$(date +%s.%N)
    timeout 600 $B eval "$run" --backend $be "${EV[@]}" --out "$OUT/$name-$be.json" > /dev/null \
      2> "$OUT/$name-$be.err"
    rc=$?; e=$(date +%s.%N)
    echo "$name eval $be rc=$rc $(python3 -c "print(f'{$e - $s:.1f} s')")"; tail -2 "$OUT/$name-$be.err"
  done
  python3 - "$OUT/$name-cuda.json" "$OUT/$name-cpu.json" <<'PY'
import json, sys
g, c = (json.load(open(f)) for f in sys.argv[1:3])
def answers(r):
    pb = [s["answer"] for z in r["phonebook"]["sizes"] for s in z["samples"]]
    nh = [a[1] for cell in r["niah"]["cells"] for a in cell["answers"]]
    acc = ([z["accuracy_mean"] for z in r["phonebook"]["sizes"]], [cell["accuracy"] for cell in r["niah"]["cells"]])
    return pb, nh, acc
(gp, gn, ga), (cp, cn, ca) = answers(g), answers(c)
same = lambda a, b: sum(x == y for x, y in zip(a, b))
print(f"  decoders {g['phonebook']['decoder']} / {c['phonebook']['decoder']}: phonebook answers equal "
      f"{same(gp, cp)}/{len(cp)}, niah continuations equal {same(gn, cn)}/{len(cn)}")
print(f"  accuracy cuda {ga} / cpu {ca}")
gl = [l for s in g["choice"]["scores"] for l in s["loglikelihoods"]]
cl = [l for s in c["choice"]["scores"] for l in s["loglikelihoods"]]
rel = max(abs(a - b) / max(1.0, abs(b)) for a, b in zip(gl, cl))
pred = sum(a["pred"] == b["pred"] for a, b in zip(g["choice"]["scores"], c["choice"]["scores"]))
print(f"  choice: {len(cl)} log-likelihoods, largest |cuda - cpu| / max(1, |cpu|) {rel:.2e}; "
      f"same prediction on {pred}/{len(c['choice']['scores'])} items; acc cuda "
      f"{g['choice']['acc']:.3f} / cpu {c['choice']['acc']:.3f} ({g['choice']['decoder']})")
for x, y in list(zip(gn, cn))[:3]:
    print(f"    niah cuda {x!r:.60} | cpu {y!r:.60}")
PY
done
