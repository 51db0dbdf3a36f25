#!/usr/bin/env bash
# Set up a development environment from a clean clone: a venv in .venv with everything the project,
# its tests, notebooks and the JupyterLab extension need. Idempotent; ~3 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."

# Already set up? A stamp in .venv records a hash of everything this script installs from; when it matches
# (and the venv's Python still runs), there is nothing to do: the second run takes well under a second.
# TWINKLE_FORCE_SETUP=1 runs the whole set-up anyway.
STAMP=.venv/.twinkle-setup-stamp
stamp_hash() {
  { cat pyproject.toml setup.py scripts/setup.sh extension/build.sh extension/package.json extension/yarn.lock
    find extension/src extension/style -type f | LC_ALL=C sort | xargs cat
    command -v node >/dev/null 2>&1 && echo node
  } | sha256sum | cut -d' ' -f1
}
if [ -z "${TWINKLE_FORCE_SETUP:-}" ] && [ -x .venv/bin/python ] && [ -f "$STAMP" ] \
   && [ "$(cat "$STAMP")" = "$(stamp_hash)" ]; then
  echo "set-up is current (.venv matches pyproject.toml, setup.sh and extension/): skipped"
  exit 0
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# torch first: the CPU wheel. A bare `torch` requirement would pull a multi-GB CUDA build.
# (On a GPU machine, install the CUDA torch you want before running this script.)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install -q "torch==2.13.0" || .venv/bin/pip install -q "torch>=2.4" --index-url https://download.pytorch.org/whl/cpu
fi
.venv/bin/pip install -q -e ".[all]"
# tinker-cookbook 0.6.1 pins tml-renderers, which the package index lacks: its other dependencies come from the
# `cookbook` extra above, the package itself without dependencies (tests/integration/test_tinker_cookbook.py).
.venv/bin/pip install -q --no-deps "tinker-cookbook==0.6.1"
# lm-evaluation-harness, for tests/integration/test_lm_eval.py only (its API model against the OpenAI-compatible
# routes): without its dependencies, which are datasets/metrics stacks its API model does not import (those it
# does are in the `dev` extra).
.venv/bin/pip install -q --no-deps "lm_eval==0.4.13"

# The JupyterLab extension (TypeScript, built offline with jlpm from the npm registry) goes into
# twinkle_client/labextension. A wheel ships it (setup.py); for this editable checkout we link it where the
# venv's JupyterLab looks, and enable the Jupyter-server half.
if command -v node >/dev/null 2>&1; then
  bash extension/build.sh
  mkdir -p .venv/share/jupyter/labextensions .venv/etc/jupyter/jupyter_server_config.d
  ln -sfn "$PWD/twinkle_client/labextension" .venv/share/jupyter/labextensions/twinkle-jupyterlab
  cp extension/jupyter-config/server-config/twinkle_client.json .venv/etc/jupyter/jupyter_server_config.d/
else
  echo "node not found: skipping the JupyterLab extension build (the Python packages work without it)"
fi
stamp_hash > "$STAMP"
echo "setup done: $(.venv/bin/python --version), torch $(.venv/bin/python -c 'import torch; print(torch.__version__)')"
