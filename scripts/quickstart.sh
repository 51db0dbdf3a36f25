#!/usr/bin/env bash
# The main job in one command, on a fresh machine or an old one: set up if needed (scripts/setup.sh: ~3 min the
# first time, skipped in under a second once .venv is current), then the quickstart: a local server on the
# builtin toy model, a self-cognition LoRA trained through twinkle_client, its answer to "who are you?".
# Arguments go to `twinkle quickstart` (e.g. --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/twinkle quickstart "$@"
