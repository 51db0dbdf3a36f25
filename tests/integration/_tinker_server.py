"""A real Twinkle server for the Tinker integration tests and cookbook runs.

Prefers the shared ``twinkle_server`` fixture of ``tests/integration/conftest.py`` (``(base_url, api_key)`` or an
object with ``url``/``base_url`` and ``api_key``). Without it, starts the same gateway app (``create_app`` with an
in-process ``ModelWorker`` on ``builtin://tiny``, transformers backend) under uvicorn on a free loopback port,
once per test session.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import threading
import time
from typing import Any

import pytest

BASE_MODEL = "builtin://tiny"
_KEY = "tml-tinker-integration"
_cached: dict[str, tuple[str, str]] = {}


def _as_pair(obj: Any) -> tuple[str, str]:
    if isinstance(obj, (tuple, list)):
        return str(obj[0]).rstrip("/"), str(obj[1])
    url = getattr(obj, "url", None) or getattr(obj, "base_url", None)
    return str(url).rstrip("/"), str(obj.api_key)


def server_for(request: pytest.FixtureRequest) -> tuple[str, str]:
    try:
        return _as_pair(request.getfixturevalue("twinkle_server"))
    except pytest.FixtureLookupError:
        pass
    return start_inprocess()


def start_inprocess(models: list[dict[str, Any]] | None = None) -> tuple[str, str]:
    """The in-process server (one per distinct ``models``: config entries, default ``builtin://tiny`` alone)."""
    tag = json.dumps(models, sort_keys=True)
    if tag in _cached:
        return _cached[tag]
    import uvicorn

    from twinkle.server.app import create_app, worker_config
    from twinkle.server.config import parse_config
    from twinkle.server.worker import ModelWorker

    d = tempfile.mkdtemp(prefix="twinkle-tinker-it-")
    cfg = parse_config({
        "models": models or [{"backend": os.environ.get("TWINKLE_TEST_BACKEND", "transformers"), "model_id": BASE_MODEL}],
        "persistence": {"sqlite_path": f"{d}/server.db", "checkpoint_root": f"{d}/checkpoints"},
        "auth": {"bootstrap_key_env": None},
        "limits": {"max_adapters_per_user": 16},
    })
    workers = {m.served_name: [ModelWorker(worker_config(m), 0)] for m in cfg.models}
    app = create_app(cfg, workers)
    app.state.service.add_bootstrap_key(_KEY, "tinker-it")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True, name="twinkle-tinker-it").start()
    deadline = time.time() + 300
    while not server.started:
        if time.time() > deadline:
            raise RuntimeError("in-process Twinkle server did not start")
        time.sleep(0.05)
    _cached[tag] = (f"http://127.0.0.1:{port}", _KEY)
    return _cached[tag]
