# Shared by the launch scripts (source it): `run CMD ARGS...` runs a command, or with DRY_RUN=1 prints it as one
# shell-quoted line starting with "+ " (arguments with spaces or quotes in single quotes), so a dry run shows exactly
# what would run and tests can parse it back with shlex.split.
# shellcheck shell=bash
DRY_RUN=${DRY_RUN:-0}

quote() {
  local a=$1
  if [[ $a =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
    printf '%s' "$a"
  else
    printf "'%s'" "${a//\'/\'\\\'\'}"
  fi
}

run() {
  if [ "$DRY_RUN" = 1 ]; then
    local a
    printf '+'
    for a in "$@"; do printf ' '; quote "$a"; done
    printf '\n'
  else
    "$@"
  fi
}

# Words of "$@" as one string a remote shell reads back as the same words.
join_quoted() {
  local out="" a
  for a in "$@"; do out+="$(quote "$a") "; done
  printf '%s' "${out% }"
}

# The user's checkout (HEAD plus uncommitted changes to tracked files) as a tar.gz at $1: `git stash create` makes a
# commit of the working tree without touching it; untracked files are not shipped.
archive_checkout() {
  local out=$1 root tree
  root=$(git -C "$(dirname "${BASH_SOURCE[0]}")" rev-parse --show-toplevel)
  tree=$(git -C "$root" stash create 2>/dev/null || true)
  run git -C "$root" archive --format=tar.gz --prefix=moe_jax/ -o "$out" "${tree:-HEAD}"
}

# A remote shell snippet that leaves .venv active with Python $PYTHON_VERSION: the pinned wheels (jax 0.10.2) need
# Python >= 3.11 and current TPU VM images ship 3.10, so uv (installed to ~/.local/bin if absent) installs that Python
# and makes the venv (a .venv of an older Python is replaced). Install into it with `uv pip install`.
PYTHON_VERSION=${PYTHON_VERSION:-3.11}
venv_snippet() {
  printf '%s' "command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh; \
export PATH=\$HOME/.local/bin:\$PATH; uv python install $PYTHON_VERSION; \
.venv/bin/python -c 'import sys; sys.exit(sys.version_info < ($(echo "$PYTHON_VERSION" | tr . ,)))' 2>/dev/null \
|| { rm -rf .venv && uv venv --python $PYTHON_VERSION .venv; }; . .venv/bin/activate"
}
