#!/usr/bin/env bash
# One-command GPU check (~10-15 minutes, most of it compiling): the train-step and policy-latency benchmarks of
# the default (full-size) config on one GPU, written as JSON files.
#   bash benchmarks/gpu_check.sh [OUT_DIR]          (default: $OUT when set, else runs/gpu_check)
# Python: $PYTHON when set (an interpreter whose JAX already sees the GPU, e.g. a CUDA image's python3);
# otherwise a scratch venv with the pinned stack and a CUDA jaxlib (needs the internet). On a machine that
# cannot fetch, wheels placed in .whl/ (and an openai-clip `clip/` folder for the tokenizer's BPE file) are
# installed into a scratch folder first (README, "Performance").
# Each benchmark has its own time limit (seconds): INFER_S, TRAIN_S, INFER_FP32_S; a train run cut short still
# leaves its finished variants in train.log. BATCH and COMPARE change the train run.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-runs/gpu_check}}"
mkdir -p "$out"
config="${CONFIG:-configs/calvin.py}"
if [ -n "${PYTHON:-}" ]; then
  py="$PYTHON"
  if [ -d .whl ]; then
    site=/tmp/dreamvla_site
    if ls .whl/*.whl >/dev/null 2>&1; then
      "$py" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$site" .whl/*.whl
    fi
    if [ -d .whl/clip ]; then mkdir -p "$site" && cp -r .whl/clip "$site/"; fi
    export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  fi
else
  venv="${GPU_VENV:-/tmp/dreamvla_gpu_venv}"
  if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --upgrade pip
    grep -v -E '^(torch|pybullet)==' requirements.txt > "$venv/requirements-gpu.txt"
    "$venv/bin/pip" install -q -r "$venv/requirements-gpu.txt" "jax[cuda12]==0.10.2"
  fi
  py="$venv/bin/python"
fi
export PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-/tmp/dreamvla_jax_cache}"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.94}"  # bf16 batch 8 peaks at 56 GB
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt" || true
"$py" -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" \
  | tee -a "$out/gpu.txt"
run() {  # run NAME LIMIT ARGS...: one benchmark, JSON to NAME.json, progress and errors to NAME.log
  local name=$1 limit=$2; shift 2
  echo "== $name: $*"
  timeout "$limit" "$py" -m dreamvla_jax.benchmark "$@" --json > "$out/$name.json" 2> >(tee "$out/$name.log" >&2) \
    || echo "== $name: exit $? (see $out/$name.log)"
  cat "$out/$name.json"
}
# Policy latency, batch 1, full history, window sliding: full recomputation vs the exact fast path (bf16 first:
# the fp32 policy did not finish compiling and running within 120 s on an H100).
run infer_bf16 "${INFER_S:-150}" infer --config "$config" --batch-sizes 1 --steps 5 --variant bf16
# Train step, batch 8 (the default batch of 16 needs ~95 GiB with attention dropout: over one 80 GB card):
# bf16 first, then cuDNN attention without attention dropout, the same with unrolled layers, then fp32.
run train "${TRAIN_S:-600}" train --config "$config" --batch "${BATCH:-8}" --steps 5 \
  --compare "${COMPARE:-bf16,bf16+cudnn+no_attn_dropout,bf16+cudnn+no_attn_dropout+unroll,fp32}"
run infer "${INFER_FP32_S:-300}" infer --config "$config" --batch-sizes 1 --steps 5
