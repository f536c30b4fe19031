#!/usr/bin/env bash
# Wall time of `archscale plan` (release build, whole process: parse, validate, expand,
# compile, render) on the 5-depth SambaY sweep. Uses hyperfine when installed, else a loop.
# Usage: bench/plan_timing.sh [runs]   (default 100)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-100}
file=experiments/sambay_flops_scaling.toml
cargo build --release --quiet --bin archscale
bin=target/release/archscale
"$bin" plan "$file" > /dev/null   # warm the page cache; also fails early on a bad file

if command -v hyperfine > /dev/null; then
    hyperfine -N --warmup 5 --runs "$runs" "$bin plan $file" "$bin plan $file --json"
    exit 0
fi

for mode in table json; do
    args=(plan "$file")
    [[ $mode == json ]] && args+=(--json)
    times=()
    for _ in $(seq "$runs"); do
        t0=$(date +%s%N)
        "$bin" "${args[@]}" > /dev/null
        t1=$(date +%s%N)
        times+=($(( (t1 - t0) / 1000 )))
    done
    printf '%s\n' "${times[@]}" | sort -n | awk -v mode="$mode" -v n="$runs" '
        { t[NR] = $1; sum += $1 }
        END { printf "archscale plan (%s): %d runs, min %.2f ms, median %.2f ms, mean %.2f ms, max %.2f ms\n",
              mode, n, t[1] / 1000, t[int((n + 1) / 2)] / 1000, sum / n / 1000, t[n] / 1000 }'
done
