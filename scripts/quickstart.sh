#!/usr/bin/env bash
# Fresh machine -> trained model: create .venv, install the pinned requirements, train the CPU-sized MoE on the
# shipped corpus (King James Bible), then evaluate it and generate from it.
#   bash scripts/quickstart.sh [extra --config.x=y overrides]
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
# shellcheck source=/dev/null
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -r requirements.txt
python -m pip install -q -e . --no-deps
CONFIG=${CONFIG:-configs/cpu.py}
WORKDIR=${WORKDIR:-runs/cpu}
python -m moe_jax.train --config "$CONFIG" --workdir "$WORKDIR" "$@"
python -m moe_jax.eval --workdir "$WORKDIR"
python -m moe_jax.generate --workdir "$WORKDIR" --prompt "In the beginning" --max_new_tokens 60 --num_samples 2 \
  --temperature 0.8 --top_k 50
