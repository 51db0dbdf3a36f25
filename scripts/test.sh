#!/usr/bin/env bash
# All the tests in one command (this is what CI runs: .ci/run calls it): set up if needed (scripts/setup.sh,
# skipped in under a second once .venv is current; Debian's chromium and prometheus when missing), then ruff,
# mypy and pytest. Arguments go to pytest, e.g.
#   bash scripts/test.sh                          # everything (~20 min on 2 cores)
#   bash scripts/test.sh -m "not slow" -n 2       # the fast tier
#   bash scripts/test.sh tests/server -k config   # a few tests
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
bash scripts/setup.sh
# Browser tests need Debian's chromium (playwright-core drives it; no browser download); the observability
# acceptance test scrapes a real server with Debian's prometheus. Each is installed once, when missing.
if ! command -v chromium >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
  apt-get update -qq || true
fi
if ! command -v chromium >/dev/null 2>&1; then
  apt-get install -y -qq chromium >/dev/null || echo "chromium not installed: browser tests will be skipped"
fi
if ! command -v prometheus >/dev/null 2>&1; then
  apt-get install -y -qq --no-install-recommends prometheus >/dev/null \
    || echo "prometheus not installed: its test will be skipped"
fi
echo "== set-up took $(( $(date +%s) - start )) s"
.venv/bin/ruff check .
# Types: mypy over all of twinkle and twinkle_client (config: pyproject [tool.mypy]).
.venv/bin/mypy
.venv/bin/python -m pytest "$@"
echo "== tests took $(( $(date +%s) - start )) s"
