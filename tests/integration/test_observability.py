"""Acceptance for observability: a REAL Prometheus (Debian's ``prometheus``, installed by ``.ci/run``) scrapes a
REAL Twinkle server (Ray Serve, two worker replicas) configured from ``cookbook/observability/``; after a
scripted workload (two users training and sampling, one flooding a small queue into 429s), PromQL through
Prometheus's HTTP API returns the counts the client saw, per-user usage matches the tokens sent (metrics, the
usage route and ``twinkle-server usage``), and EVERY PromQL expression of the shipped Grafana dashboard
returns data. The steps are the ones cookbook/observability/README.md gives an operator."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import tempfile
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml

from tests.integration.conftest import _free_port, own_server
from tests.otlp_receiver import OtlpReceiver

pytestmark = [pytest.mark.slow, pytest.mark.integration]

COOKBOOK = Path(__file__).resolve().parents[2] / "cookbook" / "observability"
API = "/api/v1/twinkle"
TOKEN = "obs-scrape-token-" + "x" * 16
PROMETHEUS = shutil.which("prometheus")


def _datum(n: int, start: int = 5) -> dict:
    toks = list(range(start, start + n))
    return {"model_input": {"chunks": [{"type": "encoded_text", "tokens": toks}]},
            "loss_fn_inputs": {"target_tokens": {"data": toks[1:] + [2], "dtype": "int64"},
                               "weights": {"data": [1] * n, "dtype": "float32"}}}


def _server_cfg(otlp_port: int) -> dict:
    """The cookbook's server config, with the builtin transformers model swapped for two mock replicas
    (seconds instead of minutes on CI) and a small queue so a flood meets 429s, plus a one-replica model
    (two users' runs share its batches) and traces sent to the test's OTLP/HTTP receiver."""
    cfg = yaml.safe_load((COOKBOOK / "server_config.yaml").read_text())
    cfg["auth"] = {"bootstrap_key_env": None}
    cfg["telemetry"]["otlp"] = {"endpoint": f"http://127.0.0.1:{otlp_port}", "protocol": "http/protobuf",
                                "metrics": True}  # the cookbook scrapes only; here metrics are pushed as well
    cfg["telemetry"]["metric_export_interval_s"] = 1
    cfg["models"] = [{"name": "mock", "backend": "mock", "model_id": "mock://tiny", "replicas": 2,
                      "max_queue": 2, "ray_actor_options": {"num_cpus": 0}},
                     {"name": "mock-one", "backend": "mock", "model_id": "mock://tiny",
                      "ray_actor_options": {"num_cpus": 0}}]
    return cfg


@pytest.fixture(scope="module")
def stack():
    if PROMETHEUS is None:
        pytest.skip("Debian's prometheus is not installed (.ci/run installs it)")
    old = os.environ.get("TWINKLE_METRICS_TOKEN")
    os.environ["TWINKLE_METRICS_TOKEN"] = TOKEN  # the server inherits it (README step 1)
    otlp = OtlpReceiver()
    try:
        with own_server(_server_cfg(otlp.port), "twinkle-obs-") as srv:
            srv.otlp = otlp
            srv.create_key("bob")
            srv.keys["ops"] = srv._cli("keys", "create", "--user", "ops", "--admin").strip().splitlines()[-1]
            work = Path(tempfile.mkdtemp(prefix="twinkle-prom-"))
            (work / "metrics_token").write_text(TOKEN)
            prom_cfg = yaml.safe_load((COOKBOOK / "prometheus.yml").read_text())
            prom_cfg["global"]["scrape_interval"] = "1s"
            job = prom_cfg["scrape_configs"][0]
            job["authorization"]["credentials_file"] = str(work / "metrics_token")
            job["static_configs"][0]["targets"] = [f"127.0.0.1:{srv.port}"]
            (work / "prometheus.yml").write_text(yaml.safe_dump(prom_cfg))
            port = _free_port()
            log = open(work / "prometheus.log", "w")  # noqa: SIM115
            proc = subprocess.Popen([PROMETHEUS, f"--config.file={work / 'prometheus.yml'}",
                                     f"--storage.tsdb.path={work / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                                    stdout=log, stderr=subprocess.STDOUT)
            prom = f"http://127.0.0.1:{port}"
            try:
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    try:
                        if httpx.get(f"{prom}/-/ready", timeout=2).status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    time.sleep(0.3)
                else:
                    raise RuntimeError("prometheus did not start: " + (work / "prometheus.log").read_text()[-3000:])
                while time.monotonic() < deadline:  # the first scrape happened: the workload will be seen
                    if _query(prom, 'up{job="twinkle"} == 1'):
                        break
                    time.sleep(0.3)
                else:
                    raise RuntimeError("prometheus never scraped the server: "
                                       + (work / "prometheus.log").read_text()[-3000:])
                yield srv, prom
            finally:
                proc.terminate()
                proc.wait(timeout=30)
                log.close()
                shutil.rmtree(work, ignore_errors=True)
    finally:
        otlp.close()
        if old is None:
            os.environ.pop("TWINKLE_METRICS_TOKEN", None)
        else:
            os.environ["TWINKLE_METRICS_TOKEN"] = old


def _query(prom: str, expr: str) -> list[dict]:
    r = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=10)
    body = r.json()
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]


def _scalar(prom: str, expr: str) -> float:
    res = _query(prom, expr)
    return float(res[0]["value"][1]) if res else 0.0


class _User:
    def __init__(self, url: str, key: str):
        self.c = httpx.Client(base_url=url + API, headers={"X-API-Key": key}, timeout=60)
        self.trained = self.prefilled = self.sampled = self.steps = 0

    def done(self, ref: dict) -> dict:
        body = self.c.get(f"/futures/{ref['future_id']}", params={"timeout": 50}).json()
        assert body["status"] in ("complete", "failed"), body
        return body

    def run(self, base_model: str = "mock") -> str:
        sid = self.c.post("/sessions", json={"lease_seconds": 300}).json()["session_id"]
        ref = self.c.post("/runs", json={"session_id": sid, "base_model": base_model, "lora": {"rank": 4}}).json()
        return self.done(ref)["result"]["run_id"]

    def train(self, run: str, lengths: list[int], steps: int, seq0: int = 0) -> None:
        for i in range(steps):
            r = self.c.post(f"/runs/{run}/forward_backward",
                            json={"data": [_datum(n) for n in lengths], "seq_id": seq0 + 2 * i})
            assert self.done(r.json())["status"] == "complete"
            self.trained += sum(lengths)
            r = self.c.post(f"/runs/{run}/optim_step", json={"adam_params": {"learning_rate": 1e-3},
                                                              "seq_id": seq0 + 2 * i + 1})
            assert self.done(r.json())["status"] == "complete"
            self.steps += 1

    def sample(self, run: str, prompt_len: int, n: int) -> None:
        r = self.c.post("/sample", json={"run_id": run, "num_samples": n, "sampling_params": {"max_tokens": 5},
                                         "prompt": {"chunks": [{"type": "encoded_text",
                                                                "tokens": list(range(3, 3 + prompt_len))}]}})
        body = self.done(r.json())
        assert body["status"] == "complete", body
        self.prefilled += prompt_len
        self.sampled += sum(len(s["tokens"]) for s in body["result"]["sequences"])

    def flood(self, run: str, n: int) -> tuple[int, int]:
        """``n`` forward passes at once (no seq ids): returns (completed, refused with 429)."""
        with ThreadPoolExecutor(8) as pool:  # concurrent submits, so the small queue overflows
            refs = list(pool.map(lambda _: self.c.post(f"/runs/{run}/forward", json={"data": [_datum(8)]}).json(),
                                 range(n)))
        ok = refused = 0
        for ref in refs:
            body = self.done(ref)
            if body["status"] == "complete":
                ok += 1
                self.prefilled += 8
            else:
                assert body["error"]["code"] == "capacity", body
                refused += 1
        return ok, refused


def test_prometheus_scrapes_workload_and_dashboard_has_data(stack):
    srv, prom = stack
    alice, bob = _User(srv.url, srv.keys["alice"]), _User(srv.url, srv.keys["bob"])
    ra, rb = alice.run(), bob.run()
    refused = 0
    # Two phases a few scrapes apart: every series exists before it grows, so rate() sees the growth.
    for phase in range(2):
        with ThreadPoolExecutor(2) as pool:  # two users training at once
            fa = pool.submit(alice.train, ra, [6, 10], 3, 6 * phase)  # seq ids run on
            fb = pool.submit(bob.train, rb, [7], 2, 4 * phase)
            fa.result()
            fb.result()
        alice.sample(ra, 4, 2)
        bob.sample(rb, 6, 1)
        for _ in range(3):
            got = bob.flood(rb, 40)[1]
            refused += got
            if got:
                break
        time.sleep(2.5)
    assert refused > 0, "a 40-request flood on a queue of 2 met no 429"
    # the scrape endpoint refuses a non-admin user; Prometheus holds the token
    assert httpx.get(f"{srv.url}/metrics", headers={"X-API-Key": srv.keys["alice"]}).status_code == 403

    expect_steps = alice.steps + bob.steps
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if (_scalar(prom, "sum(twinkle_optim_steps_total)") >= expect_steps
                and _scalar(prom, "sum(twinkle_rejections_total)") >= refused
                and _scalar(prom, 'sum(twinkle_user_tokens_total{kind="sampled"})') >= alice.sampled + bob.sampled):
            break
        time.sleep(1)
    time.sleep(2.5)  # two more scrapes, so rate() has points after the last request

    assert _scalar(prom, "sum(twinkle_optim_steps_total)") == expect_steps
    assert _scalar(prom, 'sum(twinkle_rejections_total{operation="forward"})') == refused
    assert _scalar(prom, 'sum(up{job="twinkle"})') == 1
    for u, name in ((alice, "alice"), (bob, "bob")):
        for kind, n in (("trained", u.trained), ("prefilled", u.prefilled), ("sampled", u.sampled)):
            got = _scalar(prom, f'sum(twinkle_user_tokens_total{{user="{name}",kind="{kind}"}})')
            assert got == n, (name, kind, got, n)
    assert _scalar(prom, 'sum(twinkle_tokens_total{kind="trained"})') == alice.trained + bob.trained
    # worker replicas reach the one scrape target, labelled by replica
    replicas = {r["metric"]["replica"] for r in _query(prom, "twinkle_worker_process_resident_memory_bytes")}
    assert replicas == {"0", "1"}
    assert _scalar(prom, 'sum(twinkle_queue_wait_seconds_count{operation="forward_backward"})') == 10

    # the same metrics arrive pushed over OTLP (gateway + both worker replicas), with the same totals
    want = {(name, kind): n for u, name in ((alice, "alice"), (bob, "bob"))
            for kind, n in (("trained", u.trained), ("prefilled", u.prefilled), ("sampled", u.sampled))}
    deadline = time.monotonic() + 30
    while True:
        pushed = srv.otlp.last_metrics()
        got_pushed = {(p["attrs"]["user"], p["attrs"]["kind"]): p["value"]
                      for p in pushed.get("twinkle_user_tokens", {}).get("points", [])}
        if {k: got_pushed.get(k, 0) for k in want} == want or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert {k: got_pushed.get(k, 0) for k in want} == want
    waits = [p for p in pushed["twinkle_queue_wait_seconds"]["points"]
             if p["attrs"].get("operation") == "forward_backward"]
    assert {p["attrs"]["replica"] for p in pushed["twinkle_worker_process_resident_memory_bytes"]["points"]} \
        == {"0", "1"}
    assert sum(p["count"] for p in waits) == 10

    # usage metering: the route (own / admin) and the CLI agree with what was sent
    mine = alice.c.get("/usage").json()["rows"]
    assert [(r["user"], r["tokens_trained"], r["tokens_sampled"]) for r in mine] == [
        ("alice", alice.trained, alice.sampled)]
    assert alice.c.get("/usage", params={"user": "bob"}).status_code == 403
    ops = httpx.get(f"{srv.url}{API}/admin/usage", headers={"X-API-Key": srv.keys["ops"]}).json()["rows"]
    assert {r["user"]: r["tokens_prefilled"] for r in ops} == {"alice": alice.prefilled, "bob": bob.prefilled}
    cli = json.loads(srv._cli("usage", "--format", "json", "--since", "1h"))
    assert {r["user"]: r["tokens_trained"] for r in cli["rows"]} == {"alice": alice.trained, "bob": bob.trained}

    # every PromQL expression of the shipped dashboard returns data
    dash = json.loads((COOKBOOK / "grafana" / "dashboards" / "twinkle.json").read_text())
    empty = []
    n = 0
    for panel in dash["panels"]:
        for t in panel.get("targets", []):
            expr = t["expr"].replace("$__rate_interval", "1m").replace("$__range", "1h")
            n += 1
            values = [float(r["value"][1]) for r in _query(prom, expr)]
            if not any(math.isfinite(v) for v in values):
                empty.append((panel["title"], expr, values))
    assert n >= 20
    if empty:  # diagnostics: what Prometheus saw over the run
        end = time.time()
        for e in ("up", "scrape_duration_seconds", "sum(twinkle_queue_wait_seconds_count)",
                  "sum(twinkle_tokens_total)"):
            r = httpx.get(f"{prom}/api/v1/query_range", params={"query": e, "start": end - 90, "end": end,
                                                                "step": "1s"}, timeout=10).json()
            print(e, [(v[0] % 1000, v[1]) for res in r["data"]["result"] for v in res["values"]])
    assert not empty, "dashboard expressions without data:\n" + "\n".join(map(str, empty))
    print(f"\n{n} dashboard expressions have data; query them at {prom}/graph?g0.expr="
          + urllib.parse.quote("sum(twinkle_tokens_total)"))


def test_trace_nests_client_gateway_queue_batch_and_links_a_mixed_batch(stack, monkeypatch):
    """A real server exports, to an OTLP/HTTP receiver, traces that continue the client's ``traceparent``:
    client → gateway HTTP span → operation span → queue → batch → forward_backward (worker replica), and a
    batch span of a mixed batch linked to requests of two users."""
    import twinkle_client
    import twinkle_client._transport as transport
    from twinkle.types import NotFoundError

    srv, _ = stack
    sent: list[str] = []
    real = transport.new_traceparent

    def recording() -> str:
        tp = real()
        sent.append(tp)
        return tp

    monkeypatch.setattr(transport, "new_traceparent", recording)
    sess = twinkle_client.connect(srv.url, srv.keys["alice"], heartbeat=False)
    try:
        rid = sess.http.post("runs", {"session_id": sess.session_id, "base_model": "mock-one",
                                      "lora": {"rank": 4}}, params={"wait": 30})["state"]["result"]["run_id"]
        sent.clear()
        ref = sess.http.post(f"runs/{rid}/forward_backward", {"data": [_datum(5)], "seq_id": 0},
                             params={"wait": 30})
        assert ref["state"]["status"] == "complete", ref
        _, trace_id, client_span, _ = sent[0].split("-")
        with pytest.raises(NotFoundError) as e:  # an error names the trace the client started
            sess.get_run("no-such-run")
        assert f"trace id {sent[-1].split('-')[1]}" in str(e.value) and "request id" in str(e.value)
    finally:
        sess.detach()

    def spans() -> list[dict]:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            got = srv.otlp.trace(trace_id)
            if {"batch", "forward_backward", "queue", "twinkle.forward_backward"} <= {s["name"] for s in got}:
                return got
            time.sleep(0.5)
        raise AssertionError(f"trace {trace_id} incomplete: {[s['name'] for s in srv.otlp.trace(trace_id)]}")

    got = spans()
    by_id = {s["span_id"]: s for s in got}
    http = [s for s in got if s["parent"] == client_span]
    assert len(http) == 1 and http[0]["resource"]["twinkle.role"] == "gateway"
    assert http[0]["resource"]["service.name"] == "twinkle"
    op = next(s for s in got if s["name"] == "twinkle.forward_backward")
    chain = []  # gateway spans between the HTTP span and ours (FastAPI's own route/handler spans)
    cur = op
    while cur["parent"] in by_id and cur["parent"] != http[0]["span_id"]:
        cur = by_id[cur["parent"]]
        chain.append(cur["name"])
    assert cur["parent"] == http[0]["span_id"], (op, chain)
    assert len(chain) <= 2, chain
    assert op["attrs"]["enduser.id"] == "alice" and op["attrs"]["twinkle.run_id"] == rid
    assert op["attrs"]["twinkle.base_model"] == "mock-one"
    fb = next(s for s in got if s["name"] == "forward_backward")
    batch = by_id[fb["parent"]]
    queue = by_id[batch["parent"]]
    assert batch["name"] == "batch" and queue["name"] == "queue" and queue["parent"] == op["span_id"]
    assert fb["resource"]["twinkle.role"] == "worker"
    assert fb["attrs"]["twinkle.seq_id"] == 0 and fb["attrs"]["twinkle.run_id"] == rid
    assert batch["attrs"]["twinkle.batch.size"] >= 1
    assert any(ln["span_id"] == op["span_id"] for ln in batch["links"])

    with srv.otlp.lock:  # no secret in any span
        blob = json.dumps(srv.otlp.spans)
    assert not any(key in blob for key in srv.keys.values()) and TOKEN not in blob

    # a mixed batch: alice and bob submit at once to the one-replica model
    alice, bob = _User(srv.url, srv.keys["alice"]), _User(srv.url, srv.keys["bob"])
    runs = {"alice": alice.run("mock-one"), "bob": bob.run("mock-one")}
    owner = {v: k for k, v in runs.items()}
    for _ in range(5):
        with ThreadPoolExecutor(8) as pool:
            refs = list(pool.map(lambda a: (a[0].c.post(f"/runs/{a[1]}/forward", json={"data": [_datum(6)]}).json()),
                                 [(alice, runs["alice"]), (bob, runs["bob"])] * 4))
        for u, ref in zip([alice, bob] * 4, refs, strict=True):
            u.done(ref)
        time.sleep(2.0)  # the batch span processor exports every second
        with srv.otlp.lock:
            mixed = [s for s in srv.otlp.spans if s["name"] == "batch" and s["attrs"].get("twinkle.batch.mixed")]
        users = [{owner.get(ln["attrs"].get("twinkle.run_id")) for ln in s["links"]} for s in mixed]
        if any({"alice", "bob"} <= u for u in users):
            break
    else:
        raise AssertionError(f"no mixed batch span linked to both users: {users}")
