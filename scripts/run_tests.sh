#!/usr/bin/env bash
# README command 2 (and CI): set up .venv/ and run the test suite.
# Real-sample tests read MEDENS_SAMPLES (default here: ../shared/data when it exists).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
# no usage reports from MLflow or DVC (an offline machine; set them yourself to opt in)
export MLFLOW_DISABLE_TELEMETRY="${MLFLOW_DISABLE_TELEMETRY:-true}" DVC_NO_ANALYTICS="${DVC_NO_ANALYTICS:-1}"
if [ -z "${MEDENS_SAMPLES:-}" ] && [ -d ../shared/data ]; then
    MEDENS_SAMPLES=$(cd ../shared/data && pwd)
    export MEDENS_SAMPLES
fi
# two pytest-xdist workers by default (tests sharing a module or session fixture stay on one worker, so it is
# built once; the others, slow first, go to whichever worker is free: tests/conftest.py);
# MEDENS_TEST_WORKERS=0 runs one process, =auto one worker per core
workers="${MEDENS_TEST_WORKERS:-2}"
if [ "$workers" != 0 ] && .venv/bin/python -c "import xdist" 2>/dev/null; then
    set -- -n "$workers" --dist loadgroup "$@"
    # one intra-op thread per worker: two workers of two threads each on two cores oversubscribe them, and
    # OpenMP threads spin-wait for a descheduled peer (a tiny training step measured 0.2-0.35 s with one
    # thread against 0.5-3.9 s with two, on a machine already busy)
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi
exec .venv/bin/python -m pytest "$@"
