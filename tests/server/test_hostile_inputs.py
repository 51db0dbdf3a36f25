"""Hostile and malformed requests against the real gateway app in process (mock backend): every bad input
is a 4xx naming its field, sizes are refused before allocation, ownership comes before dedup, and the
OpenAPI schema documents every body."""

from __future__ import annotations

import asyncio
import resource
import zlib

import httpx
import numpy as np
import pytest
import zstandard
from test_routes_native import DATUM

from twinkle.server.app import create_app, worker_config
from twinkle.server.config import parse_config
from twinkle.server.store import Store
from twinkle.server.worker import ModelWorker

API = "/api/v1"
TINKER_DATUM = {"model_input": DATUM["model_input"], "loss_fn_inputs": DATUM["loss_fn_inputs"]}


LIMIT = 1 << 20  # max_request_bytes: the compressed bombs below fit under it, their contents do not


class Env:
    """One gateway app (mock backend) and a Tinker run of alice's, shared by the module's tests."""

    def __init__(self, tmp_path):
        cfg = parse_config({
            "persistence": {"sqlite_path": str(tmp_path / "db.sqlite"), "checkpoint_root": str(tmp_path / "ck")},
            "limits": {"max_request_bytes": LIMIT},
            "models": [{"name": "mock", "backend": "mock", "model_id": "mock://tiny"}],
        })
        store = Store(cfg.persistence.sqlite_file())
        self.key_a = store.create_key("alice")[1]
        self.key_b = store.create_key("bob")[1]
        self.app = create_app(cfg, {"mock": [ModelWorker(worker_config(cfg.models[0]))]}, store=store)
        self.loop = asyncio.new_event_loop()
        self.run = self.go(self._model())

    def client(self, key: str) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://t",
                                 headers={"X-API-Key": key})

    def go(self, coro):
        return self.loop.run_until_complete(coro)

    async def _model(self) -> str:
        async with self.client(self.key_a) as c:
            return await _tinker_model(c)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = Env(tmp_path_factory.mktemp("hostile"))
    yield e
    e.loop.close()


async def _tinker_model(c: httpx.AsyncClient) -> str:
    sid = (await c.post(f"{API}/create_session", json={"tags": []})).json()["session_id"]
    r = await c.post(f"{API}/create_model", json={"session_id": sid, "model_seq_id": 0, "base_model": "mock",
                                                 "lora_config": {"rank": 4}})
    assert r.status_code == 200, r.text
    res = (await c.post(f"{API}/retrieve_future", json={"request_id": r.json()["request_id"]})).json()
    return res["model_id"]


def test_every_post_and_put_declares_its_body(env):
    async def go():
        async with env.client(env.key_a) as c:
            spec = (await c.get("/openapi.json")).json()
        missing = [f"{m.upper()} {p}" for p, ops in spec["paths"].items() for m, op in ops.items()
                   if m in ("post", "put") and "requestBody" not in op]
        assert not missing, missing
        tinker_posts = [p for p, ops in spec["paths"].items() if "post" in ops and not p.startswith(f"{API}/twinkle")]
        assert len(tinker_posts) >= 15  # the Tinker routes are in the schema, with their bodies

    env.go(go())


# (method, path, body or raw text, field the 400 must name)
BAD = [
    ("GET", "/training_runs?limit=abc", None, "limit"),
    ("GET", "/training_runs?limit=1.5", None, "limit"),
    ("GET", "/training_runs?offset=abc", None, "offset"),
    ("GET", "/training_runs?offset=-1", None, "offset"),
    ("GET", "/sessions?offset=abc", None, "offset"),
    ("GET", "/checkpoints?limit=1.5", None, "limit"),
    ("POST", "/create_session", {"user_metadata": "a string"}, "user_metadata"),
    ("POST", "/create_session", {"tags": 5}, "tags"),
    ("POST", "/create_session", "[1, 2]", "body"),
    ("POST", "/create_session", "{not json", "body"),
    ("POST", "/session_heartbeat", {"session_id": 5}, "session_id"),
    ("POST", "/create_model", {"session_id": "s", "model_seq_id": "abc", "base_model": "mock"}, "model_seq_id"),
    ("POST", "/create_model", {"session_id": "s", "model_seq_id": 0, "base_model": "mock",
                               "lora_config": {"rank": "big"}}, "lora_config.rank"),
    ("POST", "/optim_step", {"model_id": "RUN", "seq_id": "abc", "adam_params": {}}, "seq_id"),
    ("POST", "/optim_step", '{"model_id": "RUN", "adam_params": {"learning_rate": Infinity}}',
     "adam_params.learning_rate"),
    ("POST", "/optim_step", {"model_id": "RUN", "adam_params": {"beta1": 2.0}}, "adam_params.beta1"),
    ("POST", "/save_weights", {"model_id": "RUN", "path": "x", "ttl_seconds": 1e300}, "ttl_seconds"),
    ("POST", "/save_weights", {"model_id": "RUN", "path": "a/b"}, "path"),
    ("POST", "/forward_backward", {"model_id": "RUN", "seq_id": "abc"}, "seq_id"),
    ("POST", "/forward_backward", {"model_id": "RUN", "forward_backward_input": {
        "data": [TINKER_DATUM], "loss_fn": "dro", "loss_fn_config": {"beta": "nan"}}}, "beta"),
    ("POST", "/asample", {"prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2]}]}, "base_model": "mock",
                          "topk_prompt_logprobs": "x"}, "topk_prompt_logprobs"),
    ("POST", "/asample", {"prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2]}]}, "base_model": "mock",
                          "prompt_logprobs": True, "topk_prompt_logprobs": 1e9}, "topk_prompt_logprobs"),
    ("POST", "/asample", {"prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2]}]}, "base_model": "mock",
                          "sampling_params": {"temperature": "hot"}}, "sampling_params.temperature"),
    ("POST", "/asample", {"prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2]}]}, "base_model": "mock",
                          "num_samples": "abc"}, "num_samples"),
    ("POST", "/asample", {"prompt": "hello", "base_model": "mock"}, "prompt"),
    ("POST", "/retrieve_future", {"request_id": 5}, "request_id"),
    ("PUT", "/training_runs/RUN/checkpoints/weights/x/ttl", {"ttl_seconds": 1e300}, "ttl_seconds"),
    ("PUT", "/training_runs/RUN/checkpoints/weights/x/ttl", {"ttl_seconds": "soon"}, "ttl_seconds"),
    ("POST", "/twinkle/runs/RUN/forward_backward", {"data": [{"model_input": [None, None]}]}, "data[0].model_input"),
    ("POST", "/twinkle/runs/RUN/checkpoints", {"name": "x", "ttl_seconds": 1e300}, "ttl_seconds"),
]


@pytest.mark.parametrize(("method", "path", "body", "field"), BAD, ids=[f"{m} {p} {f}" for m, p, _, f in BAD])
def test_malformed_input_is_a_400_naming_the_field(env, method, path, body, field):
    async def go():
        async with env.client(env.key_a) as c:
            url = API + path.replace("RUN", env.run)
            if isinstance(body, str):
                r = await c.request(method, url, content=body, headers={"content-type": "application/json"})
            else:
                r = await c.request(method, url, json=body)
            assert r.status_code == 400, r.text
            got = r.json()
            assert got["category"] == "user" and field in got["detail"]["field"], got
            assert (await c.get(f"{API}/training_runs")).status_code == 200  # still serving

    env.go(go())


def test_another_users_run_id_is_404_exactly_like_a_made_up_one(env):
    body = {"forward_backward_input": {"data": [TINKER_DATUM], "loss_fn": "cross_entropy"}, "seq_id": 1}

    async def go():
        async with env.client(env.key_a) as a, env.client(env.key_b) as b:
            run = await _tinker_model(a)
            assert (await a.post(f"{API}/forward_backward", json={**body, "model_id": run})).status_code == 200
            theirs = await b.post(f"{API}/forward_backward", json={**body, "model_id": run})
            made_up = await b.post(f"{API}/forward_backward", json={**body, "model_id": run + "9"})
            assert theirs.status_code == made_up.status_code == 404
            assert theirs.json()["code"] == made_up.json()["code"]
            assert "request_id" not in theirs.json()

    env.go(go())


def test_status_names_only_your_own_runs(env):
    # seq_id 1: the run's first (a later one would wait seq_grace_s, 2 s, for the ids before it)
    body = {"model_id": env.run, "forward_backward_input": {"data": [TINKER_DATUM]}, "seq_id": 1}

    async def go():
        async with env.client(env.key_a) as a, env.client(env.key_b) as b:
            r = await a.post(f"{API}/forward_backward", json=body)
            assert r.status_code == 200, r.text
            await a.post(f"{API}/retrieve_future", json={"request_id": r.json()["request_id"]})
            mine = await a.get(f"{API}/twinkle/status")
            theirs = await b.get(f"{API}/twinkle/status")
            assert mine.status_code == theirs.status_code == 200
            assert env.run in mine.text and env.run not in theirs.text
            assert theirs.json()["workers"][0]["last_batch"]["other_adapters"] >= 1

    env.go(go())


def test_a_forged_request_id_cannot_pad_a_reply(env):
    async def go():
        async with env.client(env.key_a) as c:
            r = await c.post(f"{API}/asample", json={
                "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2, 3]}]}, "base_model": "mock",
                "prompt_logprobs": True, "topk_prompt_logprobs": 2, "sampling_params": {"max_tokens": 1}})
            assert r.status_code == 200, r.text
            fid = r.json()["request_id"].split("|")[0]
            forged = await c.post(f"{API}/retrieve_future", json={"request_id": f"{fid}|smp||2000000"})
            assert forged.status_code == 400 and forged.json()["detail"]["field"] == "request_id"

    env.go(go())


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _fb_proto(model_id: str, sparse_shape: list[int] | None = None, pad: int = 0) -> bytes:
    from twinkle.server.tinker.codec import pb

    msg = pb.ForwardBackwardRequest(model_id=model_id, seq_id=1, loss_fn="cross_entropy")
    d = msg.data.add()
    d.model_input.add().encoded_text.tokens = np.asarray([5, 9, 17] + [1] * pad, dtype="<i4").tobytes()
    t = d.loss_fn_inputs["target_tokens"]
    t.dtype = pb.DTYPE_INT64
    if sparse_shape:
        t.shape.extend(sparse_shape)
        t.sparse_csr.values = np.asarray([1], dtype="<i8").tobytes()
        crow = np.zeros(sparse_shape[0] + 1, dtype="<i8")
        crow[1:] = 1
        t.sparse_csr.crow_indices = crow.tobytes()
        t.sparse_csr.col_indices = np.asarray([0], dtype="<i8").tobytes()
    else:
        t.dense = np.asarray([9, 17, 33] + [1] * pad, dtype="<i8").tobytes()
    return msg.SerializeToString()


def _zeros(n_mb: int):
    for _ in range(n_mb):
        yield bytes(1 << 20)


def test_bombs_are_refused_before_allocation(env):
    """zstd and gzip bombs, a sparse tensor with a huge shape and an unbounded chunked body: each a fast 4xx,
    and the process grows by far less than what the requests would have made."""
    z = zstandard.ZstdCompressor(level=3).compressobj()
    zbomb = b"".join(z.compress(c) for c in _zeros(256)) + z.flush()  # 256 MB inflated
    g = zlib.compressobj(9, zlib.DEFLATED, 31)
    gbomb = b"".join(g.compress(c) for c in _zeros(64)) + g.flush()  # 64 MB inflated
    assert len(zbomb) < LIMIT and len(gbomb) < LIMIT  # so the decoder, not the size check, must refuse them
    sparse = _fb_proto(env.run, sparse_shape=[1, 20_000_000])  # 160 MB once dense
    proto = {"content-type": "application/x-protobuf"}

    async def chunks():
        for _ in range(2000):  # 80 MB with no Content-Length
            yield b"\0" * 40_000

    async def go():
        async with env.client(env.key_a) as c:
            before = _rss_mb()
            for bomb, enc in ((zbomb, "zstd"), (gbomb, "gzip")):
                r = await c.post(f"{API}/forward_backward", content=bomb, headers={**proto, "content-encoding": enc})
                assert r.status_code == 413 and "decompresses" in r.json()["error"], r.text
            r = await c.post(f"{API}/forward_backward", content=sparse, headers=proto)
            assert r.status_code == 413 and "loss_fn_inputs.target_tokens" in r.json()["detail"]["field"], r.text
            r = await c.post(f"{API}/forward_backward", content=chunks(), headers=proto)
            assert r.status_code == 413 and "max_request_bytes" in r.json()["error"], r.text
            assert _rss_mb() - before < 100
            assert (await c.get(f"{API}/training_runs")).status_code == 200

    env.go(go())


def test_user_errors_log_one_line_without_traceback(env, caplog):
    async def go():
        async with env.client(env.key_a) as c:
            r = await c.post(f"{API}/forward_backward", json={"model_id": "x", "seq_id": "abc"})
            assert r.status_code == 400

    with caplog.at_level("DEBUG"):
        env.go(go())
    assert not [rec for rec in caplog.records if rec.levelno >= 30 or rec.exc_info]


def test_worker_user_errors_travel_as_values_not_as_logged_exceptions():
    """A worker replica returns a user error as a value (Ray Serve would log a raised one as ERROR with a
    traceback); the gateway's handle wrapper raises it again, field intact, after a pickle round trip."""
    import pickle

    from twinkle.server.app import WorkerRefusal, _HandleWorker, refusal_as_value
    from twinkle.types import InvalidInputError

    async def refuse():
        raise InvalidInputError("bad beta", field="loss_fn_config.beta")

    out = asyncio.run(refusal_as_value(refuse()))
    out = pickle.loads(pickle.dumps(out))
    assert isinstance(out, WorkerRefusal)

    class Method:
        async def remote(self, *a, **kw):
            return out

    class Handle:
        execute = Method()

    with pytest.raises(InvalidInputError) as e:
        asyncio.run(_HandleWorker(Handle()).execute("a", None))
    assert e.value.field == "loss_fn_config.beta"


def test_an_internal_message_over_the_grpc_limit_is_a_413_not_an_internal_error():
    """What Ray Serve raises when a gateway -> worker message meets the replica's gRPC limit (seen with the
    limit at 4 MB: tests/integration/test_gateway_bombs.py) reaches the client as a clear 413."""
    from twinkle.server.app import _HandleWorker
    from twinkle.types import LimitExceededError

    class AioRpcError(Exception):  # the shape of grpc.aio's error text, chained like Serve's router does
        pass

    class Method:
        async def remote(self, *a, **kw):
            try:
                raise AioRpcError('<AioRpcError of RPC that terminated with:\n\tstatus = '
                                  'StatusCode.RESOURCE_EXHAUSTED\n\tdetails = "SERVER: Received message larger '
                                  'than max (7089595 vs. 4194304)"\n>')
            except AioRpcError as e:
                raise RuntimeError("routing failed") from e

    class Handle:
        execute = Method()

    with pytest.raises(LimitExceededError) as e:
        asyncio.run(_HandleWorker(Handle()).execute("a", None))
    assert e.value.field == "body" and "7089595" in str(e.value) and e.value.detail["limit"] == 4194304


def test_a_body_without_a_valid_key_is_never_parsed(env):
    """FastAPI parses a body before it runs the key check: every keyed POST/PUT route checks the key first, so a
    request without one cannot make the gateway decode its body (a broken body proves it was not read)."""

    async def go():
        async with env.client(env.key_a) as c:
            spec = (await c.get("/openapi.json")).json()
        routes = [(m, p.replace("{run_id}", "r").replace("{checkpoint_id}", "c").replace("{session_id}", "s"))
                  for p, ops in spec["paths"].items() for m in ops if m in ("post", "put")]
        assert len(routes) > 30
        wrong = []
        for key in (None, "not-a-key"):
            headers = {"content-type": "application/json", **({"X-API-Key": key} if key else {})}
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=env.app), base_url="http://t") as c:
                for method, path in routes:
                    r = await c.request(method.upper(), path, content=b'{"not json', headers=headers)
                    if r.status_code != 401:
                        wrong.append((method, path, r.status_code))
        assert not wrong, wrong

    env.go(go())


def test_a_tensor_shaped_object_in_metadata_is_stored_as_sent(env):
    """Only forward/forward_backward bodies get their tensors compacted while parsed: a tensor-shaped object in a
    run's free-form metadata stays JSON (it became a numpy array once: a 500, then every run listing a 500)."""
    md = {"x": {"data": list(range(20)), "dtype": "int64"}}

    async def go():
        async with env.client(env.key_b) as c:
            sid = (await c.post(f"{API}/twinkle/sessions", json={})).json()["session_id"]
            r = await c.post(f"{API}/twinkle/runs", params={"wait": 5},
                             json={"session_id": sid, "base_model": "mock", "lora": {"rank": 4}, "metadata": md})
            assert r.status_code == 200, r.text
            runs = await c.get(f"{API}/twinkle/runs")
            assert runs.status_code == 200, runs.text
            assert any(run["metadata"].get("x") == md["x"] for run in runs.json()["runs"])

    env.go(go())
