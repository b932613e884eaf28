#!/bin/bash
# The prepared GPU check (scripts/gpu_check.py): throughput and MFU of gpt2_small and gpt2_medium with AdamW,
# Sophia-G, Sophia-H and Lion, the fused kernels against eager, and a kill-and-resume through torchrun on one
# GPU. Under 8 minutes on one GPU; needs no network. Its tables go to stdout (paste them into docs/scaling.md).
#
#   bash scripts/gpu_check.sh               # on a GPU machine
#   bash scripts/gpu_check.sh --smoke       # the same steps at toy sizes, on any device (CI, on CPU)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 WANDB_MODE=disabled
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
exec python scripts/gpu_check.py "$@"
