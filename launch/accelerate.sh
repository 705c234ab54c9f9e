#!/usr/bin/env bash
# Train on one machine through `accelerate launch` with launch/accelerate_config.yaml (torchrun
# underneath: vlp's own DDP setup applies; accelerate's mixed_precision is not used, see model.precision).
#
# Environment variables [defaults]:
#   NPROC               processes [the visible GPUs: CUDA_VISIBLE_DEVICES, else `nvidia-smi -L`; 1 without GPUs]
#   CONFIG              vlp config file [configs/demo.yaml]
#   ACCELERATE_CONFIG   accelerate config file [launch/accelerate_config.yaml next to this script]
#   MASTER_PORT         port of the process group [0: a free one]
#   DRY_RUN             1: print the command (one line, shell-quoted) and exit [0]
# Arguments are passed on to `python -m vlp.train`. Without GPUs add `--set train.device=cpu` (gloo):
# `accelerate launch --cpu` would start one plain process, not torchrun, whatever --num_processes says.
#
# Example:
#   NPROC=4 launch/accelerate.sh --set data.batch_size=64
set -euo pipefail

# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

gpus=$(visible_gpus)
NPROC=${NPROC:-$((gpus > 0 ? gpus : 1))}
CONFIG=${CONFIG:-configs/demo.yaml}
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-$(dirname "${BASH_SOURCE[0]}")/accelerate_config.yaml}

run accelerate launch --config_file "$ACCELERATE_CONFIG" --num_processes "$NPROC" \
  --main_process_port "${MASTER_PORT:-0}" -m vlp.train --config "$CONFIG" "$@"
