#!/usr/bin/env bash
# First contact with a GPU: build, GPU tests, training-step and kernel benchmarks -> OUTDIR
# (see benches/gpu_check.py for the steps, their limits and the budget).
#   bash benches/gpu_check.sh [OUTDIR] [--quick] [--dry-run] [--no-build] [--only STEP,...]
# PYTHON selects the interpreter (default: python3, else python).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-$(command -v python3 || command -v python)}"
exec "$PY" -m benches.gpu_check "$@"
