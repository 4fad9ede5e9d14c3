#!/usr/bin/env bash
# README command 1: set up .venv/ and run the main job on the embedded synthetic default.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
# no usage reports from MLflow or DVC (an offline machine; set them yourself to opt in)
export MLFLOW_DISABLE_TELEMETRY="${MLFLOW_DISABLE_TELEMETRY:-true}" DVC_NO_ANALYTICS="${DVC_NO_ANALYTICS:-1}"
exec .venv/bin/python scripts/main.py "$@"
