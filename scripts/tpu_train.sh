#!/usr/bin/env bash
# Launch training on every worker of a TPU VM / pod slice. jax.distributed initialises itself on Cloud TPU, every
# host runs the same command, and orbax writes one checkpoint. On a pod slice the workdir must be one directory that
# every host sees: a bucket mounted with gcsfuse at the same path on each worker, or a shared filesystem.
#   TPU_NAME=moe-v4 ZONE=us-central2-b WORKDIR=/mnt/gcs/runs/moe CONFIG=configs/moe.py \
#     bash scripts/tpu_train.sh --config.model.dtype=bfloat16 --config.mesh.shape='(-1,1,1)'
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${WORKDIR:?set WORKDIR}"
CONFIG=${CONFIG:-configs/moe.py}
EXTRA="$*"
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  cd moe_jax && . .venv/bin/activate && git pull -q || true
  nohup python -m moe_jax.train --distributed --config $CONFIG --workdir $WORKDIR --config.model.dtype=bfloat16 $EXTRA \
    > train.log 2>&1 &
  echo started on \$(hostname)
"
