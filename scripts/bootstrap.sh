#!/usr/bin/env bash
# Create .venv/ at the project root (if missing) and install medens with its extras into it.
# Idempotent: reinstalls only when pyproject.toml changed since the last install.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -c 'import sys; assert sys.version_info >= (3, 10), "medens needs Python >= 3.10"'
    "$PY" -m venv .venv
fi
stamp=.venv/.medens-install-stamp
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -e ".[dev,mlflow,export,dvc,cluster,serve]"
    echo "$want" > "$stamp"
fi
