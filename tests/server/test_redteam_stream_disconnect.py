"""Red-team finding: a client that disconnects from a streamed sample (native SSE or OpenAI ``stream: true``)
left its queued sampling work in the worker's queue (and the stream in the hub until its TTL). Now the route
closes the stream and the worker drops the request while it is still queued."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from twinkle.server.app import create_app, worker_config
from twinkle.server.config import parse_config
from twinkle.server.store import Store
from twinkle.server.worker import ModelWorker


def _app(tmp: Path, backend: str = "mock", model_id: str = "mock://tiny"):
    cfg = parse_config({
        "persistence": {"sqlite_path": str(tmp / "db.sqlite"), "checkpoint_root": str(tmp / "ck")},
        "models": [{"name": "tiny", "backend": backend, "model_id": model_id}],
    })
    store = Store(cfg.persistence.sqlite_file())
    key = store.create_key("alice")[1]
    worker = ModelWorker(worker_config(cfg.models[0]))
    return create_app(cfg, {"tiny": [worker]}, store=store), worker, key


async def _call_then_disconnect(app, path: str, body: dict, key: str) -> list[dict]:
    """Drive the ASGI app directly: send the request, then report the client gone while it waits."""
    raw = json.dumps(body).encode()
    sent: list[dict] = []
    msgs = [{"type": "http.request", "body": raw, "more_body": False}]

    async def receive() -> dict:
        if msgs:
            return msgs.pop(0)
        await asyncio.sleep(0.3)  # the request is queued by now
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "headers": [(b"content-type", b"application/json"), (b"x-api-key", key.encode()),
                                          (b"content-length", str(len(raw)).encode())],
             "client": ("127.0.0.1", 1), "server": ("t", 80)}
    await asyncio.wait_for(app(scope, receive, send), 20)
    return sent


@pytest.mark.parametrize("route", ["native", "openai"])
def test_disconnect_drops_queued_stream_work(tmp_path, route):
    app, worker, key = _app(tmp_path)
    sched = worker._scheduler

    async def idle() -> None:  # the dispatcher never dispatches: the request stays queued
        await asyncio.Event().wait()

    sched._dispatch = idle
    if route == "native":
        path, body = "/api/v1/twinkle/sample/stream", {
            "base_model": "tiny", "prompt": {"chunks": [{"type": "encoded_text", "tokens": [5, 6]}]},
            "sampling_params": {"max_tokens": 4}}
    else:
        path, body = "/v1/completions", {"model": "tiny", "prompt": [5, 6], "max_tokens": 4, "stream": True}

    async def main() -> None:
        await _call_then_disconnect(app, path, body, key)
        for _ in range(50):  # the close runs in a task of its own
            if sched.stats["samples_cancelled"]:
                break
            await asyncio.sleep(0.02)

    asyncio.run(main())
    assert sched.stats["samples_cancelled"] == 1
    assert not sched._samples
    assert not worker._hub()._streams


@pytest.mark.parametrize("route", ["native", "openai"])
def test_disconnect_aborts_a_running_generation(tmp_path, route):
    """The other half: a request already decoding in the continuous sampler kept its rows (and KV budget) in
    the batch until max_tokens, slowing everyone sharing the batch; now its rows leave at the next step."""
    app, worker, key = _app(tmp_path, "transformers", "builtin://tiny")
    sched = worker._scheduler
    steps = 1000  # far more than the 0.3 s before the client leaves
    if route == "native":
        path, body = "/api/v1/twinkle/sample/stream", {
            "base_model": "tiny", "prompt": {"chunks": [{"type": "encoded_text", "tokens": [5, 6]}]},
            "sampling_params": {"max_tokens": steps, "stop": []}}
    else:
        # greedy: a sampled EOS could end it before the client leaves (OpenAI has no way to ignore EOS)
        path, body = "/v1/completions", {"model": "tiny", "prompt": [5, 6], "max_tokens": steps, "stream": True,
                                         "temperature": 0}

    async def main() -> list[dict]:
        sent = await _call_then_disconnect(app, path, body, key)
        for _ in range(200):
            if sched._engine is not None and sched._engine.idle() and not sched._in_engine:
                break
            await asyncio.sleep(0.02)
        return sent

    sent = asyncio.run(main())
    eng = sched._engine
    assert any(m.get("body") for m in sent if m["type"] == "http.response.body")  # it was streaming tokens
    assert eng is not None and eng.idle() and eng.stats["aborted"] == 1
    assert eng.stats["steps"] < steps // 2 and eng.reserved == 0
    assert sched.stats["samples_cancelled"] == 1 and sched._kv_used == 0 and not sched._in_engine
    assert not worker._hub()._streams
