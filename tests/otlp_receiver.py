"""A minimal OTLP/HTTP receiver for tests: ``/v1/traces`` and ``/v1/metrics``, decoded with opentelemetry-proto."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def _any(v: Any) -> object:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


def _attrs(attrs: Any) -> dict[str, object]:
    return {a.key: _any(a.value) for a in attrs}


def _metric_points(m: Any) -> tuple[str, list[dict]]:
    """(kind, points) of one decoded OTLP Metric."""
    kind = m.WhichOneof("data")
    data = getattr(m, kind)
    points = []
    for p in data.data_points:
        pt: dict[str, Any] = {"attrs": _attrs(p.attributes)}
        if kind == "histogram":
            pt.update(count=p.count, sum=p.sum, bounds=list(p.explicit_bounds), buckets=list(p.bucket_counts),
                      temporality=data.aggregation_temporality)
        else:
            pt["value"] = p.as_double if p.WhichOneof("value") == "as_double" else p.as_int
            if kind == "sum":
                pt.update(monotonic=data.is_monotonic, temporality=data.aggregation_temporality)
        points.append(pt)
    return kind, points


class OtlpReceiver:
    """Collects spans (``self.spans``) and metric exports (``self.metric_exports``: one list of metric dicts
    per request, each ``{name, kind, description, resource, points}``) posted over OTLP/HTTP protobuf."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
            ExportMetricsServiceRequest,
            ExportMetricsServiceResponse,
        )
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
            ExportTraceServiceResponse,
        )

        self.spans: list[dict] = []
        self.metric_exports: list[list[dict]] = []
        self.headers: list[dict[str, str]] = []
        lock = self.lock = threading.Lock()
        spans, exports, headers = self.spans, self.metric_exports, self.headers

        def traces(body: bytes) -> bytes:
            req = ExportTraceServiceRequest()
            req.ParseFromString(body)
            for rs in req.resource_spans:
                res = {a.key: a.value.string_value for a in rs.resource.attributes}
                for ss in rs.scope_spans:
                    for sp in ss.spans:
                        spans.append({
                            "name": sp.name, "trace_id": sp.trace_id.hex(), "span_id": sp.span_id.hex(),
                            "parent": sp.parent_span_id.hex(), "resource": res, "attrs": _attrs(sp.attributes),
                            "links": [{"trace_id": ln.trace_id.hex(), "span_id": ln.span_id.hex(),
                                       "attrs": _attrs(ln.attributes)} for ln in sp.links]})
            return ExportTraceServiceResponse().SerializeToString()

        def metrics(body: bytes) -> bytes:
            req = ExportMetricsServiceRequest()
            req.ParseFromString(body)
            out = []
            for rm in req.resource_metrics:
                res = {a.key: a.value.string_value for a in rm.resource.attributes}
                for sm in rm.scope_metrics:
                    for m in sm.metrics:
                        kind, points = _metric_points(m)
                        out.append({"name": m.name, "kind": kind, "description": m.description, "resource": res,
                                    "points": points})
            exports.append(out)
            return ExportMetricsServiceResponse().SerializeToString()

        routes = {"/v1/traces": traces, "/v1/metrics": metrics}

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                fn = routes.get(self.path)
                if fn is None:
                    self.send_response(404)
                    self.end_headers()
                    return
                with lock:
                    headers.append({k.lower(): v for k, v in self.headers.items()})
                    out = fn(body)
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *a: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def trace(self, trace_id: str) -> list[dict]:
        with self.lock:
            return [s for s in self.spans if s["trace_id"] == trace_id]

    def last_metrics(self) -> dict[str, dict]:
        """The most recent metric export, by metric name."""
        with self.lock:
            return {m["name"]: m for m in self.metric_exports[-1]} if self.metric_exports else {}

    def close(self) -> None:
        self.httpd.shutdown()
