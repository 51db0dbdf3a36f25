from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import httpx
import pytest

# share the Jupyter-server launcher with tests/extension
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "extension"))

from browser_env import launch, missing, stop  # noqa: E402


@pytest.fixture(scope="session")
def panel_server(tmp_path_factory):
    """A real Twinkle server (Ray Serve, one mock-backend model) with a bootstrap key; one retry on a failed start."""
    why = missing()
    if why:
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)
    tmp = tmp_path_factory.mktemp("twinkle-server")
    for attempt in (1, 2):
        proc, url, log = launch(tmp)
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline:
            try:
                if httpx.get(url + "/api/v1/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            stop(proc)
            log.close()
            if attempt == 2:
                raise RuntimeError("twinkle server did not start:\n" + (tmp / "server.log").read_text()[-3000:])
            continue
        try:
            yield url
        finally:
            stop(proc)
            log.close()
        return


