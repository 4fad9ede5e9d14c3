#!/usr/bin/env bash
# README command 2 (and CI): set up .venv/ and run the test suite.
# Real-sample tests read MEDENS_SAMPLES (default here: ../shared/data when it exists).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
if [ -z "${MEDENS_SAMPLES:-}" ] && [ -d ../shared/data ]; then
    MEDENS_SAMPLES=$(cd ../shared/data && pwd)
    export MEDENS_SAMPLES
fi
exec .venv/bin/python -m pytest "$@"
