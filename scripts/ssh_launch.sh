#!/usr/bin/env bash
# Train on plain hosts reachable by ssh (one JAX process per host, driving all its accelerators).
#   scripts/ssh_launch.sh --hosts hosts.txt [--ship] [--dir moe_jax] [--port 12355] [--dry_run] -- TRAIN FLAGS
# hosts.txt: one host per line ([user@]host; '#' comments). The first host runs process 0 and the coordinator
# (COORDINATOR overrides the address the others use to reach it). --ship copies this checkout (git archive of the
# working tree) to DIR on every host and installs it (a Python 3.11 .venv made by uv, PYTHON_VERSION to change it,
# + requirements.txt; set JAX_EXTRA, e.g. cuda12, for an accelerator build of jax). TRAIN FLAGS must include --config
# and --workdir; the workdir must be one directory every host sees (a shared filesystem). Logs: DIR/train.log on each
# host.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=scripts/launch_lib.sh
. "$HERE/launch_lib.sh"
HOSTS_FILE="" SHIP=0 DIR=moe_jax PORT=12355 TRAIN=()
while [ $# -gt 0 ]; do
  case $1 in
    --hosts) HOSTS_FILE=$2; shift ;;
    --ship) SHIP=1 ;;
    --dir) DIR=$2; shift ;;
    --port) PORT=$2; shift ;;
    --dry_run) DRY_RUN=1 ;;
    --) shift; TRAIN=("$@"); break ;;
    *) echo "error: unknown argument $1 (train flags go after --)" >&2; exit 2 ;;
  esac
  shift
done
[ -n "$HOSTS_FILE" ] && [ -f "$HOSTS_FILE" ] || { echo "error: --hosts FILE: a file of hosts, one per line" >&2; exit 2; }
mapfile -t HOSTS < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' "$HOSTS_FILE" | grep -v '^$')
[ ${#HOSTS[@]} -ge 1 ] || { echo "error: --hosts $HOSTS_FILE lists no host" >&2; exit 2; }
[ ${#TRAIN[@]} -ge 1 ] || { echo "error: give the train flags after --, e.g. -- --config configs/moe.py --workdir /shared/runs/moe" >&2; exit 2; }
COORDINATOR=${COORDINATOR:-${HOSTS[0]#*@}}
N=${#HOSTS[@]}

if [ "$SHIP" = 1 ]; then
  TARBALL=/tmp/moe_jax-ship.tar.gz
  archive_checkout "$TARBALL"
  JAX_PKG="jax${JAX_EXTRA:+[$JAX_EXTRA]}==${JAX_VERSION:-0.10.2}"
  for host in "${HOSTS[@]}"; do
    run scp "$TARBALL" "$host:moe_jax.tar.gz"
    run ssh "$host" "set -e; mkdir -p $DIR && tar xzf moe_jax.tar.gz -C $DIR --strip-components=1 && rm moe_jax.tar.gz; \
cd $DIR; $(venv_snippet); uv pip install -q -r requirements.txt '$JAX_PKG'"
  done
fi
FLAGS=$(join_quoted "${TRAIN[@]}")
for i in "${!HOSTS[@]}"; do
  run ssh "${HOSTS[$i]}" "cd $DIR && . .venv/bin/activate && nohup python -m moe_jax.train \
--coordinator_address=$COORDINATOR:$PORT --num_processes=$N --process_id=$i $FLAGS > train.log 2>&1 < /dev/null &"
done
