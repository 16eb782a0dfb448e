#!/usr/bin/env bash
# The prepared device check (experiments/device_check.py): one JSON line per
# measurement on stdout, appended to $1 (default device_check.jsonl).
#   bash experiments/device_check.sh [out.jsonl] [--tiny|--smoke|--items=...]
# At most 8 minutes on one GPU or a TPU host; --tiny (automatic on CPU) in
# under 3 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-device_check.jsonl}"
shift || true
python="${PYTHON:-python}"
[[ -x .venv/bin/python && -z "${PYTHON:-}" ]] && python=.venv/bin/python
# One chip of the host, most of its memory for the batch search.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
start=$(date +%s)
PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} "$python" experiments/device_check.py \
  --out="$out" "$@"
echo "device_check: $(( $(date +%s) - start )) s wall, lines in $out" >&2
