#!/usr/bin/env bash
# Train with the DeepSpeed launcher and `train.backend=deepspeed` (ZeRO, see docs/distributed.md). Run it
# once, on the first host: DeepSpeed reaches the hosts of HOSTFILE over passwordless ssh (pdsh) and
# starts one process per slot on each, with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT
# set. Remote hosts get only PYTHON*, NCCL*, UCX* and MV2* variables, plus those in ./.deepspeed_env or
# ~/.deepspeed_env (KEY=VALUE lines), and run in the same folder: the checkout must be at the same path.
#
# Environment variables [defaults]:
#   HOSTFILE     MPI-style hostfile, one `HOST slots=N` line per host (see launch/hostfile.example)
#                [unset: DeepSpeed reads /job/hostfile, else uses this machine's GPUs]; a HOSTFILE
#                that does not exist is an error here (DeepSpeed would silently run on this machine only)
#   INCLUDE      hosts and slots to use, e.g. `worker-0:0,1@worker-1` [all of HOSTFILE]
#   NUM_NODES    use the first N hosts of HOSTFILE [all]; not with INCLUDE
#   NUM_GPUS     use slots 0..N-1 of every host [all]; not with INCLUDE
#   MASTER_ADDR  address of the first host, reachable from every host [DeepSpeed asks it `hostname -I` over ssh]
#   MASTER_PORT  port of the process group [29500]
#   CONFIG       vlp config file [configs/demo.yaml]
#   DS_ARGS      further launcher flags, word-split, e.g. `--no_ssh_check` or `--ssh_port 2222` [none]
#   DRY_RUN      1: print the command (one line, shell-quoted) and exit [0]
# Read by DeepSpeed itself: DS_ACCELERATOR=cpu runs on CPUs (gloo; one slot = one process) when its
#   automatic detection would pick something else.
# Arguments are passed on to `python -m vlp.train` after `--set train.backend=deepspeed`. vlp reads the
# local rank from LOCAL_RANK, so the launcher's `--local_rank=N` argument is turned off (--no_local_rank).
#
# Example (two hosts of 8 GPUs, ZeRO stage 2):
#   HOSTFILE=launch/hostfile MASTER_ADDR=10.0.0.1 CONFIG=configs/demo.yaml launch/deepspeed_hostfile.sh \
#     --set train.deepspeed.zero_stage=2
set -euo pipefail

# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

CONFIG=${CONFIG:-configs/demo.yaml}
launcher=()
if [[ -n "${HOSTFILE:-}" ]]; then
  if [[ ! -f "$HOSTFILE" ]]; then
    echo "deepspeed_hostfile.sh: HOSTFILE=$HOSTFILE does not exist" >&2
    exit 2
  fi
  launcher+=(--hostfile "$HOSTFILE")
fi
if [[ -n "${INCLUDE:-}" && -n "${NUM_NODES:-}${NUM_GPUS:-}" ]]; then
  echo "deepspeed_hostfile.sh: INCLUDE selects hosts and slots itself; unset NUM_NODES and NUM_GPUS" >&2
  exit 2
fi
[[ -n "${INCLUDE:-}" ]] && launcher+=(--include "$INCLUDE")
[[ -n "${NUM_NODES:-}" ]] && launcher+=(--num_nodes "$NUM_NODES")
[[ -n "${NUM_GPUS:-}" ]] && launcher+=(--num_gpus "$NUM_GPUS")
[[ -n "${MASTER_ADDR:-}" ]] && launcher+=(--master_addr "$MASTER_ADDR")
launcher+=(--master_port "${MASTER_PORT:-29500}")
read -ra extra <<<"${DS_ARGS:-}"

run deepspeed "${launcher[@]}" "${extra[@]}" --no_local_rank --module vlp.train \
  --config "$CONFIG" --set train.backend=deepspeed "$@"
