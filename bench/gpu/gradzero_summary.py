"""Summary of bench/gpu/gradzero.sh's logs: selftest results, loss / grad-norm differences of the 30-step
runs, tok/s of the interleaved benches."""
import glob, json, os, re, sys

out = sys.argv[1]
print(open(f"{out}/card.txt").read().strip())
print(open(f"{out}/times.txt").read().strip() if os.path.exists(f"{out}/times.txt") else "")

print("== selftest")
for f in sorted(glob.glob(f"{out}/selftest_*.txt")):
    text = open(f).read()
    tail = [l for l in text.splitlines() if re.search(r"passed|ERROR|rc=", l)]
    print(os.path.basename(f), " | ".join(tail[-3:]))
    for l in text.splitlines():
        if "accum" in l or "FAIL" in l or l.startswith("all gradients") or l.startswith("model loss"):
            print("  " + l[:170])


def metrics(tag):
    files = glob.glob(f"{out}/run_{tag}/metrics.jsonl") + glob.glob(f"{out}/run_{tag}/*/metrics.jsonl")
    tr = {}
    if not files:
        return tr
    for l in open(files[0]):
        r = json.loads(l)
        if "loss" in r:
            tr[r["step"]] = (r["loss"], r["grad_norm"])
        if "val_loss@1x" in r:
            tr[("val", r["step"])] = (r["val_loss@1x"], 0.0)
    return tr


print("== 30-step runs: max |diff| of loss / grad norm over common steps (and val)")
runs = {t: metrics(t) for t in ["old", "new", "old2", "gas2_old", "gas2_new", "resume"]}
for a, b in [("old", "new"), ("old", "old2"), ("gas2_old", "gas2_new"), ("gas2_new", "resume")]:
    ra, rb = runs[a], runs[b]
    common = [s for s in ra if s in rb]
    steps = [s for s in common if not isinstance(s, tuple)]
    if not steps:
        print(f"{a} vs {b}: no common steps")
        continue
    dl = max(abs(ra[s][0] - rb[s][0]) for s in steps)
    dg = max(abs(ra[s][1] - rb[s][1]) for s in steps)
    same = sum(ra[s] == rb[s] for s in steps)
    dv = [abs(ra[s][0] - rb[s][0]) for s in common if isinstance(s, tuple)]
    print(f"{a:>8} vs {b:<8} steps {len(steps):2d} bitwise-equal {same:2d}  max|dloss| {dl:.3e}  "
          f"max|dgnorm| {dg:.3e}  val {('%.3e' % max(dv)) if dv else '-'}  "
          f"loss@{max(steps)} {ra[max(steps)][0]:.6f}/{rb[max(steps)][0]:.6f}")

print("== throughput (tok/s), interleaved old/new/old/new; bench loss after the timed steps")
for d in ["16", "8"]:
    row = []
    for r in ["1", "2"]:
        for v in ["old", "new"]:
            f = f"{out}/bench_d{d}_{v}_{r}.txt"
            res = None
            if os.path.exists(f):
                for l in open(f):
                    if l.startswith("{"):
                        res = json.loads(l)
            row.append((v, res))
    cells = [f"{v} {res['tokens_per_s']/1e3:.1f}k ({res['step_s']*1e3:.1f} ms, loss {res['loss']:.6f})"
             if res else f"{v} -" for v, res in row]
    olds = [res["tokens_per_s"] for v, res in row if v == "old" and res]
    news = [res["tokens_per_s"] for v, res in row if v == "new" and res]
    ratio = (sum(news) / len(news)) / (sum(olds) / len(olds)) if olds and news else float("nan")
    print(f"d{d}: " + " | ".join(cells) + f"  new/old {ratio:.4f}")
