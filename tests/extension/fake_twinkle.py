"""A tiny threaded stand-in for the Twinkle native API (only what the panel reads), for handler tests."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

PREFIX = "/api/v1/twinkle/"


class FakeTwinkle:
    def __init__(self, api_key: str = "good-key-123456") -> None:
        self.api_key = api_key
        self.calls: list[str] = []
        self.runs: dict[str, dict[str, Any]] = {
            "run-1": {
                "run_id": "run-1", "session_id": "sess-1", "user": "alice", "base_model": "builtin://tiny",
                "lora": {"rank": 4}, "state": "active", "step": 2, "created_at": 1.0, "last_request_time": 2.0,
                "last_metrics": {"loss": 1.5}, "last_checkpoint": "tinker://run-1/weights/step-2",
            }
        }
        self.checkpoints: dict[str, list[str]] = {"run-1": ["step-1", "step-2"]}
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, body: Any) -> None:
                raw = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def _route(self, method: str) -> None:
                fake.calls.append(f"{method} {self.path}")
                if self.path == "/api/v1/healthz":
                    return self._send(200, {"status": "ok"})
                if self.headers.get("X-API-Key") != fake.api_key:
                    return self._send(401, {"error": "invalid API key", "category": "user", "code": "unauthenticated"})
                if not self.path.startswith(PREFIX):
                    return self._send(404, {"error": "no route"})
                path = self.path[len(PREFIX):].split("?")[0]
                body = fake.answer(method, path)
                if body is None:
                    return self._send(404, {"error": f"{path} not found", "code": "not_found"})
                return self._send(200, body)

            def do_GET(self) -> None:  # noqa: N802
                self._route("GET")

            def do_DELETE(self) -> None:  # noqa: N802
                self._route("DELETE")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    load: dict[str, Any] | None = None

    def _ckpt(self, run: str, name: str) -> dict[str, Any]:
        return {"checkpoint_id": f"weights/{name}", "run_id": run, "name": name, "kind": "training",
                "path": f"tinker://{run}/weights/{name}", "created_at": 1.0, "step": 1}

    def answer(self, method: str, path: str) -> Any:
        if method == "GET" and path == "capabilities":
            return {"version": "0.1.0", "base_models": [{"name": "builtin://tiny", "backend": "mock", "max_lora_rank": 32,
                                                          "max_adapters": 4, "max_tokens_per_request": 4096}]}
        if method == "GET" and path == "status":
            return {"version": "0.1.0", "uptime_s": 5.0, "sessions_active": 1, "runs_active": 1,
                    "workers": [{"base_model": "builtin://tiny", "replica": 0, "adapters": 1}]}
        if method == "GET" and path == "load" and self.load is not None:  # None: an older server without it
            return self.load
        if method == "GET" and path == "sessions":
            return {"sessions": [{"session_id": "sess-1", "user": "alice", "state": "active", "created_at": 1.0,
                                  "last_heartbeat": 2.0, "lease_seconds": 60.0, "run_ids": ["run-1"]}]}
        if method == "GET" and path == "runs":
            return {"runs": list(self.runs.values())}
        m = re.fullmatch(r"runs/([\w.-]+)/metrics", path)
        if method == "GET" and m and m.group(1) in self.runs:
            return {"run_id": m.group(1), "points": [{"step": i, "time": i, "kind": "forward_backward",
                                                      "metrics": {"loss": 3.0 - i}} for i in range(3)]}
        m = re.fullmatch(r"runs/([\w.-]+)/checkpoints", path)
        if method == "GET" and m and m.group(1) in self.runs:
            return {"checkpoints": [self._ckpt(m.group(1), n) for n in self.checkpoints.get(m.group(1), [])]}
        m = re.fullmatch(r"runs/([\w.-]+)/checkpoints/training/([\w.-]+)", path)
        if method == "DELETE" and m and m.group(2) in self.checkpoints.get(m.group(1), []):
            self.checkpoints[m.group(1)].remove(m.group(2))
            return self._ckpt(m.group(1), m.group(2))
        return None

    def __enter__(self) -> FakeTwinkle:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()
