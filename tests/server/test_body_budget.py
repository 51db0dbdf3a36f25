"""Many large bodies at once: the gateway receives and decodes at most ``limits.max_decoding_bytes`` of them,
one API key at most half; beyond that a 429 with Retry-After (``twinkle.server.body_budget``)."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import zstandard

from twinkle.server import body_budget
from twinkle.server.app import create_app, worker_config
from twinkle.server.body_budget import BodyBudget
from twinkle.server.config import parse_config
from twinkle.server.store import Store
from twinkle.server.worker import ModelWorker
from twinkle.types import CapacityError

MB = 1 << 20


def test_a_key_holds_at_most_half_and_others_wait_for_room(monkeypatch):
    monkeypatch.setattr(body_budget, "WAIT_S", 0.2)

    async def go():
        b = BodyBudget(10 * MB)
        await b.acquire("a", 3 * MB)
        await b.acquire("a", 2 * MB)
        with pytest.raises(CapacityError, match="this API key") as e:  # 7 MB > half of 10
            await b.acquire("a", 2 * MB)
        assert e.value.status == 429 and e.value.retry_after > 0
        await b.acquire("b", 4 * MB)  # another key still gets in: 9 of 10 MB
        with pytest.raises(CapacityError, match="too many large requests"):  # no room within WAIT_S
            await b.acquire("c", 2 * MB)
        waiter = asyncio.ensure_future(b.acquire("c", 2 * MB))
        await asyncio.sleep(0.05)
        assert not waiter.done()
        await b.release("a", 3 * MB)  # room: the waiting request goes on
        await asyncio.wait_for(waiter, 1.0)
        assert b.used == 8 * MB and dict(b.by_key) == {"a": 2 * MB, "b": 4 * MB, "c": 2 * MB}
        for k, n in (("a", 2 * MB), ("b", 4 * MB), ("c", 2 * MB)):
            await b.release(k, n)
        assert b.used == 0 and not b.by_key

    asyncio.run(go())


def test_the_gateway_refuses_a_third_large_body_of_one_key_while_others_go_on(tmp_path):
    """Two 3 MiB bodies of alice's are held mid-upload (max_request_bytes 4 MiB: a budget of 16, 8 per key):
    her third large body is a fast 429 naming her share, and so is a small zstd body of hers (it may inflate
    to 4 MiB); bob's large and compressed bodies and alice's small requests are served, and once hers finish
    she can send large bodies again."""
    cfg = parse_config({
        "persistence": {"sqlite_path": str(tmp_path / "db.sqlite"), "checkpoint_root": str(tmp_path / "ck")},
        "limits": {"max_request_bytes": 4 * MB},
        "models": [{"name": "mock", "backend": "mock", "model_id": "mock://tiny"}],
    })
    store = Store(cfg.persistence.sqlite_file())
    key_a, key_b = store.create_key("alice")[1], store.create_key("bob")[1]
    app = create_app(cfg, {"mock": [ModelWorker(worker_config(cfg.models[0]))]}, store=store)
    big = 3 * MB
    url = "/api/v1/twinkle/runs/nope/forward_backward"

    async def go():
        release = asyncio.Event()

        async def stalled():
            yield b"{" + b" " * (MB - 1)
            await release.wait()
            yield b" " * (big - MB)

        def client(key):
            return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t",
                                     headers={"X-API-Key": key}, timeout=30)

        async with client(key_a) as a, client(key_b) as b:
            hdr = {"content-type": "application/json", "content-length": str(big)}
            held = [asyncio.ensure_future(a.post(url, content=stalled(), headers=hdr)) for _ in range(2)]
            await asyncio.sleep(0.2)
            r = await a.post(url, content=b" " * big, headers=hdr)
            assert r.status_code == 429 and "API key" in r.json()["error"] and r.headers["retry-after"], r.text
            r = await b.post(url, content=b"{" + b" " * (big - 1), headers=hdr)  # bob: in, and refused for its JSON
            assert r.status_code == 400, r.text
            # a small compressed body may inflate to max_request_bytes: it reserves that much before inflating
            zbody = zstandard.ZstdCompressor().compress(b"\0" * 1000)
            zhdr = {"content-type": "application/x-protobuf", "content-encoding": "zstd"}
            r = await a.post("/api/v1/forward_backward", content=zbody, headers=zhdr)
            assert r.status_code == 429 and "API key" in r.json()["error"], r.text
            r = await b.post("/api/v1/forward_backward", content=zbody, headers=zhdr)
            assert r.status_code == 400, r.text  # not valid protobuf: inflated and refused for its content
            assert (await a.get("/api/v1/twinkle/capabilities")).status_code == 200
            release.set()
            for f in held:
                assert (await f).status_code == 400
            r = await a.post(url, content=b"{" + b" " * (big - 1), headers=hdr)
            assert r.status_code == 400, r.text

    asyncio.run(go())
