#!/usr/bin/env bash
# Train on a Cloud TPU pod slice: one process per TPU VM worker, all started with --worker=all.
#
#   launch/tpu_pod.sh create                 # create the TPU VM slice
#   launch/tpu_pod.sh sync                   # copy this checkout (git ls-files) to every worker
#   launch/tpu_pod.sh setup                  # venv + requirements + jax[tpu] on every worker
#   launch/tpu_pod.sh start -- <train args>  # start training on every worker (detached; logs on each)
#   launch/tpu_pod.sh logs                   # follow worker 0's log
#   launch/tpu_pod.sh stop                   # SIGTERM the trainers (they save a checkpoint, then exit)
#   launch/tpu_pod.sh ssh [-- command]       # a shell on worker 0, or a command on all workers
#   launch/tpu_pod.sh delete                 # delete the slice
#
# Environment: TPU_NAME (required), ZONE (required), PROJECT (default: gcloud's), ACCELERATOR
# (default v4-32), RUNTIME_VERSION (default tpu-ubuntu2204-base), REMOTE_DIR (default dreamvla_jax, in
# the remote home), PYTHON (remote interpreter for the venv, default python3).
# --workdir must be on a file system every worker mounts at the same path (Filestore NFS, gcsfuse):
# all processes write the Orbax checkpoint together. --config.data.root/features must exist on every
# worker (each reads only its slice of every batch).
set -euo pipefail

usage() {
  sed -n '2,20p' "$0" >&2
  exit 2
}

[[ $# -ge 1 ]] || usage
cmd=$1
shift
if [[ $# -gt 0 ]]; then
  [[ $1 == "--" ]] || usage
  shift
fi

: "${TPU_NAME:?set TPU_NAME to the TPU VM name}"
: "${ZONE:?set ZONE, e.g. us-central2-b}"
accelerator=${ACCELERATOR:-v4-32}
runtime=${RUNTIME_VERSION:-tpu-ubuntu2204-base}
remote_dir=${REMOTE_DIR:-dreamvla_jax}
remote_python=${PYTHON:-python3}
gcloud_tpu=(gcloud compute tpus tpu-vm)
where=(--zone "$ZONE")
if [[ -n ${PROJECT:-} ]]; then
  where+=(--project "$PROJECT")
fi

on_all() {
  "${gcloud_tpu[@]}" ssh "$TPU_NAME" "${where[@]}" --worker=all --command "$1"
}

case $cmd in
  create)
    "${gcloud_tpu[@]}" create "$TPU_NAME" "${where[@]}" --accelerator-type "$accelerator" --version "$runtime"
    ;;
  sync)
    root=$(git rev-parse --show-toplevel)
    tarball=$(mktemp --suffix=.tar.gz)
    trap 'rm -f "$tarball"' EXIT
    # Tracked and new (not ignored) files: what `git status` would commit, without runs/ or .venv/.
    git -C "$root" ls-files -z --cached --others --exclude-standard | tar -C "$root" --null -T - -czf "$tarball"
    "${gcloud_tpu[@]}" scp "$tarball" "$TPU_NAME:dreamvla_jax_sync.tar.gz" "${where[@]}" --worker=all
    on_all "mkdir -p $remote_dir && tar -xzf dreamvla_jax_sync.tar.gz -C $remote_dir && rm dreamvla_jax_sync.tar.gz"
    ;;
  setup)
    # torch (teachers, parity tests) from the CPU wheel index: PyPI's build would pull CUDA. jax[tpu] at
    # the pinned jax version adds libtpu.
    on_all "cd $remote_dir && $remote_python -m venv .venv && .venv/bin/pip install -q -U pip && \
PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu .venv/bin/pip install -q -r requirements.txt && \
.venv/bin/pip install -q \"jax[tpu]==\$(sed -n 's/^jax==//p' requirements.txt)\""
    ;;
  start)
    [[ $# -gt 0 ]] || usage
    args=$(printf '%q ' "$@")
    # DREAMVLA_TPU_POD=1: dreamvla_jax.distributed asks the TPU metadata for the coordinator and ids.
    on_all "cd $remote_dir && mkdir -p logs && DREAMVLA_TPU_POD=1 nohup .venv/bin/python -m dreamvla_jax.train \
$args > logs/train.log 2>&1 < /dev/null & echo \$! > logs/train.pid; echo started on \$(hostname)"
    ;;
  logs)
    "${gcloud_tpu[@]}" ssh "$TPU_NAME" "${where[@]}" --worker=0 --command "tail -n 100 -F $remote_dir/logs/train.log"
    ;;
  stop)
    on_all "cd $remote_dir && kill -TERM \$(cat logs/train.pid) 2>/dev/null || true"
    ;;
  ssh)
    if [[ $# -gt 0 ]]; then
      on_all "$(printf '%q ' "$@")"
    else
      "${gcloud_tpu[@]}" ssh "$TPU_NAME" "${where[@]}" --worker=0
    fi
    ;;
  delete)
    "${gcloud_tpu[@]}" delete "$TPU_NAME" "${where[@]}" --quiet
    ;;
  *)
    usage
    ;;
esac
