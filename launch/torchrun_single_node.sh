#!/usr/bin/env bash
# Train on one machine: torchrun starts NPROC processes (one per GPU; gloo on CPU, nccl on GPU).
#
# Environment variables [defaults]:
#   NPROC        processes to start [the visible GPUs: CUDA_VISIBLE_DEVICES, else `nvidia-smi -L`; 1 without GPUs]
#   CONFIG       vlp config file [configs/demo.yaml]
#   MASTER_PORT  a fixed rendezvous port on 127.0.0.1 [unset: --standalone picks a free port]
#   DRY_RUN      1: print the command (one line, shell-quoted) and exit [0]
# Arguments are passed on to `python -m vlp.train` (--set KEY=VALUE, --resume latest, ...).
#
# Example:
#   NPROC=4 CONFIG=configs/demo.yaml launch/torchrun_single_node.sh --set data.batch_size=64
set -euo pipefail

# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

gpus=$(visible_gpus)
NPROC=${NPROC:-$((gpus > 0 ? gpus : 1))}
CONFIG=${CONFIG:-configs/demo.yaml}
if [[ -n "${MASTER_PORT:-}" ]]; then
  rendezvous=(--nnodes 1 --master_addr 127.0.0.1 --master_port "$MASTER_PORT")
else
  rendezvous=(--standalone)
fi

run torchrun "${rendezvous[@]}" --nproc_per_node "$NPROC" -m vlp.train --config "$CONFIG" "$@"
