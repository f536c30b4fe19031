"""Compare the logged losses of two `archscale run` metrics.jsonl files (e.g. the CPU and
CUDA sides of bench/parity/*.toml): per logged step |diff|, validation, the maximum.
    python3 bench/parity/compare.py CPU_METRICS CUDA_METRICS [--target 0.03] [--labels cpu,cuda]"""
import argparse, json

p = argparse.ArgumentParser()
p.add_argument("a"); p.add_argument("b"); p.add_argument("--target", type=float, default=0.03)
p.add_argument("--labels", default="cpu,cuda")
a = p.parse_args()

def load(f):
    tr, va = {}, {}
    for l in open(f):
        r = json.loads(l)
        if "loss" in r: tr[r["step"]] = r["loss"]
        if "val_loss@1x" in r: va[r["step"]] = r["val_loss@1x"]
    return tr, va

(at, av), (bt, bv) = load(a.a), load(a.b)
la, lb = a.labels.split(",")
rows = [(s, at[s], bt[s], abs(at[s] - bt[s])) for s in sorted(at) if s in bt]
for s, x, y, d in rows:
    print(f"step {s:4d}  {la} {x:.4f}  {lb} {y:.4f}  |diff| {d:.4f}")
for s in sorted(av):
    if s in bv:
        print(f"val step {s:4d}  {la} {av[s]:.4f}  {lb} {bv[s]:.4f}  |diff| {abs(av[s] - bv[s]):.4f}")
over = [s for s, _, _, d in rows if d > a.target]
print(f"logged steps {len(rows)}  max |diff| {max(r[3] for r in rows):.4f}  "
      f"steps over {a.target}: {len(over)} {over}")
