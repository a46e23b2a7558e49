#!/usr/bin/env bash
# GPU checks, run where a CUDA device is present (installs nothing from the network):
#   bash bench/gpu.sh            # results as JSON on stdout and in bench/results/gpu*.json
# 1. (no Ray) a bge-base-sized encoder in bf16/fp16 at 128 and 512 tokens (tokens/s, MFU vs
#    the card's measured bf16 matmul rate); the Ray Data job with a GPU actor if Ray imports.
# 2. (no Ray) the whole recipe at bge-base size, random 12x768 weights, a few steps each:
#    RetroMAE -> mine -> finetune (gradient cache) -> evaluate, each step timed.
# 3. (Ray, skipped when the image has none) the same chain through pipelines/recipe.py.
# The Ray-free parts run first, so an image without Ray still measures them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
mkdir -p bench/results
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$PY" bench/gpu_encode.py "$@" | tee bench/results/gpu.json
"$PY" bench/gpu_recipe.py --parts plain | tee bench/results/gpu_recipe.json
if "$PY" -c "import ray" 2>/dev/null; then
  "$PY" bench/gpu_recipe.py --parts ray | tee bench/results/gpu_recipe_ray.json
else
  echo '{"recipe_ray": "skipped: ray is not installed in this image"}'
fi
