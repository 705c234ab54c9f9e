# Functions the launch/*.sh scripts share (sourced, not run). Reads DRY_RUN and CUDA_VISIBLE_DEVICES,
# which each script's header documents.

# The number of GPUs this process may use: CUDA_VISIBLE_DEVICES if set, else `nvidia-smi -L`, else 0.
visible_gpus() {
  if [[ -n "${CUDA_VISIBLE_DEVICES+set}" ]]; then
    local ids
    IFS=, read -ra ids <<<"$CUDA_VISIBLE_DEVICES"
    echo "${#ids[@]}"
  elif command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    nvidia-smi -L | grep -c '^GPU'
  else
    echo 0
  fi
}

# Run the command in place of the script; with DRY_RUN=1 print it (one line, shell-quoted) instead.
run() {
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    local line
    line=$(printf '%q ' "$@")
    echo "${line% }"
    exit 0
  fi
  exec "$@"
}
