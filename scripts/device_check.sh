#!/usr/bin/env bash
# The device check (scripts/device_check.py says what it runs and records), from a fresh machine:
#   bash scripts/device_check.sh --out DIR        # on the GPU/TPU machine; results in DIR
#   bash scripts/device_check.sh --cpu --out DIR  # CPU, smoke-sized (CI: tests/test_device_check.py)
# On an accelerator it first installs the wheels copied in .whl/ (bash scripts/device_prepare.sh makes them) into
# a target directory put in front of PYTHONPATH; the image's own JAX is used as it is.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}
cpu=0
for a in "$@"; do [ "$a" = "--cpu" ] && cpu=1; done
if [ "$cpu" = 0 ] && ls .whl/*.whl >/dev/null 2>&1; then
  SITE=${MOE_JAX_SITE:-/tmp/moe_jax_site}
  t0=$(date +%s)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    || { echo "device_check.sh: installing .whl/*.whl into $SITE failed" >&2; exit 3; }
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  echo "installed $(ls .whl/*.whl | wc -l) wheels from .whl into $SITE in $(( $(date +%s) - t0 )) s"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Several processes share the accelerator one after another (this one, training, pytest, torch): none preallocates
# 75% of its memory except the benchmark's own child process (device_check.py sets it there).
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}
# One persistent compilation cache for all of them: the resumed training run, the comparison's arms and the tests
# load what an earlier process compiled instead of compiling it again.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/moe_jax_device_check_jax_cache}
exec "$PY" -u scripts/device_check.py "$@"
