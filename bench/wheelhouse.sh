#!/usr/bin/env bash
# The wheel folder for an offline GPU host (docs/scale.md, "GPU check"): this project's wheel and the wheels
# of the dependencies such a host lacks, for the host's Python and platform. Never torch, never a model. Run it
# on a machine that reaches PyPI:
#   bash bench/wheelhouse.sh [OUT]                     (default OUT: dist/wheelhouse)
# then carry OUT and this checkout to the host and run `bash bench/gpu_check.sh --wheels OUT` there.
# Environment:
#   PYTHON_VERSION  the host's Python (default 3.12)
#   PLATFORM        its wheel platform (default manylinux2014_x86_64)
#   MISSING         the requirements the host lacks (default: jsonargparse[signatures] wandb gguf); their own
#                   dependencies come too, except what the host has:
#   HOST_FREEZE     a `python -m pip freeze` of the host: the packages it has. Without it, the packages
#                   any install of torch, lightning, transformers, peft and torchmetrics brings (HOST_STACK).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-dist/wheelhouse}
PYTHON_VERSION=${PYTHON_VERSION:-3.12}
PLATFORM=${PLATFORM:-manylinux2014_x86_64}
MISSING=${MISSING:-jsonargparse[signatures] wandb gguf}
HOST_STACK="torch lightning pytorch-lightning lightning-utilities torchmetrics transformers huggingface-hub
tokenizers safetensors peft accelerate numpy pyyaml packaging tqdm regex filelock fsspec typing-extensions
sympy mpmath networkx jinja2 markupsafe psutil"
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
TARGET=(--only-binary=:all: --python-version "$PYTHON_VERSION" --platform "$PLATFORM")

rm -rf "$OUT" && mkdir -p "$OUT"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK" build' EXIT
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT" .
# shellcheck disable=SC2086  # MISSING is a list of requirements
"$PY" -m pip install -q --dry-run --ignore-installed --report "$WORK/report.json" "${TARGET[@]}" $MISSING
if [ -n "${HOST_FREEZE:-}" ]; then HAVE=$(cat "$HOST_FREEZE"); else HAVE=$HOST_STACK; fi
"$PY" - "$WORK/report.json" "$HAVE" > "$WORK/pins.txt" <<'EOF'
import json, re, sys

def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()

have = {norm(re.split(r"[=<>~!@ ;\[]", line.strip())[0]) for line in sys.argv[2].split() if line.strip()}
for item in json.load(open(sys.argv[1]))["install"]:
    meta = item["metadata"]
    if norm(meta["name"]) not in have:
        print(f"{meta['name']}=={meta['version']}")
EOF
"$PY" -m pip download -q --no-deps "${TARGET[@]}" -d "$OUT" -r "$WORK/pins.txt"
ls -1 "$OUT"
du -sh "$OUT"
