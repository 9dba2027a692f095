#!/usr/bin/env bash
# The GPU check (docs/scale.md): the GPU paths in one run under a hard time budget, as one table.
#   bash bench/gpu_check.sh [--wheels DIR] [--install-only] [--out DIR] [--budget SECONDS] [--weights PATH]
#                           [--device cuda|cpu] [--steps STEP ...] [--fail STEP ...] [--jobs N]
# --wheels DIR (on an offline host, DIR made by bench/wheelhouse.sh): a virtual environment OUT/venv over the
# packages of $PYTHON (default python3) installs this project and what of its dependencies that Python lacks
# from DIR alone, leaving the packages it has (its torch stack) as they are; --install-only stops there.
# Without --wheels: the project's .venv when it exists (make setup), else $PYTHON. Other options:
# python -m bench.gpu_check --help.
set -euo pipefail
abs() { case $1 in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }
WHEELS= INSTALL_ONLY= OUT=$(abs "$(dirname "$0")/../runs/gpu_check") DEVICE=cuda
ARGS=()
while [ $# -gt 0 ]; do
  case $1 in
    --wheels) WHEELS=$(abs "$2"); shift 2 ;;
    --install-only) INSTALL_ONLY=1; shift ;;
    --out) OUT=$(abs "$2"); ARGS+=("$1" "$OUT"); shift 2 ;;
    --weights) ARGS+=("$1" "$(abs "$2")"); shift 2 ;;
    --device) DEVICE=$2; ARGS+=("$1" "$2"); shift 2 ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -n "$WHEELS" ]; then
  rm -rf "$OUT/venv"
  "$PY" -m venv --system-site-packages "$OUT/venv"
  PY=$OUT/venv/bin/python
  # Only DIR: no index, and no pip configuration file or PIP_* variable that could name another source.
  PIP_CONFIG_FILE=/dev/null "$PY" -m pip install --isolated --disable-pip-version-check --no-index \
    --find-links "$WHEELS" retention
elif [ -x .venv/bin/python ]; then
  PY=.venv/bin/python
fi
[ -n "$INSTALL_ONLY" ] && exit 0
if [ "$DEVICE" != cpu ]; then
  "$PY" -c "import sys, torch
sys.exit(0 if torch.cuda.is_available() else 'gpu_check: torch sees no GPU (--device cpu: the steps on the CPU)')"
fi
exec "$PY" -m bench.gpu_check ${ARGS[@]+"${ARGS[@]}"}
