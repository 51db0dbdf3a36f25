"""32 tenants train at once through the native HTTP routes (in process: the real gateway app and a mock-backend
worker), every call sent one to three times concurrently with the same seq_id (a client retrying after a lost
reply). Each run must count exactly its distinct steps — step counter, metric history, checkpoint label — and
its loss curve must equal a single tenant's that sent everything once."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import httpx
import pytest

from twinkle.server.app import create_app, worker_config
from twinkle.server.config import parse_config
from twinkle.server.store import Store
from twinkle.server.worker import ModelWorker

pytestmark = pytest.mark.slow

API = "/api/v1/twinkle"
TENANTS = 32
STEPS = 5
DATUM = {
    "model_input": {"chunks": [{"type": "encoded_text", "tokens": [5, 9, 17, 33, 40, 2]}]},
    "loss_fn_inputs": {"target_tokens": {"data": [9, 17, 33, 40, 2, 8], "dtype": "int64"},
                       "weights": {"data": [1, 1, 1, 1, 1, 1], "dtype": "float32"}},
}


def _app(tmp_path: Path, users: int) -> tuple[object, list[str], ModelWorker]:
    cfg = parse_config({
        "persistence": {"sqlite_path": str(tmp_path / "db.sqlite"), "checkpoint_root": str(tmp_path / "ck")},
        "limits": {"max_adapters_per_user": 2},
        "models": [{"name": "mock", "backend": "mock", "model_id": "mock://tiny", "max_adapters": 64}],
    })
    store = Store(cfg.persistence.sqlite_file())
    keys = [store.create_key(f"user{i}")[1] for i in range(users)]
    worker = ModelWorker(worker_config(cfg.models[0]))
    return create_app(cfg, {"mock": [worker]}, store=store), keys, worker


async def _done(c: httpx.AsyncClient, ref: dict) -> dict:
    r = await c.get(f"{API}/futures/{ref['future_id']}", params={"timeout": 60})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "complete", body
    return body["result"]


async def _tenant(app: object, key: str, rng: random.Random) -> tuple[list[float], dict, list[dict], dict]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t",
                                 headers={"X-API-Key": key}, timeout=120) as c:
        sid = (await c.post(f"{API}/sessions", json={"lease_seconds": 600})).json()["session_id"]
        r = await c.post(f"{API}/runs", json={"session_id": sid, "base_model": "mock", "lora": {"rank": 4, "seed": 7}})
        rid = (await _done(c, r.json()))["run_id"]
        losses, seq = [], 0

        async def send(op: str, body: dict) -> dict:
            nonlocal seq
            seq += 1
            copies = rng.randint(1, 3)
            rs = await asyncio.gather(*(c.post(f"{API}/runs/{rid}/{op}", json={**body, "seq_id": seq})
                                        for _ in range(copies)))
            assert all(x.status_code == 200 for x in rs), [x.text for x in rs]
            outs = [await _done(c, x.json()) for x in rs]
            assert all(o == outs[0] for o in outs)  # every copy answered with the one execution's result
            return outs[0]

        for _ in range(STEPS):
            out = await send("forward_backward", {"data": [DATUM]})
            losses.append(out["metrics"]["loss:sum"])
            await send("optim_step", {"adam_params": {"learning_rate": 0.05}})
        ck = await send("checkpoints", {"name": "end"})
        run = (await c.get(f"{API}/runs/{rid}")).json()
        points = (await c.get(f"{API}/runs/{rid}/metrics")).json()["points"]
        return losses, run, points, ck


def test_32_tenants_with_retries_count_every_step_once(tmp_path):
    async def go():
        app, keys, worker = _app(tmp_path / "many", TENANTS)
        ref_app, ref_keys, ref_worker = _app(tmp_path / "one", 1)
        async with app.router.lifespan_context(app), ref_app.router.lifespan_context(ref_app):
            reference = await _tenant_once(ref_app, ref_keys[0])
            results = await asyncio.wait_for(asyncio.gather(
                *(_tenant(app, k, random.Random(i)) for i, k in enumerate(keys))), timeout=300)
            st = await worker.status()
        for losses, run, points, ck in results:
            assert losses == pytest.approx(reference, rel=1e-6, abs=1e-6)
            assert run["step"] == STEPS and ck["step"] == STEPS
            assert [p["kind"] for p in points].count("optim_step") == STEPS
            assert [p["kind"] for p in points].count("forward_backward") == STEPS
            assert [p["step"] for p in points if p["kind"] == "optim_step"] == list(range(1, STEPS + 1))
        assert st["errors"] == 0 and st["mixed_batches"] > 0
        await worker.close()
        await ref_worker.close()

    asyncio.run(go())


async def _tenant_once(app: object, key: str) -> list[float]:
    class Once(random.Random):
        def randint(self, a: int, b: int) -> int:
            return 1

    losses, run, _, _ = await _tenant(app, key, Once())
    assert run["step"] == STEPS
    return losses
