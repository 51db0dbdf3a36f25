"""Telemetry on the in-process app (httpx ASGITransport, mock-backend ModelWorker): the config block, the
Prometheus endpoint (access, gateway + worker metrics, bounded labels), the usage ledger (routes, isolation,
restart, CLI), secret redaction, and that telemetry off imports nothing."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from twinkle.server.app import create_app, worker_config
from twinkle.server.cli import main as cli_main
from twinkle.server.config import ConfigError, parse_config
from twinkle.server.store import Store
from twinkle.server.telemetry.logs import RedactSecrets, redact
from twinkle.server.worker import ModelWorker

API = "/api/v1/twinkle"
REPO = Path(__file__).resolve().parents[2]


def _datum(tokens: list[int]) -> dict:
    return {"model_input": {"chunks": [{"type": "encoded_text", "tokens": tokens}]},
            "loss_fn_inputs": {"target_tokens": {"data": tokens[1:] + [2], "dtype": "int64"},
                               "weights": {"data": [1] * len(tokens), "dtype": "float32"}}}


def _cfg(tmp_path: Path, telemetry: dict | None) -> dict:
    return {
        "persistence": {"sqlite_path": str(tmp_path / "db.sqlite"), "checkpoint_root": str(tmp_path / "ck")},
        "models": [{"name": "mock", "backend": "mock", "model_id": "mock://tiny"}],
        **({"telemetry": telemetry} if telemetry is not None else {}),
    }


class Env:
    def __init__(self, tmp_path: Path, telemetry: dict | None = None, keys: dict | None = None):
        self.raw = _cfg(tmp_path, telemetry)
        self.cfg = parse_config(self.raw)
        self.store = Store(self.cfg.persistence.sqlite_file())
        self.keys = keys or {"alice": self.store.create_key("alice")[1], "bob": self.store.create_key("bob")[1],
                             "root": self.store.create_key("root", is_admin=True)[1]}
        wc = {**worker_config(self.cfg.models[0]), "telemetry": self.cfg.telemetry.enabled}
        self.app = create_app(self.cfg, {"mock": [ModelWorker(wc)]}, store=self.store)

    def client(self, who: str | None) -> httpx.AsyncClient:
        headers = {"X-API-Key": self.keys[who]} if who else {}
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://t", headers=headers)


async def _done(c: httpx.AsyncClient, ref: dict) -> dict:
    r = await c.get(f"{API}/futures/{ref['future_id']}", params={"timeout": 30})
    body = r.json()
    assert body["status"] == "complete", body
    return body["result"]


async def _train_and_sample(c: httpx.AsyncClient, lengths: list[int]) -> tuple[int, int, int]:
    """Returns (tokens trained, tokens prefilled, tokens sampled) as the client counts them."""
    sid = (await c.post(f"{API}/sessions", json={"lease_seconds": 120})).json()["session_id"]
    r = await c.post(f"{API}/runs", json={"session_id": sid, "base_model": "mock", "lora": {"rank": 4}})
    run = (await _done(c, r.json()))["run_id"]
    data = [_datum(list(range(5, 5 + n))) for n in lengths]
    for seq in range(2):
        r = await c.post(f"{API}/runs/{run}/forward_backward", json={"data": data, "loss_fn": "cross_entropy",
                                                                    "seq_id": 2 * seq})
        await _done(c, r.json())
        r = await c.post(f"{API}/runs/{run}/optim_step", json={"adam_params": {"learning_rate": 1e-3},
                                                              "seq_id": 2 * seq + 1})
        await _done(c, r.json())
    prompt = [5, 6, 7]
    r = await c.post(f"{API}/sample", json={
        "run_id": run, "num_samples": 2, "sampling_params": {"max_tokens": 4},
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": prompt}]}})
    assert r.status_code == 200, r.text
    out = await _done(c, r.json())
    sampled = sum(len(s["tokens"]) for s in out["sequences"])
    return 2 * sum(lengths), len(prompt), sampled


@pytest.fixture(autouse=True)
def _restore_logging():
    """install_telemetry configures logging (levels, filters): leave the process as it was."""
    root = logging.getLogger()
    saved = [(h, h.formatter, list(h.filters)) for h in root.handlers]
    level = logging.getLogger("twinkle").level
    yield
    for h, fmt, filters in saved:
        h.setFormatter(fmt)
        h.filters[:] = filters
    logging.getLogger("twinkle").setLevel(level)


def _families(text: str) -> dict[str, list]:
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def _value(samples: list, name: str, **labels: str) -> float:
    return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def test_telemetry_config_is_strict_and_off_by_default(tmp_path, capsys):
    assert parse_config(_cfg(tmp_path, None)).telemetry.enabled is False
    for bad, where in [({"enabled": True, "otlp": {"protcol": "grpc"}}, "telemetry.otlp"),
                       ({"otlp": {"protocol": "thrift"}}, "telemetry.otlp.protocol"),
                       ({"trace_sample_ratio": 1.5}, "telemetry.trace_sample_ratio"),
                       ({"prometheus": {"path": "/api/v1/metrics"}}, "telemetry.prometheus.path"),
                       ({"prometheus": {"token_env": "not a name"}}, "telemetry.prometheus.token_env"),
                       ({"otlp": {"endpoint": "localhost:4317"}}, "telemetry.otlp.endpoint")]:
        with pytest.raises(ConfigError) as e:
            parse_config(_cfg(tmp_path, bad))
        assert where in str(e.value), (bad, str(e.value))
    p = tmp_path / "c.yaml"
    import yaml

    p.write_text(yaml.safe_dump(_cfg(tmp_path, {"enabled": True, "otlp": {"endpoint": "http://x:4317",
                                                                          "protocol": "grpc"}})))
    assert cli_main(["check-config", "-c", str(p)]) == 0
    out = capsys.readouterr().out
    assert "telemetry: on: prometheus /metrics (admin), otlp grpc http://x:4317" in out
    p.write_text(yaml.safe_dump(_cfg(tmp_path, {"enabled": True, "bogus": 1})))
    assert cli_main(["check-config", "-c", str(p)]) == 2
    assert "unknown key 'bogus' at telemetry" in capsys.readouterr().err


@pytest.mark.slow
def test_telemetry_off_imports_nothing(tmp_path):
    """With telemetry off, serving requests imports neither prometheus_client, the OpenTelemetry SDK nor our
    metrics code. (FastAPI >= 0.16x itself imports the OpenTelemetry *API*, a no-op without an SDK.)"""
    code = f"""
import asyncio, sys, httpx
sys.path.insert(0, {str(REPO)!r})
from twinkle.server.app import create_app, worker_config
from twinkle.server.config import parse_config
from twinkle.server.store import Store
from twinkle.server.worker import ModelWorker
cfg = parse_config({json.dumps(_cfg(tmp_path, None))})
store = Store(cfg.persistence.sqlite_file()); key = store.create_key("u")[1]
app = create_app(cfg, {{"mock": [ModelWorker(worker_config(cfg.models[0]))]}}, store=store)
async def go():
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t",
                                 headers={{"X-API-Key": key}}) as c:
        r = await c.post("/api/v1/twinkle/sessions", json={{}}); assert r.status_code == 200
        assert (await c.get("/metrics")).status_code == 404
        assert (await c.get("/api/v1/twinkle/usage")).status_code == 200
asyncio.run(go())
bad = sorted(m for m in sys.modules if m.startswith(("prometheus_client", "opentelemetry.sdk",
             "opentelemetry.exporter", "twinkle.server.telemetry.metrics", "twinkle.server.telemetry.setup")))
print("LOADED", bad)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "LOADED []" in out.stdout, out.stdout



def test_fastapi_adds_one_http_span_per_request_and_nothing_else(tmp_path):
    """FastAPI >= 0.165 traces every request itself once a global OpenTelemetry tracer provider exists (ours when
    traces are exported): its SERVER span is the gateway's HTTP span, but by default it adds three more a request
    (dependencies, endpoint, serialization). The server keeps only the HTTP span. In a subprocess: a global
    provider cannot be replaced once set."""
    code = f"""
import asyncio
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
import httpx
from twinkle.server.app import create_app, worker_config
from twinkle.server.config import parse_config
from twinkle.server.store import Store
from twinkle.server.worker import ModelWorker

exp = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exp))
trace.set_tracer_provider(provider)
cfg = parse_config({{"persistence": {{"sqlite_path": {str(tmp_path / "db.sqlite")!r},
                                      "checkpoint_root": {str(tmp_path / "ck")!r}}},
                     "models": [{{"name": "mock", "backend": "mock", "model_id": "mock://tiny"}}]}})
store = Store(cfg.persistence.sqlite_file())
key = store.create_key("alice")[1]
app = create_app(cfg, {{"mock": [ModelWorker(worker_config(cfg.models[0]))]}}, store=store)

async def go():
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t",
                                     headers={{"X-API-Key": key}}) as c:
            assert (await c.get("/api/v1/twinkle/capabilities")).status_code == 200
            assert (await c.post("/api/v1/twinkle/sessions", json={{}})).status_code == 200
            assert (await c.get("/api/v1/twinkle/runs/nope")).status_code == 404

asyncio.run(go())
print("SPANS", sorted(s.name for s in exp.get_finished_spans()))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    want = ["GET /api/v1/twinkle/capabilities", "GET /api/v1/twinkle/runs/{run_id}", "POST /api/v1/twinkle/sessions"]
    assert f"SPANS {want}" in out.stdout, out.stdout

def test_metrics_endpoint_access_and_content(tmp_path, monkeypatch):
    monkeypatch.setenv("OBS_TEST_SCRAPE", "scrape-secret-123456")
    env = Env(tmp_path, {"enabled": True, "prometheus": {"access": "token", "token_env": "OBS_TEST_SCRAPE"}})

    async def go():
        async with env.client("alice") as a, env.client("bob") as b:
            ta, pa, sa = await _train_and_sample(a, [4, 6])
            tb, pb, sb = await _train_and_sample(b, [3])
            r = await a.post(f"{API}/runs/nope/forward_backward", json={"data": [_datum([1, 2])]})
            assert r.status_code == 404
        async with env.client(None) as anon:
            assert (await anon.get("/metrics")).status_code == 401
            r = await anon.get("/metrics", headers={"Authorization": "Bearer wrong-token-xyz"})
            assert r.status_code == 401
            async with env.client("alice") as a:
                r = await a.get("/metrics")
                assert r.status_code == 403 and r.json()["code"] == "forbidden"
            r = await anon.get("/metrics", headers={"Authorization": "Bearer scrape-secret-123456"})
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
            text = r.text
            async with env.client("root") as root:
                assert (await root.get("/metrics")).status_code == 200
        return text, (ta, pa, sa), (tb, pb, sb)

    text, (ta, pa, sa), (tb, pb, sb) = asyncio.run(go())
    f = _families(text)
    assert _value(f["twinkle_tokens"], "twinkle_tokens_total", base_model="mock", kind="trained") == ta + tb
    assert _value(f["twinkle_tokens"], "twinkle_tokens_total", kind="sampled") == sa + sb
    assert _value(f["twinkle_user_tokens"], "twinkle_user_tokens_total", user="alice", kind="trained") == ta
    assert _value(f["twinkle_user_tokens"], "twinkle_user_tokens_total", user="bob", kind="prefilled") == pb
    assert _value(f["twinkle_optim_steps"], "twinkle_optim_steps_total", base_model="mock") == 4
    # HTTP metrics use route templates, never raw ids
    routes = {s.labels["route"] for s in f["twinkle_http_requests"]}
    assert f"{API}/runs/{{run_id}}/forward_backward" in routes
    assert not any(":train:" in r for r in routes)
    assert _value(f["twinkle_http_requests"], "twinkle_http_requests_total",
                  route=f"{API}/runs/{{run_id}}/forward_backward", status="404") == 1
    assert _value(f["twinkle_http_requests"], "twinkle_http_requests_total", route="/metrics", status="401") == 2
    assert _value(f["twinkle_operation_duration_seconds"], "twinkle_operation_duration_seconds_count",
                  operation="forward_backward", base_model="mock") == 4
    # worker-replica metrics arrive labelled with their base model and replica
    assert _value(f["twinkle_queue_wait_seconds"], "twinkle_queue_wait_seconds_count", operation="forward_backward",
                  base_model="mock", replica="0") == 4
    assert _value(f["twinkle_execution_seconds"], "twinkle_execution_seconds_count", operation="sample") == 2
    assert _value(f["twinkle_batches"], "twinkle_batches_total", base_model="mock") >= 1
    assert _value(f["twinkle_batch_tokens"], "twinkle_batch_tokens_sum") == ta + tb
    pad = _value(f["twinkle_batch_padding_ratio"], "twinkle_batch_padding_ratio_sum")
    assert 0 < pad < 4  # alice's rows (4, 6) pad; bob's single row does not
    assert _value(f["twinkle_adapters_loaded"], "twinkle_adapters_loaded", replica="0") == 2
    assert _value(f["twinkle_worker_process_resident_memory_bytes"],
                  "twinkle_worker_process_resident_memory_bytes") > 1e6
    assert _value(f["twinkle_gateway_process_resident_memory_bytes"],
                  "twinkle_gateway_process_resident_memory_bytes") > 1e6
    assert _value(f["twinkle_state"], "twinkle_state", what="runs_active") == 2
    for key in env.keys.values():  # no secret in any label or value
        assert key not in text
    assert "scrape-secret" not in text


def test_usage_routes_isolation_restart_and_cli(tmp_path, capsys):
    env = Env(tmp_path)

    async def go(e: Env):
        async with e.client("alice") as a, e.client("bob") as b:
            ta, pa, sa = await _train_and_sample(a, [4, 6])
            tb, pb, sb = await _train_and_sample(b, [3])
            r = await a.post(f"{API}/runs", json={})  # refused requests cost nothing
            mine = (await a.get(f"{API}/usage")).json()["rows"]
            assert mine == [{"user": "alice", "base_model": "mock", "tokens_trained": ta, "tokens_prefilled": pa,
                             "tokens_sampled": sa, "requests": 3, "checkpoint_bytes": 0, "checkpoints": 0}]
            for path, params in [("/usage", {"user": "bob"}), ("/admin/usage", {})]:
                r = await a.get(API + path, params=params)
                assert r.status_code == 403 and r.json()["code"] == "forbidden", r.text
            r = await a.get(f"{API}/usage", params={"since": "yesterday"})
            assert r.status_code == 400 and r.json()["detail"]["field"] == "since"
            assert (await a.get(f"{API}/usage", params={"since": "1h"})).json()["rows"] == mine
            assert (await a.get(f"{API}/usage", params={"until": "2h"})).json()["rows"] == []
            load = (await a.get(f"{API}/load")).json()
            assert load["tokens_per_s"]["trained"] == pytest.approx((ta + tb) / load["window_s"], abs=1e-3)
            assert load["usage"] == mine and load["replicas"][0]["adapters"] == 2
            assert load["queue_depth"] == 0
        return (ta, pa, sa), (tb, pb, sb)

    async def lifespan(e: Env, fn):
        async with e.app.router.lifespan_context(e.app):
            return await fn(e)

    (ta, pa, sa), (tb, pb, sb) = asyncio.run(lifespan(env, go))
    env.store.close()
    # a restart (a new app over the same SQLite file) keeps the ledger
    env2 = Env(tmp_path, keys=env.keys)

    async def admin(e: Env):
        async with e.client("root") as root:
            rows = (await root.get(f"{API}/admin/usage")).json()["rows"]
            bob = (await root.get(f"{API}/usage", params={"user": "bob"})).json()["rows"]
        return rows, bob

    rows, bob = asyncio.run(admin(env2))
    assert [(r["user"], r["tokens_trained"], r["tokens_sampled"]) for r in rows] == [("alice", ta, sa), ("bob", tb, sb)]
    assert bob == [rows[1]]
    env2.store.close()
    p = tmp_path / "c.yaml"
    p.write_text(json.dumps(env.raw))
    assert cli_main(["usage", "-c", str(p), "--format", "json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert {r["user"]: r["tokens_prefilled"] for r in rep["rows"]} == {"alice": pa, "bob": pb}
    assert cli_main(["usage", "-c", str(p), "--format", "csv", "--user", "bob"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("user,base_model,tokens_trained") and lines[1].startswith(f"bob,mock,{tb},{pb},{sb}")
    assert cli_main(["usage", "-c", str(p), "--since", "7d"]) == 0
    table = capsys.readouterr().out
    assert "alice" in table and f"{ta:,}" in table
    assert cli_main(["usage", "-c", str(p), "--since", "soon"]) == 2


def test_secrets_never_logged():
    key = "tml-" + "A1b2C3d4" * 5
    assert key not in redact(f"auth failed for {key}")
    assert "hunter2hunter2" not in redact("Authorization: Bearer hunter2hunter2")
    assert "s3cr3t-t0ken" not in redact('{"api_key": "s3cr3t-t0ken"}')
    rec = logging.LogRecord("twinkle.server", logging.INFO, __file__, 1, "key %s token=%s", (key, "abcdefghijk"), None)
    RedactSecrets().filter(rec)
    assert key not in rec.getMessage() and "abcdefghijk" not in rec.getMessage()


def test_json_log_lines_carry_trace_ids_and_mask_secrets():
    import io

    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    from twinkle.server.telemetry.config import LogsConfig
    from twinkle.server.telemetry.logs import JsonFormatter, apply_logs

    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    root = logging.getLogger()
    saved = [(h, h.formatter, list(h.filters)) for h in root.handlers]  # apply_logs touches every root handler
    root.addHandler(handler)
    try:
        apply_logs(LogsConfig(format="json", level="debug", levels={"twinkle.server.scheduler": "warning"}))
        assert isinstance(handler.formatter, JsonFormatter)
        assert logging.getLogger("twinkle.server.scheduler").level == logging.WARNING
        key = "tml-" + "Zz9" * 12
        span = TracerProvider().get_tracer("t").start_span("s")  # a local provider: nothing global changes
        with trace.use_span(span, end_on_exit=True):
            logging.getLogger("twinkle.server").info("auth with %s failed", key)
        line = json.loads(buf.getvalue().strip().splitlines()[-1])
        ctx = span.get_span_context()
        assert line["trace_id"] == format(ctx.trace_id, "032x") and line["span_id"] == format(ctx.span_id, "016x")
        assert line["level"] == "info" and line["logger"] == "twinkle.server"
        assert key not in buf.getvalue() and "[REDACTED]" in line["message"]
    finally:
        root.removeHandler(handler)
        for h, fmt, filters in saved:
            h.setFormatter(fmt)
            h.filters[:] = filters
        logging.getLogger("twinkle").setLevel(logging.NOTSET)
        logging.getLogger("twinkle.server.scheduler").setLevel(logging.NOTSET)


def test_streamed_sampling_is_metered(tmp_path):
    env = Env(tmp_path)

    async def go():
        async with env.client("alice") as a:
            body = {"base_model": "mock", "num_samples": 2, "sampling_params": {"max_tokens": 5},
                    "prompt": {"chunks": [{"type": "encoded_text", "tokens": [5, 6, 7, 8]}]}}
            r = await a.post(f"{API}/sample/stream", json=body)
            assert r.status_code == 200, r.text
            done = json.loads(r.text.strip().split("\n\n")[-1].split("\n")[1][6:])
            sampled = sum(len(q["tokens"]) for q in done["sequences"])
            rows = (await a.get(f"{API}/usage")).json()["rows"]
            assert [(x["tokens_prefilled"], x["tokens_sampled"]) for x in rows] == [(4, sampled)]

    asyncio.run(go())
