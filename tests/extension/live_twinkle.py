"""The real Twinkle gateway for the extension's tests: ``create_app`` (the real ``Service`` on an in-process
mock-backend ``ModelWorker``, no Ray) under uvicorn on a free loopback port, seeded through the native API with
what the panel shows: alice's session, one run trained 3 steps (metrics) with checkpoints ``step-1``/``step-2``.

``calls`` records every request (``"GET /api/v1/twinkle/capabilities"``); ``hide_load = True`` answers the
load route with a 404, as an older server without it does."""

from __future__ import annotations

import json
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import httpx

from twinkle.net import free_port

API = "/api/v1/twinkle"
MODEL = "tiny"
_DATUM = {
    "model_input": {"chunks": [{"type": "encoded_text", "tokens": [5, 9, 17, 33]}]},
    "loss_fn_inputs": {"target_tokens": {"data": [9, 17, 33, 2], "dtype": "int64"},
                       "weights": {"data": [1, 1, 1, 1], "dtype": "float32"}},
}

_Scope = MutableMapping[str, Any]
_Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
_Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class LiveTwinkle:
    def __init__(self, api_key: str = "good-key-123456", workdir: Path | None = None) -> None:
        from twinkle.server.app import create_app, worker_config
        from twinkle.server.config import parse_config
        from twinkle.server.worker import ModelWorker

        tmp = workdir or Path(tempfile.mkdtemp(prefix="twinkle-ext-"))
        cfg = parse_config({
            "persistence": {"sqlite_path": str(tmp / "db.sqlite"), "checkpoint_root": str(tmp / "ck")},
            "auth": {"bootstrap_key_env": None},
            "models": [{"name": MODEL, "backend": "mock", "model_id": "mock://tiny", "max_adapters": 4,
                        "max_lora_rank": 16}],
        })
        self.api_key = api_key
        self.app = create_app(cfg, {MODEL: [ModelWorker(worker_config(cfg.models[0]))]})
        self.service = self.app.state.service
        self.service.add_bootstrap_key(api_key, "alice")
        self.calls: list[str] = []
        self.hide_load = False
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.session_id = self.run_id = ""

    async def _asgi(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        if scope["type"] == "http":
            self.calls.append(f"{scope['method']} {scope['path']}")
            if self.hide_load and scope["path"] == f"{API}/load":
                body = json.dumps({"error": "no route", "category": "user"}).encode()
                await send({"type": "http.response.start", "status": 404,
                            "headers": [(b"content-type", b"application/json")]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)

    def _seed(self) -> None:
        with httpx.Client(base_url=self.url + API, headers={"X-API-Key": self.api_key}, timeout=30) as c:
            def done(r: httpx.Response) -> Any:
                assert r.status_code == 200, r.text
                body = c.get(f"/futures/{r.json()['future_id']}", params={"timeout": 30}).json()
                assert body["status"] == "complete", body
                return body["result"]

            self.session_id = c.post("/sessions", json={"lease_seconds": 600}).json()["session_id"]
            run = done(c.post("/runs", json={"session_id": self.session_id, "base_model": MODEL,
                                             "lora": {"rank": 4}}))
            self.run_id = rid = run["run_id"]
            for step in range(1, 4):
                done(c.post(f"/runs/{rid}/forward_backward", json={"data": [_DATUM]}))
                done(c.post(f"/runs/{rid}/optim_step", json={"adam_params": {"learning_rate": 0.05}}))
                if step < 3:
                    done(c.post(f"/runs/{rid}/checkpoints", json={"name": f"step-{step}"}))

    def get(self, path: str) -> Any:
        """``GET /api/v1/twinkle/<path>`` straight from the server (what the proxy must pass on)."""
        r = httpx.get(f"{self.url}{API}/{path}", headers={"X-API-Key": self.api_key}, timeout=30)
        assert r.status_code == 200, r.text
        return r.json()

    def checkpoint_names(self) -> list[str]:
        return [c["name"] for c in self.get(f"runs/{self.run_id}/checkpoints")["checkpoints"]]

    def __enter__(self) -> LiveTwinkle:
        import uvicorn

        self._server = uvicorn.Server(uvicorn.Config(self._asgi, host="127.0.0.1", port=self.port,
                                                     log_level="warning", lifespan="on",
                                                     interface="asgi3"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.time() + 30
        while not self._server.started and self._thread.is_alive() and time.time() < deadline:
            time.sleep(0.02)
        assert self._server.started, "uvicorn did not start"
        self._seed()
        self.calls.clear()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=15)
