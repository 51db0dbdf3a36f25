"""The real gateway (``twinkle.server.create_app`` + a mock-backend ``ModelWorker``) served in-process to the
sync client through ``SyncASGITransport`` — no sockets, no Ray. ``FaultyTransport`` sits in front of it to
simulate network blips and lost replies, and records what the client sent."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from twinkle_client._transport import SyncASGITransport

KEY = "key-alice"  # a bootstrap key of every InProcessServer (user "alice"; "key-bob" is "bob")


class InProcessServer:
    def __init__(self, tmp: Path, *, keys: dict[str, str] | None = None, lease_seconds: float = 60.0,
                 seq_grace_s: float | None = None):
        """``seq_grace_s``: the scheduler's wait for a missing seq_id (None: the server's default)."""
        from twinkle.server.app import create_app, worker_config
        from twinkle.server.config import ServerConfig
        from twinkle.server.worker import ModelWorker

        cfg = ServerConfig.model_validate({
            "persistence": {"sqlite_path": str(tmp / "server.db"), "checkpoint_root": str(tmp / "ckpt")},
            "lease_seconds": lease_seconds,
            "models": [{"backend": "mock", "model_id": "mock://tiny", "max_adapters": 8, "max_lora_rank": 16,
                        **({"scheduler": {"seq_grace_s": seq_grace_s}} if seq_grace_s is not None else {})}],
        })
        m = cfg.models[0]
        self.worker = ModelWorker(worker_config(m))
        self.app = create_app(cfg, {m.served_name: [self.worker]})
        self.service = self.app.state.service
        for key, user in (keys or {"key-alice": "alice", "key-bob": "bob"}).items():
            self.service.add_bootstrap_key(key, user)
        self.transport = SyncASGITransport(self.app, startup=self.service.start, shutdown=self.service.stop)

    def wrap(self, handler) -> httpx.BaseTransport:
        """A transport that lets ``handler(request, send)`` interfere with requests (drop replies, …)."""
        inner = self.transport

        class _Wrapped(httpx.BaseTransport):
            def handle_request(self, request: httpx.Request) -> httpx.Response:
                return handler(request, inner.handle_request)

        return _Wrapped()

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` (sync or async) on the app's event loop."""
        return self.transport._portal.call(fn, *args)

    def get(self, path: str, key: str = "key-alice") -> Any:
        """``GET /api/v1/twinkle/<path>`` on the real routes (what the server holds, read as a client would)."""
        resp = self.transport.handle_request(httpx.Request("GET", f"http://srv/api/v1/twinkle/{path}",
                                                           headers={"x-api-key": key}))
        resp.read()
        assert resp.status_code == 200, resp.text
        return resp.json()

    def expire_sessions(self) -> None:
        """Let every lease lapse now (the reaper's pass, an hour from now)."""
        self.call(self.service.reap, time.time() + 3600)

    def worker_status(self) -> dict:
        """The worker's full status (includes ``mixed_batches`` and ``recent_batches``)."""
        return self.transport._portal.call(self.worker.status)

    def close(self) -> None:
        self.transport.shutdown_app()


class FaultyTransport(httpx.BaseTransport):
    """The network between the client and an ``InProcessServer``: ``down`` makes every request fail to connect;
    ``drop_next_response = n`` lets the server do the work and then loses the next ``n`` replies (futures polls
    excepted). ``requests`` records ``(method, route, json body)``; ``heartbeats`` counts accepted heartbeats."""

    PREFIX = "/api/v1/twinkle/"

    def __init__(self, server: InProcessServer):
        self.server = server
        self.down = False
        self.drop_next_response = 0
        self.requests: list[tuple[str, str, Any]] = []
        self.heartbeats = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if self.down:
            raise httpx.ConnectError("connection refused", request=request)
        path = request.url.path
        route = path[len(self.PREFIX):] if path.startswith(self.PREFIX) else path
        content = request.read()
        body = json.loads(content) if content and "json" in request.headers.get("content-type", "") else None
        self.requests.append((request.method, route, body))
        resp = self.server.transport.handle_request(request)
        resp.read()
        if resp.status_code == 200 and route.endswith("/heartbeat"):
            self.heartbeats += 1
        if self.drop_next_response > 0 and not route.startswith("futures/"):
            self.drop_next_response -= 1
            raise httpx.ReadError("connection reset", request=request)
        return resp

    def seq_ids(self, run_id: str) -> list[int]:
        """The ``seq_id`` of every request sent for ``run_id``, in order (retries included)."""
        return [b["seq_id"] for (_, r, b) in self.requests
                if r.startswith(f"runs/{run_id}/") and isinstance(b, dict) and "seq_id" in b]
