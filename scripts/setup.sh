#!/usr/bin/env bash
# Set up a development environment from a clean clone: a venv in .venv with everything the project,
# its tests, notebooks and the JupyterLab extension need. Idempotent; ~3 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."

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

# The JupyterLab extension (TypeScript) is built into twinkle_client/labextension when node is available.
if [ -f extension/build.sh ] && command -v node >/dev/null 2>&1; then
  bash extension/build.sh
fi
echo "setup done: $(.venv/bin/python --version), torch $(.venv/bin/python -c 'import torch; print(torch.__version__)')"
