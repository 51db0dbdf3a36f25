"""Fixtures: the Tinker router on a FastAPI app backed by ``FakeService``, in process and on a real socket."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
from fake_service import FakeService


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_app(service: FakeService):
    from fastapi import FastAPI

    from twinkle.server.tinker import tinker_router

    app = FastAPI()
    app.include_router(tinker_router(lambda: service), prefix="/api/v1")
    return app


@pytest.fixture
def fake() -> FakeService:
    return FakeService()


@pytest.fixture
def client(fake):
    from fastapi.testclient import TestClient

    with TestClient(make_app(fake)) as c:
        yield c


@pytest.fixture(scope="module")
def live_server() -> Iterator[tuple[str, FakeService]]:
    """uvicorn on a free loopback port (the SDK needs a real socket)."""
    import uvicorn

    service = FakeService()
    port = _free_port()
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
