#!/usr/bin/env bash
# Profile of the full-size train step on one GPU (~5 minutes): device milliseconds and matmul TFLOP/s per
# module, forward and backward, the costliest HLO ops, and the trace + compiled HLO to read further.
#   PYTHON=python3 bash benchmarks/profile_gpu.sh [OUT_DIR]     (default: $OUT when set, else runs/profile)
# Same Python setup as benchmarks/gpu_check.sh ($PYTHON, carried wheels in .whl/). VARIANT, BATCH and
# BATCH2 (a second batch timed without a profile; empty to skip) change the run; NO_PROFILE=1 only times.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-runs/profile}}"
mkdir -p "$out"
py="${PYTHON:-python3}"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  site=/tmp/dreamvla_site
  "$py" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$site" .whl/*.whl
  if [ -d .whl/clip ]; then cp -r .whl/clip "$site/"; fi
  export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.94}"
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-/tmp/dreamvla_jax_cache}"
variant="${VARIANT:-bf16+cudnn+no_attn_dropout}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
profile=(--profile "$out/prof"); if [ -n "${NO_PROFILE:-}" ]; then profile=(); fi
timeout "${PROFILE_S:-300}" "$py" -m dreamvla_jax.benchmark train --config configs/calvin.py --batch "${BATCH:-8}" \
  --steps 3 --compare "$variant" "${profile[@]}" --json > "$out/profile.json" 2> "$out/profile.log"
echo "== profile: exit $?"
grep '^\[benchmark' "$out/profile.log" | cut -c1-400
# The traces, flat (trace_<variant>.json.gz): easy to copy off a machine.
for f in $(find "$out/prof" -name 'perfetto_trace.json.gz'); do
  cp "$f" "$out/trace_$(basename "$(dirname "$(dirname "$(dirname "$(dirname "$f")")")")").json.gz"
done
for d in "$out"/prof/*/; do cp "$d/hlo.txt.gz" "$out/hlo_$(basename "$d").txt.gz" 2>/dev/null; done
rm -rf "$out"/prof/*/plugins
if [ -n "${BATCH2-16}" ]; then
  timeout "${BATCH2_S:-200}" "$py" -m dreamvla_jax.benchmark train --config configs/calvin.py --batch "${BATCH2:-16}" \
    --steps 3 --compare "$variant" --json > "$out/batch2.json" 2> "$out/batch2.log"
  echo "== batch ${BATCH2:-16}: exit $?"
  grep '^\[benchmark' "$out/batch2.log" | cut -c1-400
fi
du -sh "$out"
