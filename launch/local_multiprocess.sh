#!/usr/bin/env bash
# N CPU processes on this machine that share one global mesh (try multi-host code without a cluster).
#
#   launch/local_multiprocess.sh N -- <arguments of python -m dreamvla_jax.train>
#
# Each process gets DEVICES_PER_PROCESS fake CPU devices (default 4), so the mesh has N x that many.
# Environment (all optional): DEVICES_PER_PROCESS, PORT (coordinator port; default: a free one),
# PYTHON (default: python), MODULE (default: dreamvla_jax.train; dreamvla_jax.eval works too).
# Exits with the first non-zero status of any process, after killing the others; Ctrl-C or SIGTERM
# stops all processes at one step with a checkpoint (rerun the same command to resume).
set -euo pipefail

usage() {
  echo "usage: $0 N -- <train arguments>" >&2
  exit 2
}

[[ $# -ge 2 && $1 =~ ^[1-9][0-9]*$ && $2 == "--" ]] || usage
num=$1
shift 2

python=${PYTHON:-python}
module=${MODULE:-dreamvla_jax.train}
devices=${DEVICES_PER_PROCESS:-4}
port=${PORT:-$("$python" -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')}

pids=()
# shellcheck disable=SC2317  # only reached through the traps below
signal_all() {
  local pid
  for pid in "${pids[@]}"; do
    kill "-$1" "$pid" 2>/dev/null || true
  done
}
# Ctrl-C / SIGTERM: every process gets SIGTERM, they agree on a step, save a checkpoint together, exit.
# shellcheck disable=SC2317
stop() {
  signal_all TERM
  wait
  exit 143
}
trap stop INT TERM
# A process that failed leaves the others blocked in collectives: kill them (no checkpoint is possible).
trap 'signal_all KILL' EXIT

for ((i = 0; i < num; i++)); do
  DREAMVLA_COORDINATOR="localhost:$port" DREAMVLA_NUM_PROCESSES="$num" DREAMVLA_PROCESS_ID="$i" \
    JAX_PLATFORMS=cpu XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$devices" \
    "$python" -m "$module" "$@" &
  pids+=("$!")
done

status=0
for ((left = num; left > 0; left--)); do
  wait -n || { status=$?; break; }
done
exit "$status"
