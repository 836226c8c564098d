#!/usr/bin/env bash
# One-command GPU check (a few minutes): installs the pinned stack with a CUDA jaxlib into a scratch venv,
# then prints the train-step and policy-latency benchmarks of the default (full-size) config.
#   bash benchmarks/gpu_check.sh [OUT_DIR]
# Writes train.json and infer.json into OUT_DIR (default: $OUT when set, else runs/gpu_check).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-runs/gpu_check}}"
mkdir -p "$out"
venv="${GPU_VENV:-/tmp/dreamvla_gpu_venv}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
  grep -v -E '^(torch|pybullet)==' requirements.txt > "$venv/requirements-gpu.txt"
  "$venv/bin/pip" install -q -r "$venv/requirements-gpu.txt" "jax[cuda12]==0.10.2"
fi
py="$venv/bin/python"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
export PYTHONUNBUFFERED=1
# Train step: fp32 baseline vs bf16 (the MFU target is for bf16), remat and cuDNN attention levers.
timeout 420 "$py" -m dreamvla_jax.benchmark train --config configs/calvin.py --batch 16 \
  --compare fp32,bf16,remat_dots,cudnn --steps 5 --json | tee "$out/train.json"
# Policy: full recomputation vs the exact fast path, batch 1 and 8, window sliding.
timeout 300 "$py" -m dreamvla_jax.benchmark infer --config configs/calvin.py --batch-sizes 1,8 --steps 5 \
  --json | tee "$out/infer.json"
