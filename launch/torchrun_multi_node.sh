#!/usr/bin/env bash
# Train on several machines: run this script once on every node. torchrun's c10d rendezvous at
# RDZV_ENDPOINT gathers NNODES nodes; if a process fails, torchrun restarts every process (up to
# MAX_RESTARTS times) and, since `--resume latest` is always passed, they continue from the newest
# checkpoint (the first start, with no checkpoint yet, starts fresh). train.output_dir must be on a
# filesystem every node sees: every rank reads the checkpoint when it resumes.
#
# Environment variables [defaults]:
#   NNODES         nodes, or MIN:MAX for an elastic job [1]
#   RDZV_ENDPOINT  host:port of the rendezvous, the same on every node, e.g. node 0's address
#                  [127.0.0.1:29400 when NNODES=1; required otherwise]
#   RDZV_ID        job id, the same on every node [vlp]
#   NODE_RANK      this node's rank; 0 hosts the rendezvous store (is_host=true), others never do
#                  [unset: torch hosts it on the node whose address matches RDZV_ENDPOINT]
#   NPROC          processes per node [the visible GPUs: CUDA_VISIBLE_DEVICES, else `nvidia-smi -L`; 1 without]
#   MAX_RESTARTS   restarts of the worker group after a failure [3]
#   TORCH_DISABLE_SHARE_RDZV_TCP_STORE
#                  1: every restart gets a fresh TCPStore for init_process_group [1]. With torchrun's
#                  shared store (0) a restarted process can read the previous attempt's addresses and
#                  fail to connect (pytorch/pytorch#135712, #167288; seen here in 2 of 4 gloo restarts)
#   CONFIG         vlp config file [configs/demo.yaml]
#   DRY_RUN        1: print the command (one line, shell-quoted) and exit [0]
# Arguments are passed on to `python -m vlp.train` after `--resume latest` (a later --resume wins).
#
# Example (two nodes, 8 GPUs each; run on both):
#   NNODES=2 NODE_RANK=0 RDZV_ENDPOINT=10.0.0.1:29400 RDZV_ID=clip-b32 CONFIG=configs/demo.yaml \
#     launch/torchrun_multi_node.sh --set data.batch_size=256
set -euo pipefail

# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

NNODES=${NNODES:-1}
if [[ -z "${RDZV_ENDPOINT:-}" ]]; then
  if [[ "$NNODES" != 1 ]]; then
    echo "torchrun_multi_node.sh: set RDZV_ENDPOINT=host:port (the same on every node) for NNODES=$NNODES" >&2
    exit 2
  fi
  RDZV_ENDPOINT=127.0.0.1:29400
fi
RDZV_ID=${RDZV_ID:-vlp}
gpus=$(visible_gpus)
NPROC=${NPROC:-$((gpus > 0 ? gpus : 1))}
MAX_RESTARTS=${MAX_RESTARTS:-3}
TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
CONFIG=${CONFIG:-configs/demo.yaml}
node=()
if [[ -n "${NODE_RANK:-}" ]]; then
  node=(--node_rank "$NODE_RANK" --rdzv_conf "is_host=$([[ "$NODE_RANK" == 0 ]] && echo true || echo false)")
fi

run env TORCH_DISABLE_SHARE_RDZV_TCP_STORE="$TORCH_DISABLE_SHARE_RDZV_TCP_STORE" \
  torchrun --nnodes "$NNODES" --nproc_per_node "$NPROC" "${node[@]}" \
  --rdzv_backend c10d --rdzv_endpoint "$RDZV_ENDPOINT" --rdzv_id "$RDZV_ID" --max_restarts "$MAX_RESTARTS" \
  -m vlp.train --config "$CONFIG" --resume latest "$@"
