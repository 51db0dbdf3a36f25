"""Fixtures: the Tinker routes on the real gateway app (``create_app``: the real ``Service`` on an in-process
mock-backend ``ModelWorker``, no Ray), in process (TestClient) and on a real socket (uvicorn, for the SDK).

Keys: ``tml-test`` and ``plain-key`` are alice's, ``tml-bob`` is bob's. The served model is ``fake/base``
(the mock backend's tiny model)."""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from twinkle.local_server import free_port
from twinkle.server.service import Service

KEYS = {"tml-test": "alice", "plain-key": "alice", "tml-bob": "bob"}
BASE_MODEL = "fake/base"


def make_service(workdir: Path) -> Service:
    from twinkle.server.app import worker_config
    from twinkle.server.config import parse_config
    from twinkle.server.worker import ModelWorker

    cfg = parse_config({
        "persistence": {"sqlite_path": str(workdir / "db.sqlite"), "checkpoint_root": str(workdir / "ck")},
        "auth": {"bootstrap_key_env": None},
        "models": [{"name": BASE_MODEL, "backend": "mock", "model_id": "mock://tiny", "max_lora_rank": 16}],
    })
    service = Service(cfg, {BASE_MODEL: [ModelWorker(worker_config(cfg.models[0]))]})
    for key, user in KEYS.items():
        service.add_bootstrap_key(key, user)
    return service


def make_app(service: Service):
    from twinkle.server.app import create_app

    return create_app(service.config, service=service)


@pytest.fixture
def service(tmp_path) -> Service:
    return make_service(tmp_path)


@pytest.fixture
def client(service):
    from fastapi.testclient import TestClient

    with TestClient(make_app(service)) as c:
        yield c


@pytest.fixture(scope="module")
def live_server() -> Iterator[tuple[str, Service]]:
    """uvicorn on a free loopback port (the SDK needs a real socket)."""
    import uvicorn

    service = make_service(Path(tempfile.mkdtemp(prefix="twinkle-tinker-")))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(make_app(service), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{port}", service
    server.should_exit = True
    thread.join(timeout=10)
