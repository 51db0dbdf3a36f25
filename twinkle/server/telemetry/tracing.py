"""OpenTelemetry traces (SDK + OTLP exporter), imported only when ``telemetry.enabled`` and ``otlp.endpoint``.

* Gateway: :func:`setup_tracing` installs the process's global tracer provider; FastAPI (>= 0.16x) then opens a
  SERVER span per HTTP request and honours an incoming W3C ``traceparent``. :func:`operation_span` opens one
  span per submitted operation (user, session, run, operation, base model, seq_id) inside it, and the Ray handle
  adaptor sends the current context to the worker replica (:func:`inject` / :func:`attached`).
* Worker replica: the scheduler captures the caller's context when a request is queued; when it completes,
  :class:`WorkerTracing` records, with the scheduler's own timestamps, a ``queue`` span (queued → started),
  one ``batch`` span per forward/backward batch (child of its first request's queue span, **linked** to every
  request it served, so a mixed batch shows its tenants) and, under it, one span per request named after its
  operation (``forward_backward``, ``optim_step``, ``save``, ``load``, ``sample``...).

Spans never carry API keys: attributes are user names, ids and sizes.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

__all__ = ["WorkerTracing", "attached", "inject", "operation_span", "setup_tracing", "trace_id_hex"]

_TRACER = "twinkle.server"
_provider: TracerProvider | None = None


def setup_tracing(tel: Any, role: str) -> TracerProvider:
    """Build (once per process) the SDK tracer provider exporting to ``tel.otlp`` and make it global."""
    global _provider
    if _provider is not None:
        return _provider
    attrs = {"service.name": tel.service_name, "twinkle.role": role, **tel.resource_attributes}
    provider = TracerProvider(resource=Resource.create(attrs),
                              sampler=ParentBased(TraceIdRatioBased(tel.trace_sample_ratio)))
    endpoint = tel.otlp.endpoint.rstrip("/")
    if tel.otlp.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        exporter: Any = GrpcExporter(endpoint=endpoint, headers=tuple(tel.otlp.headers.items()) or None,
                                     timeout=tel.otlp.timeout_s, insecure=endpoint.startswith("http://"))
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

        url = endpoint if endpoint.endswith("/v1/traces") else endpoint + "/v1/traces"
        exporter = HttpExporter(endpoint=url, headers=dict(tel.otlp.headers) or None, timeout=tel.otlp.timeout_s)
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=1000))
    trace.set_tracer_provider(provider)
    _provider = provider
    return provider


def shutdown() -> None:
    if _provider is not None:
        _provider.force_flush(5000)


def tracer() -> trace.Tracer:
    return trace.get_tracer(_TRACER)


def inject() -> dict[str, str] | None:
    """The current context as W3C headers (None when no span is recording)."""
    if not trace.get_current_span().get_span_context().is_valid:
        return None
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier or None


@contextlib.contextmanager
def attached(carrier: dict[str, str] | None) -> Iterator[None]:
    """Run the block under the context a gateway sent (no-op for None)."""
    if not carrier:
        yield
        return
    token = otel_context.attach(propagate.extract(carrier))
    try:
        yield
    finally:
        otel_context.detach(token)


def trace_id_hex() -> str | None:
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None


@contextlib.asynccontextmanager
async def operation_span(operation: str, attrs: dict[str, Any]) -> Any:
    with tracer().start_as_current_span(f"twinkle.{operation}", kind=SpanKind.INTERNAL,
                                        attributes={k: v for k, v in attrs.items() if v is not None}) as span:
        yield span


def _epoch_ns(mono: float, now_mono: float, now_epoch_ns: int) -> int:
    return now_epoch_ns - int((now_mono - mono) * 1e9)


class WorkerTracing:
    """Spans of a worker replica, recorded when requests complete (scheduler timestamps; no timers)."""

    def __init__(self, base_model: str, replica: int):
        self.base_model = base_model
        self.replica = replica

    @staticmethod
    def capture() -> Any:
        ctx = otel_context.get_current()
        return ctx if trace.get_current_span(ctx).get_span_context().is_valid else None

    def _attrs(self, req: Any, operation: str) -> dict[str, Any]:
        adapter = getattr(req, "adapter", None)
        out: dict[str, Any] = {"twinkle.operation": operation, "twinkle.base_model": self.base_model,
                               "twinkle.replica": self.replica}
        if adapter:
            out["twinkle.run_id"] = adapter
            out["twinkle.session_id"] = adapter.split(":", 1)[0]
        seq = getattr(req, "seq", None)
        if seq is not None:
            out["twinkle.seq_id"] = seq
        return out

    def request_done(self, operation: str, req: Any, finished: float, err: BaseException | None,
                     batch_ctx: Any = None) -> Any:
        """The queue span of ``req`` (and, outside a batch, its operation span). Returns the queue span's
        context (the parent a batch span takes)."""
        ctx = getattr(req, "ctx", None)
        if ctx is None:
            return None
        t = tracer()
        now_m, now_ns = time.monotonic(), time.time_ns()
        started = req.started if req.started is not None else finished
        attrs = self._attrs(req, operation)
        q = t.start_span("queue", context=ctx, attributes=attrs,
                         start_time=_epoch_ns(req.arrived, now_m, now_ns))
        q.end(end_time=_epoch_ns(started, now_m, now_ns))
        qctx = trace.set_span_in_context(q, ctx)
        if batch_ctx is None:
            op = t.start_span(operation, context=qctx, attributes=attrs, start_time=_epoch_ns(started, now_m, now_ns))
            _end(op, err, _epoch_ns(finished, now_m, now_ns))
        return qctx

    def batch(self, reqs: list[Any], outcomes: list[BaseException | None], seconds: float, finished: float) -> None:
        """One forward/backward batch: queue spans, a batch span linked to every request, an op span each."""
        traced = [(r, e) for r, e in zip(reqs, outcomes, strict=True) if getattr(r, "ctx", None) is not None]
        if not traced:
            return
        t = tracer()
        now_m, now_ns = time.monotonic(), time.time_ns()
        parents = [self.request_done(_op(r), r, finished, e, batch_ctx=True) for r, e in traced]
        start = _epoch_ns(traced[0][0].started or finished, now_m, now_ns)
        end = _epoch_ns(finished, now_m, now_ns)
        links = [Link(trace.get_current_span(r.ctx).get_span_context(),
                      {"twinkle.run_id": r.adapter, **({"twinkle.seq_id": r.seq} if r.seq is not None else {})})
                 for r, _ in traced]
        adapters = sorted({r.adapter for r in reqs})
        b = t.start_span("batch", context=parents[0], links=links, start_time=start, attributes={
            "twinkle.base_model": self.base_model, "twinkle.replica": self.replica, "twinkle.batch.size": len(reqs),
            "twinkle.batch.adapters": len(adapters), "twinkle.batch.mixed": len(adapters) > 1,
            "twinkle.batch.seconds": seconds})
        b.end(end_time=end)
        bctx = trace.set_span_in_context(b, parents[0])
        for r, e in traced:
            op = t.start_span(_op(r), context=bctx, attributes=self._attrs(r, _op(r)), start_time=start)
            _end(op, e, end)


def _op(req: Any) -> str:
    from ..ops import op_kind

    return op_kind(req.op)


def _end(span: Any, err: BaseException | None, end: int) -> None:
    if err is not None:
        span.set_status(Status(StatusCode.ERROR, type(err).__name__))
        span.set_attribute("error.type", str(getattr(err, "code", type(err).__name__)))
    span.end(end_time=end)
