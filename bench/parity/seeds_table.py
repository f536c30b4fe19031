"""Table of bench/parity/seeds.sh's runs: per seed, each run's largest |diff| from the PyTorch
fp32 curve over the logged steps and its mean offset over steps 160-300 (signed)."""
import glob, json, os, re, sys

d = sys.argv[1]
tag = sys.argv[2] if len(sys.argv) > 2 else ""  # file-name infix before _s<seed> (plan_search.sh: _lr<LR>)
def curve(f):
    return {r["step"]: r["loss"] for r in map(json.loads, open(f)) if "loss" in r}
seeds = sorted({re.search(r"_s(\d+)", f).group(1) for f in glob.glob(os.path.join(d, f"torch_fp32{tag}_s*.jsonl"))}, key=int)
print("seed  run          max|diff| vs fp32  over 0.03  mean offset 160-300")
for s in seeds:
    ref = curve(os.path.join(d, f"torch_fp32{tag}_s{s}.jsonl"))
    for name, f in [("fp32 nudged", f"torch_fp32_perturbed{tag}_s{s}.jsonl"), ("torch bf16", f"torch_bf16{tag}_s{s}.jsonl"),
                    ("cuda a", f"cuda{tag}_s{s}_a.jsonl"), ("cuda b", f"cuda{tag}_s{s}_b.jsonl")]:
        p = os.path.join(d, f)
        if not os.path.exists(p):
            continue
        c = curve(p)
        steps = [k for k in sorted(ref) if k in c and k >= 10]
        diffs = [c[k] - ref[k] for k in steps]
        late = [c[k] - ref[k] for k in steps if k >= 160]
        print(f"{s:>5} {name:<12} {max(map(abs, diffs)):>12.4f} {sum(abs(x) > 0.03 for x in diffs):>10d} {sum(late) / len(late):>+14.4f}")
