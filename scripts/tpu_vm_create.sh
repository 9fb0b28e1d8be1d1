#!/usr/bin/env bash
# Create a TPU VM (or pod slice) and install moe_jax on every worker.
#   TPU_NAME=moe-v4 ZONE=us-central2-b ACCELERATOR=v4-8 bash scripts/tpu_vm_create.sh
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
ACCELERATOR=${ACCELERATOR:-v4-8}
VERSION=${VERSION:-tpu-ubuntu2204-base}
REPO=${REPO:-https://github.com/your-org/moe_jax.git}
gcloud compute tpus tpu-vm create "$TPU_NAME" --zone "$ZONE" --accelerator-type "$ACCELERATOR" --version "$VERSION"
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  set -e
  sudo apt-get update -q && sudo apt-get install -yq python3-venv git
  [ -d moe_jax ] || git clone $REPO moe_jax
  cd moe_jax && python3 -m venv .venv && . .venv/bin/activate
  pip install -q -U pip && pip install -q -r requirements.txt && pip install -q 'jax[tpu]==0.10.2'
  python -c 'import jax; print(jax.process_index(), jax.local_device_count(), jax.device_count())'
"
