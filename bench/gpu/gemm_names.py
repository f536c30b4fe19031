"""Summarises bench/gpu/gemm_names.sh: per kernel name and grid, calls and total ms under ncu."""
import collections, csv, sys, io

def read(path):
    text = open(path, errors="replace").read()
    start = text.find('"ID"')
    if start < 0:
        print(f"{path}: no ncu table"); return []
    rows = []
    for r in csv.DictReader(io.StringIO(text[start:])):
        if r.get("Metric Name") != "gpu__time_duration.sum":
            continue
        v = float(r["Metric Value"].replace(",", ""))
        unit = r.get("Metric Unit", "")
        ms = v / 1e6 if unit == "nsecond" else v / 1e3 if unit == "usecond" else v
        rows.append((r["Kernel Name"][:90], r.get("Grid Size", ""), r.get("Block Size", ""), ms))
    return rows

for side in ("ours", "torch"):
    rows = read(f"{sys.argv[1]}/{side}.csv")
    agg = collections.defaultdict(lambda: [0, 0.0])
    for name, grid, block, ms in rows:
        a = agg[(name, grid, block)]; a[0] += 1; a[1] += ms
    total = sum(ms for *_, ms in rows)
    print(f"== {side}: {len(rows)} GEMM launches, {total:.2f} ms alone")
    for (name, grid, block), (n, ms) in sorted(agg.items(), key=lambda kv: -kv[1][1]):
        print(f"  {ms:8.2f} ms {n:4d}x  {grid:>14s} {block:>10s}  {name}")
