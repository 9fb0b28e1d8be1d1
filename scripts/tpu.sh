#!/usr/bin/env bash
# Cloud TPU VMs and pod slices (one or several slices over DCN), from this checkout:
#   scripts/tpu.sh check [--dry_run] [-- FLAGS]  compile CONFIG for ACCELERATOR here (python -m moe_jax.aot)
#   scripts/tpu.sh create [--dry_run]            check -> queued resource -> wait until ACTIVE -> ship -> install
#   scripts/tpu.sh ship [--dry_run]              this checkout (git archive of the working tree) -> every worker
#   scripts/tpu.sh install [--dry_run]           Python 3.11 venv (uv) + requirements.txt + jax[tpu] on every worker
#   scripts/tpu.sh train [--dry_run] [-- FLAGS]  python -m moe_jax.train --distributed on every worker (nohup)
#   scripts/tpu.sh logs [--dry_run]              tail -f worker 0's train.log (WORKER=all: every worker's)
#   scripts/tpu.sh run [--dry_run] -- COMMAND    any shell command on every worker (e.g. mount a bucket)
#   scripts/tpu.sh delete [--dry_run]            delete the queued resource and its TPU VMs
# Environment: TPU_NAME (queued resource id; the VMs are TPU_NAME, or TPU_NAME-0 .. -N-1 with SLICES=N > 1), ZONE,
# ACCELERATOR (e.g. v5litepod-8, v5p-32, v6e-32), RUNTIME (default from ACCELERATOR), SLICES (default 1), SPOT=1
# (spot capacity), PROJECT (default: gcloud's), CONFIG (default configs/moe.py), WORKDIR (a directory every worker
# sees, e.g. a gcsfuse mount; required by train), AOT_CHECK=0 (create skips the check; the check needs the compilers
# here: pip install -r requirements-aot.txt), PYTHON (for the check, default python), PYTHON_VERSION (workers', 3.11).
# Every worker runs the same train command; JAX finds the other
# workers and slices itself (Cloud TPU metadata), and the trainer saves and exits with status 3 on preemption or
# maintenance: `scripts/tpu.sh train` again resumes. BUILD.md has the exact commands per TPU type.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=scripts/launch_lib.sh
. "$HERE/launch_lib.sh"

usage() { sed -n '2,19p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
[ $# -ge 1 ] || usage 2
CMD=$1; shift
EXTRA=()
while [ $# -gt 0 ]; do
  case $1 in
    --dry_run) DRY_RUN=1 ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) usage 0 ;;
    *) echo "error: unknown argument $1 (train flags go after --)" >&2; exit 2 ;;
  esac
  shift
done

: "${TPU_NAME:?set TPU_NAME (the queued resource and TPU VM name)}" "${ZONE:?set ZONE, e.g. us-central1-a}"
ACCELERATOR=${ACCELERATOR:-v5litepod-8}
SLICES=${SLICES:-1}
CONFIG=${CONFIG:-configs/moe.py}
JAX_VERSION=${JAX_VERSION:-0.10.2}
case $ACCELERATOR in
  v5litepod-*|v5e-*) DEFAULT_RUNTIME=v2-alpha-tpuv5-lite ;;
  v5p-*) DEFAULT_RUNTIME=v2-alpha-tpuv5 ;;
  v6e-*) DEFAULT_RUNTIME=v2-alpha-tpuv6e ;;
  *) DEFAULT_RUNTIME=tpu-ubuntu2204-base ;;
esac
RUNTIME=${RUNTIME:-$DEFAULT_RUNTIME}
GCLOUD=(gcloud)
[ -n "${PROJECT:-}" ] && GCLOUD+=(--project "$PROJECT")

nodes() {
  if [ "$SLICES" -gt 1 ]; then
    for ((i = 0; i < SLICES; i++)); do echo "$TPU_NAME-$i"; done
  else
    echo "$TPU_NAME"
  fi
}

on_workers() {  # on_workers WORKER COMMAND: ssh COMMAND to WORKER (all / 0 / ...) of every slice
  local worker=$1 command=$2 node
  for node in $(nodes); do
    run "${GCLOUD[@]}" compute tpus tpu-vm ssh "$node" --zone "$ZONE" --worker="$worker" --command "$command"
  done
}

train_flags() {  # the config overrides every train and check uses: bfloat16 and the --config.* flags after --
  local a
  printf '%s\n' --config.model.dtype=bfloat16
  for a in ${EXTRA[@]+"${EXTRA[@]}"}; do [[ $a == --config.* ]] && printf '%s\n' "$a"; done
  return 0
}

check() {  # the compile check: a config that does not fit ACCELERATOR fails here, before a VM is paid for
  local overrides
  mapfile -t overrides < <(train_flags)
  (cd "$HERE/.." && run "${PYTHON:-python}" -m moe_jax.aot --config "$CONFIG" --target "$ACCELERATOR" \
     --slices "$SLICES" "${overrides[@]}") \
    || { echo "error: the compile check of $CONFIG for $ACCELERATOR failed (above); fix the config, or AOT_CHECK=0" \
              "to skip it" >&2; exit 2; }
}

create() {
  [ "${AOT_CHECK:-1}" = 0 ] || check
  local args=(compute tpus queued-resources create "$TPU_NAME" --zone "$ZONE" --accelerator-type "$ACCELERATOR"
              --runtime-version "$RUNTIME")
  if [ "$SLICES" -gt 1 ]; then args+=(--node-count "$SLICES" --node-prefix "$TPU_NAME"); else args+=(--node-id "$TPU_NAME"); fi
  [ "${SPOT:-0}" = 1 ] && args+=(--spot)
  run "${GCLOUD[@]}" "${args[@]}"
  if [ "$DRY_RUN" = 1 ]; then
    run "${GCLOUD[@]}" compute tpus queued-resources describe "$TPU_NAME" --zone "$ZONE" --format='value(state.state)'
  else
    local state=""
    until [ "$state" = ACTIVE ]; do
      state=$("${GCLOUD[@]}" compute tpus queued-resources describe "$TPU_NAME" --zone "$ZONE" --format='value(state.state)')
      echo "queued resource $TPU_NAME: ${state:-unknown}"
      case $state in FAILED|SUSPENDED) exit 1 ;; ACTIVE) ;; *) sleep 30 ;; esac
    done
  fi
  ship
  install
}

ship() {
  local tarball=/tmp/moe_jax-$TPU_NAME.tar.gz node
  archive_checkout "$tarball"
  for node in $(nodes); do
    run "${GCLOUD[@]}" compute tpus tpu-vm scp "$tarball" "$node:moe_jax.tar.gz" --zone "$ZONE" --worker=all
  done
  on_workers all "rm -rf moe_jax.new && mkdir moe_jax.new && tar xzf moe_jax.tar.gz -C moe_jax.new && \
mkdir -p moe_jax && cp -a moe_jax.new/moe_jax/. moe_jax/ && rm -rf moe_jax.new moe_jax.tar.gz"
}

install() {
  on_workers all "set -e; cd moe_jax; $(venv_snippet); \
uv pip install -q -r requirements.txt 'jax[tpu]==$JAX_VERSION'; \
python -c 'import jax; print(jax.process_index(), jax.local_device_count(), jax.device_count())'"
}

train() {
  : "${WORKDIR:?set WORKDIR to a directory every worker sees (e.g. a gcsfuse mount: see BUILD.md)}"
  local flags
  flags=$(join_quoted --distributed --config "$CONFIG" --workdir "$WORKDIR" --config.model.dtype=bfloat16 \
          ${EXTRA[@]+"${EXTRA[@]}"})
  on_workers all "cd moe_jax && . .venv/bin/activate && \
nohup python -m moe_jax.train $flags > train.log 2>&1 < /dev/null & echo started on \$(hostname)"
}

logs() {
  on_workers "${WORKER:-0}" "tail -n 50 -f moe_jax/train.log"
}

case $CMD in
  check) check ;;
  create) create ;;
  ship) ship ;;
  install) install ;;
  train) train ;;
  logs) logs ;;
  run) [ ${#EXTRA[@]} -gt 0 ] || { echo "error: run needs a command after --" >&2; exit 2; }
       on_workers "${WORKER:-all}" "${EXTRA[*]}" ;;
  delete) run "${GCLOUD[@]}" compute tpus queued-resources delete "$TPU_NAME" --zone "$ZONE" --force --quiet ;;
  *) echo "error: unknown command $CMD" >&2; usage 2 ;;
esac
