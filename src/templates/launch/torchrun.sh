#!/usr/bin/env bash
# Launch {{ what }} with torchrun: {{ nodes }} node(s) x {{ gpus_per_node }} GPU(s), world {{ world }}, sharding {{ sharding }}.
# Written by `archscale launch --scheduler torchrun`.
{% if nodes > 1 -%}
# Run this same script on each of the {{ nodes }} nodes; set MASTER_ADDR to node 0's address on all of them.
{% endif -%}
set -euo pipefail

# Per-GPU memory (plan estimate): {{ memory }}
{% if nodes > 1 -%}
: "${MASTER_ADDR:?set MASTER_ADDR to the address of the first node}"
{% else -%}
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
{% endif -%}
MASTER_PORT="${MASTER_PORT:-29500}"
# Uncomment where NVLink SHARP (multicast) is unavailable or hangs:
# export NCCL_NVLS_ENABLE=0

torchrun --nnodes {{ nodes }} --nproc_per_node {{ gpus_per_node }} \
  --rdzv_id "${RDZV_ID:-{{ job }}}" --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" \
  --no-python {{ command }}
