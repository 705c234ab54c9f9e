#!/usr/bin/env bash
# Runs every benchmark under tools/bench with its default sizes and writes each JSON report to a
# folder. Run from anywhere (it changes to the repository root):
#   tools/bench/run_all.sh                 # reports in runs/bench/
#   tools/bench/run_all.sh /tmp/bench      # reports elsewhere
#   ARGS=--quick tools/bench/run_all.sh    # every benchmark's --quick sizes (a smoke test)
# Environment: PYTHON (default .venv/bin/python when present, else python3), ARGS (extra arguments
# for every benchmark). A benchmark that fails is reported at the end; the others still run.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-runs/bench}
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
read -r -a EXTRA <<< "${ARGS:-}"
mkdir -p "$OUT"
failed=()

run() {  # run NAME SCRIPT JSON-FLAG
    local name=$1 script=$2 flag=$3
    echo "== $name: $PYTHON $script ${EXTRA[*]} $flag $OUT/$name.json"
    if ! "$PYTHON" "$script" "${EXTRA[@]}" "$flag" "$OUT/$name.json"; then
        failed+=("$name")
    fi
}

run loss tools/bench/loss.py --json
run accum tools/bench/accum.py --json
run data tools/bench/data.py --json
run train_step tools/bench/train_step.py --json
run eval tools/bench/eval.py --json

if (( ${#failed[@]} )); then
    echo "failed: ${failed[*]}" >&2
    exit 1
fi
echo "reports in $OUT/"
