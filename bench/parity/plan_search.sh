#!/bin/bash
# Which learning rate makes the 300-step Shakespeare parity plan well-posed? bench/parity/seeds.sh
# per LR with the nudged fp32 run (the plan's chaos) beside PyTorch fp32, bf16 and our CUDA:
#   C=gpu-carry-parity LRS="2e-3 1e-3 5e-4" SEEDS="1 2 3" CUDA_RUNS="a b" bash bench/parity/plan_search.sh
LRS=${LRS:-2e-3 1e-3 5e-4} SEEDS=${SEEDS:-1 2 3} TORCH_RUNS=${TORCH_RUNS:-fp32,fp32_perturbed,bf16} \
  exec bash "$(dirname "$0")/seeds.sh"
