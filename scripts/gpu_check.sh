#!/usr/bin/env bash
# One GPU check (issue 10): ResNet-50 images/s (medens module vs plain loop, bf16, channels_last, eager and
# torch.compile), CT 3D ResNet-18 64^3 and MRI U-Net 128^3 step times, whole-volume sliding-window MRI
# inference on 240x240x155x4, peak GPU memory of each. Prints ONE JSON document on stdout (progress on
# stderr); stays under 8 minutes on one GPU (--budget-s). Without a GPU: {"gpu": false, "reason": ...}, exit 0.
#   bash scripts/gpu_check.sh > gpu_check.json
#   bash scripts/gpu_check.sh --device cpu --tiny --compile-backend eager    # the code path on toy sizes
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
exec "$PY" scripts/benchmark.py gpu-check "$@"
