#!/usr/bin/env bash
# The GPU check (docs/scale.md): the GPU paths in one short run on one GPU, printed as one markdown table.
#   bash bench/gpu_check.sh
# Uses the project's virtual environment when it exists (make setup), else the python on PATH; the torch it
# finds must be a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: torch sees no GPU')"
exec "$PY" -m bench.gpu_check
