"""The quickstart on a REAL server: ``run_quickstart_remote`` against the shared test server, and the
``twinkle quickstart`` command's own path (start a local server, train through twinkle_client, sample, stop)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from twinkle.quickstart import QuickstartConfig, run_quickstart_remote

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def test_quickstart_through_twinkle_client_learns_the_name(twinkle_server):
    caps = httpx.get(f"{twinkle_server.url}/api/v1/twinkle/capabilities",
                     headers={"Authorization": f"Bearer {twinkle_server.api_key}"}, timeout=30).json()
    tiny = next(m for m in caps["base_models"] if m["name"] == "builtin://tiny")
    assert tiny["tokenizer_id"] == "builtin://tiny"  # the client rebuilds it, not the server's cache path

    cfg = QuickstartConfig(name="Nova", steps=60, seed=0)
    res = run_quickstart_remote(cfg, url=twinkle_server.url, api_key=twinkle_server.api_key, progress=False)
    assert res.steps == 60
    assert res.last_loss < 0.5 * res.first_loss, res.losses
    assert "Nova" in res.answer, res.answer
    assert res.extra["server"] == twinkle_server.url and res.extra["run_id"]
    assert set(res.timings) == {"set-up", "training", "sampling"}


def _server_launches() -> set[int]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return {int(line.split()[0]) for line in out.splitlines()[1:]
            if "twinkle.server.cli launch" in line and "twinkle-server-" in line}


def test_cli_quickstart_starts_trains_samples_and_stops_a_server():
    before = _server_launches()
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    r = subprocess.run([sys.executable, "-m", "twinkle", "quickstart", "--quiet", "--steps", "60", "--name", "Nova"],
                       capture_output=True, text=True, env=env, timeout=900)
    out = r.stdout
    assert r.returncode == 0, out[-3000:] + r.stderr[-3000:]
    ready = re.search(r"server ready at http://127\.0\.0\.1:\d+ in [\d.]+ s \(store, key and log in (\S+)\)", out)
    assert ready, out
    assert "| where        | local server (twinkle_client)" in out
    for phase in ("server start", "training", "sampling", "shutdown", "total"):
        assert re.search(rf"\| {phase} +\| [\d.]+ s", out), (phase, out)
    assert re.search(r"A: .*Nova", out) and "OK: the loss fell by more than half" in out, out
    assert "exit code 0); nothing left running" in out, out
    # the temporary store/config folder is gone and no server process of this run is left
    assert not Path(ready.group(1)).exists()
    assert _server_launches() <= before
