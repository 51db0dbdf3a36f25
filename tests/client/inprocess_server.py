"""The real gateway (``twinkle.server.create_app`` + a mock-backend ``ModelWorker``) served in-process to the
sync client through ``SyncASGITransport`` — no sockets, no Ray."""

from __future__ import annotations

from pathlib import Path

import httpx

from twinkle_client._transport import SyncASGITransport


class InProcessServer:
    def __init__(self, tmp: Path, *, keys: dict[str, str] | None = None, lease_seconds: float = 60.0):
        from twinkle.server.app import create_app, worker_config
        from twinkle.server.config import ServerConfig
        from twinkle.server.worker import ModelWorker

        cfg = ServerConfig.model_validate({
            "persistence": {"sqlite_path": str(tmp / "server.db"), "checkpoint_root": str(tmp / "ckpt")},
            "lease_seconds": lease_seconds,
            "models": [{"backend": "mock", "model_id": "mock://tiny", "max_adapters": 8, "max_lora_rank": 16}],
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

    def worker_status(self) -> dict:
        """The worker's full status (includes ``mixed_batches`` and ``recent_batches``)."""
        return self.transport._portal.call(self.worker.status)

    def close(self) -> None:
        self.transport.shutdown_app()
