#!/usr/bin/env bash
# Launch {{ what }} under Slurm: {{ nodes }} node(s) x {{ gpus_per_node }} GPU(s), world {{ world }}, sharding {{ sharding }}.
# Written by `archscale launch --scheduler slurm`; submit with `sbatch`.
#SBATCH --job-name={{ job }}
#SBATCH --nodes={{ nodes }}
#SBATCH --ntasks-per-node={{ gpus_per_node }}
#SBATCH --gpus-per-node={{ gpus_per_node }}
#SBATCH --output={{ job }}-%j.out
set -euo pipefail

# Per-GPU memory (plan estimate): {{ memory }}
# Each task reads SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID; rank 0 is the first node.
export MASTER_ADDR="${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}"
export MASTER_PORT="${MASTER_PORT:-29500}"
# Uncomment where NVLink SHARP (multicast) is unavailable or hangs:
# export NCCL_NVLS_ENABLE=0

srun --kill-on-bad-exit=1 {{ command }}
