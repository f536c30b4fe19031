#!/usr/bin/env bash
# Export check: does the PyTorch stack compute what archscale computes from an export?
#
# Part 1 (a machine with Rust, e.g. the dev box) trains the quickstart-size model and
# exports it in f32 and bf16, plus shrunk hybrids (Samba, SambaY, SambaYDA, SambaY-MLP/Attn):
#     bash bench/export/run.sh build [OUT_DIR]          # default OUT_DIR: gpu-carry-export/
# (git-ignored; carry it to the GPU machine)
# Part 2 (any machine with python3 + torch; no Rust, no network needed) checks each export:
#     bash bench/export/run.sh check [OUT_DIR] [--device cuda]
# or both at once where both exist:
#     bash bench/export/run.sh all [OUT_DIR]
# Each check prints one PASS/FAIL line; the script exits non-zero if any export FAILs.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
mode="${1:-all}"
out="${2:-$repo/gpu-carry-export}"
shift $(( $# > 2 ? 2 : $# )) || true

build() {
  local bin="${ARCHSCALE:-$repo/target/release/archscale}"
  [ -x "$bin" ] || (cd "$repo" && cargo build --release)
  mkdir -p "$out"
  out="$(cd "$out" && pwd)"
  # Runs train in a scratch directory; only the exports go to $out.
  local work
  work="$(mktemp -d)"
  cd "$work"
  cp -r "$repo/experiments" .
  # The quickstart model (Transformer++ d4, n_embd 128, RoPE, GQA), a shorter run.
  "$bin" run experiments/quickstart.toml --backend cpu --set train.tokens=61440 \
    --set train.eval_interval=1000 --set train.save_interval=1000 --set train.out_dir=runs/quickstart
  # Hybrids, shrunk as tests/cli_families.rs does (width 64, 4 heads of 16, 2 KV groups,
  # vocab 512, window 16), depth 8, μP++ so the multipliers are not 1: Samba (Mamba + SWA
  # with RoPE), SambaY (GMU on Mamba memory, YOCO cross-attention, NoPE), SambaYDA
  # (differential attention), SambaY-MLP and SambaY-Attn (GMU on MLP / attention memory).
  mkdir -p archs
  for family in samba sambay sambayda sambaymlp sambayattn; do
    awk '{ key = $1; sub(/=.*/, "", key)
           if (key == "depths") next
           else if (key == "width") print "width = { n_embd = 64 }"
           else if (key == "heads") print "heads = 4"
           else if (key == "kv_groups") print "kv_groups = 2"
           else if (key == "head_dim") print "head_dim = 16"
           else if (key == "vocab_size") print "vocab_size = 512"
           else if (key == "local_window") print "local_window = 16"
           else if (key == "token_rule") print "token_rule = { mult = \"15 * n_embd^2 / depth^2\" }"
           else print }' "$repo/experiments/archs/$family.toml" > "archs/tiny-$family.toml"
    "$bin" run experiments/quickstart.toml --backend cpu --set arch=\"$PWD/archs/tiny-$family.toml\" \
      --set depth=8 --set base.depth=8 --set parametrization=\"mup++\" --set train.tokens=20480 \
      --set train.eval_interval=1000 --set train.save_interval=1000 --set train.out_dir=runs/$family
  done
  for run in runs/*/*/; do
    name="$(basename "$(dirname "$run")")"
    rm -rf "$out/exports/$name-f32" "$out/exports/$name-bf16"
    "$bin" export "$run" --format hf --out "$out/exports/$name-f32"
    "$bin" export "$run" --format hf --dtype bf16 --out "$out/exports/$name-bf16"
  done
  cd "$repo"
  rm -rf "$work"
  du -sh "$out/exports"
}

check() {
  local fail=0
  for d in "$out"/exports/*/; do
    python3 "$here/check_export.py" "$d" "$@" || fail=1
  done
  if [ "$fail" = 0 ]; then echo "ALL PASS"; else echo "SOME FAILED"; fi
  return $fail
}

case "$mode" in
  build) build ;;
  check) check "$@" ;;
  all) build; check "$@" ;;
  *) echo "usage: $0 build|check|all [OUT_DIR] [check_export.py options]" >&2; exit 2 ;;
esac
