"""OTLP metric push (in-process app, mock ModelWorker, the test OTLP/HTTP receiver): the families pushed are the
ones ``/metrics`` serves (names, labels, values; worker-replica families included), pushed periodically from the
app's lifespan with a last push at shutdown; off without an OTLP endpoint; no secret in what is pushed."""

from __future__ import annotations

import asyncio
import math
import sys

from prometheus_client.parser import text_string_to_metric_families

from tests.otlp_receiver import OtlpReceiver
from tests.server.test_telemetry import API, Env, _restore_logging, _train_and_sample  # noqa: F401
from twinkle.server.config import parse_config
from twinkle.server.telemetry.metrics import LATENCY_BUCKETS

_CUMULATIVE = 2  # AGGREGATION_TEMPORALITY_CUMULATIVE in the OTLP proto


def _key(attrs: dict) -> tuple:
    return tuple(sorted((k, str(v)) for k, v in attrs.items()))


def _expected(text: str) -> dict[str, dict]:
    """What each /metrics family should look like over OTLP: {name: {kind, points: {attrs: value}}}."""
    out: dict[str, dict] = {}
    for fam in text_string_to_metric_families(text):
        if "process_" in fam.name or fam.name == "twinkle_http_requests_in_flight":
            continue  # moves between the push and the scrape (CPU, RSS, the scrape itself in flight)
        if not fam.samples:
            continue  # a labelled family with no series yet: nothing to push (an OTLP metric needs a point)
        pts: dict[tuple, object] = {}
        if fam.type == "counter":
            for s in fam.samples:
                if s.name.endswith("_total"):
                    pts[_key(s.labels)] = s.value
            out[fam.name] = {"kind": "sum", "points": pts}
        elif fam.type == "histogram":
            for s in fam.samples:
                le = s.labels.get("le")
                key = _key({k: v for k, v in s.labels.items() if k != "le"})
                one = pts.setdefault(key, {"cum": {}, "count": None, "sum": None})
                if s.name.endswith("_bucket"):
                    one["cum"][float(le)] = s.value  # type: ignore[index]
                elif s.name.endswith("_count"):
                    one["count"] = s.value  # type: ignore[index]
                else:
                    one["sum"] = s.value  # type: ignore[index]
            out[fam.name] = {"kind": "histogram", "points": pts}
        else:
            out[fam.name] = {"kind": "gauge", "points": {_key(s.labels): s.value for s in fam.samples}}
    return out


def _check_same(pushed: dict[str, dict], text: str) -> None:
    expected = _expected(text)
    assert expected, "no families on /metrics"
    for name, exp in expected.items():
        assert name in pushed, f"{name} is on /metrics but was not pushed"
        got = pushed[name]
        assert got["kind"] == exp["kind"], name
        points = {_key(p["attrs"]): p for p in got["points"]}
        assert set(points) == set(exp["points"]), name
        for key, want in exp["points"].items():
            p = points[key]
            if exp["kind"] == "histogram":
                assert p["count"] == want["count"] and math.isclose(p["sum"], want["sum"]), (name, key)
                bounds = sorted(b for b in want["cum"] if not math.isinf(b))
                assert p["bounds"] == bounds, (name, key)
                cum = [sum(p["buckets"][: i + 1]) for i in range(len(p["buckets"]))]
                assert cum == [want["cum"][b] for b in [*bounds, math.inf]], (name, key)
                assert p["temporality"] == _CUMULATIVE
            else:
                assert math.isclose(p["value"], want), (name, key, p["value"], want)
                if exp["kind"] == "sum":
                    assert p["monotonic"] and p["temporality"] == _CUMULATIVE, name


def _stop_tracing() -> None:
    """An OTLP endpoint also turns traces on (one global provider per process): shut it down so later apps in
    this process send no spans to a receiver that is gone."""
    tracing = sys.modules.get("twinkle.server.telemetry.tracing")
    if tracing is not None and tracing._provider is not None:
        tracing._provider.shutdown()


def test_otlp_metric_push_matches_prometheus_endpoint(tmp_path):
    rx = OtlpReceiver()
    try:
        env = Env(tmp_path, {"enabled": True, "service_name": "twinkle-otlp-test", "metric_export_interval_s": 1,
                             "resource_attributes": {"deployment.environment": "ci"},
                             "prometheus": {"access": "open"},
                             "otlp": {"endpoint": f"http://127.0.0.1:{rx.port}",
                                      "headers": {"x-collector-tenant": "lab"}}})
        pusher = env.app.state.otlp_metrics
        assert pusher.interval_s == 1.0

        async def go() -> tuple[dict, str, int, int]:
            async with env.app.router.lifespan_context(env.app):
                async with env.client("alice") as a:
                    trained, prefilled, _ = await _train_and_sample(a, [4, 6])
                    for _ in range(100):  # the periodic push (every 1 s) shows the workload
                        fams = rx.last_metrics()
                        fb = [p for p in fams.get("twinkle_queue_wait_seconds", {}).get("points", [])
                              if p["attrs"].get("operation") == "forward_backward"]
                        if fb and fb[0]["count"] == 2:
                            break
                        await asyncio.sleep(0.1)
                    else:
                        raise AssertionError(f"no periodic push with the workload: {len(rx.metric_exports)}")
                    assert await pusher.push()  # one push, then the scrape: nothing runs in between
                    pushed = rx.last_metrics()
                    r = await a.get("/metrics")
                    assert r.status_code == 200
                n = len(rx.metric_exports)
            return pushed, r.text, trained, n

        pushed, text, trained, n_before_stop = asyncio.run(go())
        assert len(rx.metric_exports) == n_before_stop + 1, "stopping the app pushes a last time"
        _check_same(pushed, text)
        # the values a forward_backward produced, as the client counts them
        tok = {_key(p["attrs"]): p["value"] for p in pushed["twinkle_tokens"]["points"]}
        assert tok[_key({"base_model": "mock", "kind": "trained"})] == trained
        wait = [p for p in pushed["twinkle_queue_wait_seconds"]["points"]
                if p["attrs"] == {"operation": "forward_backward", "base_model": "mock", "replica": "0"}]
        assert len(wait) == 1 and wait[0]["count"] == 2 and wait[0]["bounds"] == list(LATENCY_BUCKETS)
        assert pushed["twinkle_batch_tokens"]["points"][0]["sum"] == trained
        assert pushed["twinkle_worker_process_resident_memory_bytes"]["points"][0]["value"] > 1e6
        m = pushed["twinkle_tokens"]
        assert m["resource"]["service.name"] == "twinkle-otlp-test"
        assert m["resource"]["deployment.environment"] == "ci" and m["resource"]["twinkle.role"] == "gateway"
        assert any(h.get("x-collector-tenant") == "lab" for h in rx.headers)
        # bounded, secret-free attributes
        blob = repr(rx.metric_exports)
        for key in env.keys.values():
            assert key not in blob
        for metric in pushed.values():
            for p in metric["points"]:
                assert not ({"run_id", "session_id", "request_id", "future_id"} & set(p["attrs"]))
    finally:
        _stop_tracing()  # flush this app's spans while the receiver still listens
        rx.close()


def test_otlp_metric_push_is_off_without_endpoint_and_exporters_follow_protocol(tmp_path):
    env = Env(tmp_path, {"enabled": True})
    assert not hasattr(env.app.state, "otlp_metrics")
    (tmp_path / "b").mkdir()
    env = Env(tmp_path / "b", {"enabled": True, "otlp": {"endpoint": "http://127.0.0.1:9", "metrics": False}})
    _stop_tracing()
    assert not hasattr(env.app.state, "otlp_metrics")
    from twinkle.server.telemetry.otlp_metrics import make_exporter

    raw = {"models": [{"name": "m", "backend": "mock", "model_id": "mock://tiny"}]}
    for proto, cls in (("grpc", "opentelemetry.exporter.otlp.proto.grpc.metric_exporter"),
                       ("http/protobuf", "opentelemetry.exporter.otlp.proto.http.metric_exporter")):
        cfg = parse_config({**raw, "telemetry": {"enabled": True,
                                                 "otlp": {"endpoint": "http://127.0.0.1:9", "protocol": proto}}})
        exp = make_exporter(cfg.telemetry)
        assert type(exp).__module__ == cls
        exp.shutdown()
