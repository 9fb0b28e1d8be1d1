#!/usr/bin/env bash
# Create a TPU VM or pod slice with a queued resource, ship this checkout to every worker and install it there.
#   TPU_NAME=moe-v5e ZONE=us-west4-a ACCELERATOR=v5litepod-8 bash scripts/tpu_vm_create.sh [--dry_run]
# Same as `scripts/tpu.sh create` (see there for every variable).
exec "$(dirname "$0")/tpu.sh" create "$@"
