"""Native HTTP routes on the in-process app (httpx ASGITransport, mock-backend ModelWorker): auth, errors,
isolation, the training round trip."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from twinkle.server.app import create_app, worker_config
from twinkle.server.config import parse_config
from twinkle.server.store import Store
from twinkle.server.worker import ModelWorker

API = "/api/v1/twinkle"
DATUM = {
    "model_input": {"chunks": [{"type": "encoded_text", "tokens": [5, 9, 17, 33]}]},
    "loss_fn_inputs": {"target_tokens": {"data": [9, 17, 33, 2], "dtype": "int64"},
                       "weights": {"data": [1, 1, 1, 1], "dtype": "float32"}},
}


class Env:
    def __init__(self, tmp_path: Path):
        cfg = parse_config({
            "persistence": {"sqlite_path": str(tmp_path / "db.sqlite"), "checkpoint_root": str(tmp_path / "ck")},
            "limits": {"max_request_bytes": 4096},
            "models": [{"name": "mock", "backend": "mock", "model_id": "mock://tiny"}],
        })
        store = Store(cfg.persistence.sqlite_file())
        self.key_a = store.create_key("alice")[1]
        self.key_b = store.create_key("bob")[1]
        self.app = create_app(cfg, {"mock": [ModelWorker(worker_config(cfg.models[0]))]}, store=store)

    def client(self, key: str | None = None, bearer: bool = False) -> httpx.AsyncClient:
        headers = {}
        if key:
            headers = {"Authorization": f"Bearer {key}"} if bearer else {"X-API-Key": key}
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://t", headers=headers)


async def _done(c: httpx.AsyncClient, ref: dict) -> dict:
    r = await c.get(f"{API}/futures/{ref['future_id']}", params={"timeout": 30})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "complete", body
    return body["result"]


async def _setup_run(c: httpx.AsyncClient) -> tuple[str, str]:
    r = await c.post(f"{API}/sessions", json={"lease_seconds": 120})
    assert r.status_code == 200, r.text
    sid = r.json()["session_id"]
    r = await c.post(f"{API}/runs", json={"session_id": sid, "base_model": "mock", "lora": {"rank": 4}})
    assert r.status_code == 200, r.text
    run = await _done(c, r.json())
    return sid, run["run_id"]


def test_health_auth_and_openapi(tmp_path):
    env = Env(tmp_path)

    async def go():
        async with env.client() as anon:
            assert (await anon.get("/api/v1/healthz")).json() == {"status": "ok"}
            for method, path in [("GET", "/capabilities"), ("GET", "/status"), ("POST", "/sessions"),
                                 ("GET", "/runs"), ("GET", "/futures/x"), ("GET", "/checkpoints")]:
                r = await anon.request(method, API + path, json={} if method == "POST" else None)
                assert r.status_code == 401, (path, r.text)
                assert r.json()["code"] == "unauthenticated"
            r = await anon.get(f"{API}/capabilities", headers={"X-API-Key": "tml-wrong"})
            assert r.status_code == 401
            for path in ("/openapi.json", "/docs", "/redoc"):  # only healthz is public
                assert (await anon.get(path)).status_code == 401, path
        async with env.client(env.key_a, bearer=True) as c:
            spec = (await c.get("/openapi.json")).json()
            assert f"{API}/runs/{{run_id}}/forward_backward" in spec["paths"]
            assert (await c.get("/docs")).status_code == 200
            caps = (await c.get(f"{API}/capabilities")).json()
            assert caps["base_models"][0]["name"] == "mock" and caps["base_models"][0]["vocab_size"] > 0

    asyncio.run(go())


def test_training_round_trip(tmp_path):
    env = Env(tmp_path)

    async def go():
        async with env.client(env.key_a) as c:
            sid, run = await _setup_run(c)
            losses = []
            for i in range(3):
                r = await c.post(f"{API}/runs/{run}/forward_backward", json={"data": [DATUM], "seq_id": 2 * i + 1})
                losses.append((await _done(c, r.json()))["metrics"]["loss:sum"])
                r = await c.post(f"{API}/runs/{run}/optim_step",
                                 json={"seq_id": 2 * i + 2, "adam_params": {"learning_rate": 0.05}})
                await _done(c, r.json())
            assert losses[2] < losses[0]
            info = (await c.get(f"{API}/runs/{run}")).json()
            assert info["step"] == 3 and info["session_id"] == sid
            ck = await _done(c, (await c.post(f"{API}/runs/{run}/checkpoints", json={"name": "s3"})).json())
            assert ck["path"] == f"tinker://{run}/weights/s3"
            listed = (await c.get(f"{API}/runs/{run}/checkpoints")).json()["checkpoints"]
            assert [x["name"] for x in listed] == ["s3"]
            r = await c.post(f"{API}/sample", json={"run_id": run, "prompt": {"chunks": [
                {"type": "encoded_text", "tokens": [5, 9]}]}, "sampling_params": {"max_tokens": 3, "seed": 1}})
            sample = await _done(c, r.json())
            assert len(sample["sequences"][0]["tokens"]) == 3
            hist = (await c.get(f"{API}/runs/{run}/metrics")).json()
            assert len([p for p in hist["points"] if p["kind"] == "optim_step"]) == 3
            status = (await c.get(f"{API}/status")).json()
            assert status["runs_active"] == 1 and status["workers"][0]["batches_run"] >= 3
            r = await c.delete(f"{API}/runs/{run}/checkpoints/weights/s3")
            assert r.status_code == 200 and not (await c.get(f"{API}/checkpoints")).json()["checkpoints"]
            r = await c.post(f"{API}/sessions/{sid}/close")
            assert r.json()["state"] == "closed"
            assert (await c.get(f"{API}/runs/{run}")).json()["state"] == "unloaded"
            r = await c.post(f"{API}/sessions/{sid}/heartbeat")
            assert r.status_code == 410

    asyncio.run(go())


def test_errors_are_json_with_field_and_never_retryable_statuses(tmp_path):
    env = Env(tmp_path)

    async def go():
        async with env.client(env.key_a) as c:
            sid, run = await _setup_run(c)
            cases = [
                ("POST", f"{API}/runs", {"session_id": sid, "base_model": "mock", "lora": {"rank": "abc"}},
                 400, "lora.rank"),
                ("POST", f"{API}/runs", {"session_id": sid, "base_model": "mock", "lora": {"rank": 4}, "bogus": 1},
                 400, "bogus"),
                ("POST", f"{API}/runs/{run}/checkpoints", {"name": "../etc"}, 400, "name"),
                ("POST", f"{API}/runs/{run}/checkpoints", {"name": "/abs/path"}, 400, "name"),
                ("POST", f"{API}/runs/{run}/load", {"checkpoint": "tinker://x/weights/../../a"}, 400, "checkpoint"),
                ("POST", f"{API}/runs/{run}/forward_backward", {"data": []}, 400, "data"),
                ("POST", f"{API}/runs", {"session_id": sid, "base_model": "nope"}, 400, "base_model"),
                ("POST", f"{API}/runs", {"session_id": sid, "base_model": "mock", "lora": {"rank": 1000}},
                 413, "lora.rank"),
                ("GET", f"{API}/runs/nope", None, 404, "run_id"),
                ("GET", f"{API}/futures/nope", None, 404, "future_id"),
                ("POST", f"{API}/runs/{run}/forward_backward", {"data": [DATUM] * 40}, 413, "body"),
            ]
            for method, path, body, status, field in cases:
                r = await c.request(method, path, json=body)
                assert r.status_code == status, (path, body, r.text)
                err = r.json()
                assert set(err) >= {"error", "category", "code", "detail"}
                assert err["category"] == "user" and err["detail"].get("field") == field, err
                assert r.status_code not in (402, 409, 429) and r.status_code < 500
            r = await c.get("/api/v1/twinkle/no-such-route")
            assert r.status_code == 404 and r.json()["category"] == "user"

    asyncio.run(go())


def test_unexpected_error_is_500_with_request_id_and_no_traceback(tmp_path, caplog):
    env = Env(tmp_path)

    def boom():
        raise RuntimeError("secret internals")

    env.app.state.service.capabilities = boom

    async def go():
        async with env.client(env.key_a) as c:
            r = await c.get(f"{API}/capabilities")
            assert r.status_code == 500
            body = r.json()
            assert body["category"] == "server" and body["detail"]["request_id"]
            assert "secret internals" not in r.text and "Traceback" not in r.text
            assert r.headers["x-request-id"] == body["detail"]["request_id"]
            assert (await c.get("/api/v1/healthz")).status_code == 200  # still serving

    with caplog.at_level("ERROR", logger="twinkle.server"):
        asyncio.run(go())
    assert "secret internals" in caplog.text  # logged server-side


def test_user_b_gets_404_for_each_of_user_a_resources(tmp_path):
    env = Env(tmp_path)

    async def go():
        async with env.client(env.key_a) as a, env.client(env.key_b) as b:
            sid, run = await _setup_run(a)
            ck = await _done(a, (await a.post(f"{API}/runs/{run}/checkpoints", json={"name": "k"})).json())
            fut = (await a.post(f"{API}/runs/{run}/forward", json={"data": [DATUM]})).json()
            bsid = (await b.post(f"{API}/sessions", json={})).json()["session_id"]
            probes = [
                ("GET", f"{API}/sessions/{sid}", None),
                ("POST", f"{API}/sessions/{sid}/heartbeat", None),
                ("POST", f"{API}/sessions/{sid}/close", None),
                ("GET", f"{API}/runs/{run}", None),
                ("DELETE", f"{API}/runs/{run}", None),
                ("GET", f"{API}/runs/{run}/metrics", None),
                ("GET", f"{API}/runs/{run}/checkpoints", None),
                ("POST", f"{API}/runs/{run}/forward_backward", {"data": [DATUM]}),
                ("POST", f"{API}/runs/{run}/forward", {"data": [DATUM]}),
                ("POST", f"{API}/runs/{run}/optim_step", {}),
                ("POST", f"{API}/runs/{run}/optimizer", {"optimizer": {"lr": 0.1}}),
                ("POST", f"{API}/runs/{run}/lr_scheduler", {"scheduler": {"name": "constant"}}),
                ("POST", f"{API}/runs/{run}/checkpoints", {"name": "x"}),
                ("DELETE", f"{API}/runs/{run}/checkpoints/weights/k", None),
                ("POST", f"{API}/runs/{run}/load", {"checkpoint": ck["path"]}),
                ("POST", f"{API}/runs/resume", {"session_id": bsid, "checkpoint": ck["path"]}),
                ("POST", f"{API}/runs", {"session_id": sid, "base_model": "mock"}),
                ("POST", f"{API}/sample", {"run_id": run, "prompt": {"chunks": []}}),
                ("POST", f"{API}/sample", {"checkpoint": ck["path"], "prompt": {"chunks": [
                    {"type": "encoded_text", "tokens": [1]}]}}),
                ("GET", f"{API}/futures/{fut['future_id']}", None),
            ]
            for method, path, body in probes:
                r = await b.request(method, path, json=body)
                assert r.status_code == 404, (method, path, r.text)
            assert (await b.get(f"{API}/runs")).json()["runs"] == []
            assert (await b.get(f"{API}/checkpoints")).json()["checkpoints"] == []
            assert [s["session_id"] for s in (await b.get(f"{API}/sessions")).json()["sessions"]] == [bsid]
            assert (await a.get(f"{API}/runs/{run}")).json()["state"] == "active"

    asyncio.run(go())


@pytest.mark.parametrize("timeout", [0, 0.05])
def test_future_timeout_returns_pending_shape(tmp_path, timeout):
    env = Env(tmp_path)

    async def go():
        async with env.client(env.key_a) as c:
            _, run = await _setup_run(c)
            ref = (await c.post(f"{API}/runs/{run}/forward", json={"data": [DATUM]})).json()
            r = await c.get(f"{API}/futures/{ref['future_id']}", params={"timeout": timeout})
            assert r.status_code == 200 and r.json()["status"] in ("pending", "complete")
            assert (await _done(c, ref))["loss_fn_outputs"]

    asyncio.run(go())
