#!/usr/bin/env bash
# Launch training on every worker of a TPU VM / pod slice (every slice with SLICES > 1). The workdir must be one
# directory every host sees (a bucket mounted with gcsfuse at the same path on each worker, or a shared filesystem).
#   TPU_NAME=moe-v5e ZONE=us-west4-a WORKDIR=/mnt/gcs/runs/moe CONFIG=configs/moe.py \
#     bash scripts/tpu_train.sh [--dry_run] [-- --config.mesh.shape='(-1,1,1)' ...]
# Same as `scripts/tpu.sh train` (see there).
exec "$(dirname "$0")/tpu.sh" train "$@"
