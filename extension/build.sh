#!/usr/bin/env bash
# Builds the JupyterLab extension into twinkle_client/labextension/ (what the wheel ships).
#   bash extension/build.sh            # install node deps (from yarn.lock) + build
#   bash extension/build.sh --test     # ... and run the front-end unit tests (vitest)
# Needs: node >= 20.19, and a Python with jupyterlab (for `jlpm` and `jupyter builder`); set PYTHON to choose it.
set -euo pipefail
cd "$(dirname "$0")"
ROOT="$(cd .. && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON="$(command -v python3)"
BIN="$(dirname "$PYTHON")"
export PATH="$BIN:$PATH"
# The registry comes from npm's own config (no host is written into the repository).
if [ -z "${YARN_NPM_REGISTRY_SERVER:-}" ] && command -v npm >/dev/null; then
  YARN_NPM_REGISTRY_SERVER="$(npm config get registry | sed 's:/*$::')"
  export YARN_NPM_REGISTRY_SERVER
fi
JLPM="$BIN/jlpm"
[ -x "$JLPM" ] || JLPM="$PYTHON -m jupyterlab.jlpmapp"
t0=$(date +%s)
$JLPM install --immutable
t1=$(date +%s)
$JLPM build
t2=$(date +%s)
test -f "$ROOT/twinkle_client/labextension/package.json"
echo "extension/build.sh: install $((t1 - t0))s, build $((t2 - t1))s -> twinkle_client/labextension/"
if [ "${1:-}" = "--test" ]; then
  $JLPM test
fi
