#!/usr/bin/env bash
# GPU checks, run where a CUDA device is present (installs nothing from the network):
#   bash bench/gpu.sh            # results as JSON on stdout and in bench/results/gpu.json
# Measures a bge-base-sized encoder in bf16/fp16 at 128 and 512 tokens (tokens/s, MFU vs the
# card's measured bf16 matmul rate) and runs the Ray Data job with a GPU actor.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
mkdir -p bench/results
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$PY" bench/gpu_encode.py "$@" | tee bench/results/gpu.json
