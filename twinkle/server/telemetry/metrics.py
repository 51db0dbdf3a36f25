"""Prometheus metrics (prometheus_client) for the gateway and the model worker replicas.

Imported only when ``telemetry.enabled`` is true. Two halves:

* :class:`WorkerMetrics` lives in each worker replica (its own ``CollectorRegistry``): per-operation queue wait
  and execution histograms, batch composition, worker-side errors and 429s, queue depth, loaded adapters,
  the replica process's RSS/CPU and (where CUDA is in use) GPU memory. :meth:`WorkerMetrics.exposition` renders
  it as Prometheus text.
* :class:`GatewayMetrics` lives in the gateway: HTTP requests/latency/in-flight (an ASGI middleware),
  per-operation end-to-end latency, errors and 429s, token counters per base model and per user, state gauges.
  On each scrape :meth:`GatewayMetrics.render` asks every worker replica for its exposition over the same
  worker interface the service uses (a Ray Serve handle call), adds ``base_model`` and ``replica`` labels and
  serves everything from the one endpoint: Prometheus needs one scrape target, nothing runs between scrapes.

Label values are bounded: route templates (never raw paths), operation names, base model names, error codes,
status codes, and user names (bounded by the number of API keys). No request, run or session id is a label.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

__all__ = ["GatewayMetrics", "HttpMetricsMiddleware", "WorkerMetrics", "merge_expositions"]

prometheus_client.disable_created_metrics()

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   120.0, 300.0)
COUNT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
TOKEN_BUCKETS = (16, 64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
RATIO_BUCKETS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0)
TOKEN_KINDS = ("trained", "prefilled", "sampled")


class _Labelled:
    """``metric.labels(*values)`` with the child cached per value tuple: prometheus_client validates and
    locks on every ``labels()`` call; label values are bounded, so the cache is too."""

    __slots__ = ("_cache", "_metric")

    def __init__(self, metric: Any):
        self._metric = metric
        self._cache: dict[tuple[str, ...], Any] = {}

    def __call__(self, *values: str) -> Any:
        child = self._cache.get(values)
        if child is None:
            child = self._cache[values] = self._metric.labels(*values)
        return child


def _err_kind(err: BaseException) -> str:
    code = getattr(err, "code", None)
    return code if isinstance(code, str) and code.isidentifier() and len(code) <= 40 else "internal_error"


class WorkerMetrics:
    """The metrics of one model worker replica. The scheduler calls :meth:`request_done` and :meth:`batch`."""

    def __init__(self, queue_depth: Callable[[], float] | None = None,
                 adapters: Callable[[], float] | None = None) -> None:
        r = self.registry = CollectorRegistry(auto_describe=False)
        ProcessCollector(namespace="twinkle_worker", registry=r)
        self.queue_wait = Histogram("twinkle_queue_wait_seconds", "Time a request waited in the worker's queue "
                                    "before its batch or barrier started", ["operation"], buckets=LATENCY_BUCKETS,
                                    registry=r)
        self.execution = Histogram("twinkle_execution_seconds", "Time the backend spent on the batch or barrier "
                                   "that served a request", ["operation"], buckets=LATENCY_BUCKETS, registry=r)
        self.errors = Counter("twinkle_worker_errors", "Requests that failed on the worker, by error code",
                              ["operation", "kind"], registry=r)
        self.batches = Counter("twinkle_batches", "forward/backward batches run (mixed: more than one adapter)",
                               ["mixed"], registry=r)
        for mixed in ("true", "false"):  # both series exist (at 0) before the first batch
            self.batches.labels(mixed)
        self.batch_rows = Histogram("twinkle_batch_rows", "Rows (datums) in one batch", buckets=COUNT_BUCKETS,
                                    registry=r)
        self.batch_tokens = Histogram("twinkle_batch_tokens", "Tokens in one batch", buckets=TOKEN_BUCKETS,
                                      registry=r)
        self.batch_adapters = Histogram("twinkle_batch_adapters", "Distinct adapters in one batch",
                                        buckets=COUNT_BUCKETS, registry=r)
        self.padding = Histogram("twinkle_batch_padding_ratio", "Share of a batch's padded token slots that are "
                                 "padding (1 - tokens / (rows * longest row))", buckets=RATIO_BUCKETS, registry=r)
        self.batch_seconds = Counter("twinkle_backend_busy_seconds", "Seconds the backend spent in batches",
                                     registry=r)
        depth = Gauge("twinkle_queue_depth", "Requests queued or running on the worker", registry=r)
        loaded = Gauge("twinkle_adapters_loaded", "LoRA adapters loaded on the worker", registry=r)
        if queue_depth is not None:
            depth.set_function(queue_depth)
        if adapters is not None:
            loaded.set_function(adapters)
        self._gpu(r)
        self._l_queue_wait, self._l_execution = _Labelled(self.queue_wait), _Labelled(self.execution)
        self._l_errors, self._l_batches = _Labelled(self.errors), _Labelled(self.batches)

    @staticmethod
    def _gpu(r: CollectorRegistry) -> None:
        import sys

        torch = sys.modules.get("torch")  # never imports torch itself
        try:
            if torch is None or not torch.cuda.is_available():
                return
        except Exception:
            return
        mem = Gauge("twinkle_worker_gpu_memory_allocated_bytes", "GPU memory held by tensors (torch)", registry=r)
        mem.set_function(lambda: float(torch.cuda.memory_allocated()))
        res = Gauge("twinkle_worker_gpu_memory_reserved_bytes", "GPU memory reserved by torch's allocator",
                    registry=r)
        res.set_function(lambda: float(torch.cuda.memory_reserved()))
        util = Gauge("twinkle_worker_gpu_utilization_ratio", "GPU utilisation over the last sample period (0-1)",
                     registry=r)

        def _util() -> float:
            try:
                return float(torch.cuda.utilization()) / 100.0
            except Exception:
                return float("nan")

        util.set_function(_util)

    def request_done(self, operation: str, arrived: float, started: float | None, finished: float,
                     err: BaseException | None) -> None:
        """One request left the scheduler (monotonic times; ``started`` None: it never ran)."""
        if started is not None:
            self._l_queue_wait(operation).observe(max(0.0, started - arrived))
            self._l_execution(operation).observe(max(0.0, finished - started))
        if err is not None:
            self._l_errors(operation, _err_kind(err)).inc()

    def batch(self, lengths: list[int], adapters: int, seconds: float) -> None:
        """One forward/backward batch: ``lengths`` are its rows' token counts."""
        rows = len(lengths)
        tokens = sum(lengths)
        self._l_batches("true" if adapters > 1 else "false").inc()
        self.batch_rows.observe(rows)
        self.batch_tokens.observe(tokens)
        self.batch_adapters.observe(adapters)
        if rows:
            self.padding.observe(1.0 - tokens / float(rows * max(1, max(lengths))))
        self.batch_seconds.inc(max(0.0, seconds))

    def exposition(self) -> str:
        return prometheus_client.generate_latest(self.registry).decode("utf-8")


def merge_expositions(parts: Iterable[tuple[dict[str, str], str]]) -> list[Metric]:
    """Parse each replica's exposition, add its labels, and merge families of the same name."""
    families: dict[str, Metric] = {}
    for labels, text in parts:
        for fam in text_string_to_metric_families(text):
            out = families.get(fam.name)
            if out is None:
                out = families[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
            for s in fam.samples:
                out.add_sample(s.name, {**s.labels, **labels}, s.value, s.timestamp, s.exemplar)
    return list(families.values())


class _Static:
    def __init__(self, metrics: list[Metric]):
        self._m = metrics

    def collect(self) -> list[Metric]:
        return self._m


class GatewayMetrics:
    """The gateway's instruments and the scrape endpoint's renderer."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=False)
        ProcessCollector(namespace="twinkle_gateway", registry=r)
        self.http_requests = Counter("twinkle_http_requests", "HTTP requests answered, by route template, method "
                                     "and status code", ["route", "method", "status"], registry=r)
        self.http_duration = Histogram("twinkle_http_request_duration_seconds", "HTTP request latency in the "
                                       "gateway", ["route", "method"], buckets=LATENCY_BUCKETS, registry=r)
        self.http_in_flight = Gauge("twinkle_http_requests_in_flight", "HTTP requests being served", registry=r)
        self.op_duration = Histogram("twinkle_operation_duration_seconds", "Submit-to-result time of an "
                                     "operation in the gateway (queue wait + execution + transport)",
                                     ["operation", "base_model"], buckets=LATENCY_BUCKETS, registry=r)
        self.op_errors = Counter("twinkle_operation_errors", "Operations that failed, by error code",
                                 ["operation", "base_model", "kind"], registry=r)
        self.rejections = Counter("twinkle_rejections", "Operations refused with HTTP 429 (queue full)",
                                  ["operation", "base_model"], registry=r)
        self.tokens = Counter("twinkle_tokens", "Tokens processed: trained (forward_backward), prefilled "
                              "(forward and sampling prompts), sampled (generated)", ["base_model", "kind"],
                              registry=r)
        self.user_tokens = Counter("twinkle_user_tokens", "Tokens processed per user (usage metering)",
                                   ["user", "base_model", "kind"], registry=r)
        self.steps = Counter("twinkle_optim_steps", "Optimizer steps applied", ["base_model"], registry=r)
        self.state = Gauge("twinkle_state", "Server state: sessions_active, runs_active, futures_pending",
                           ["what"], registry=r)
        self.checkpoint_bytes = Gauge("twinkle_checkpoint_bytes", "Bytes of stored checkpoints", registry=r)
        self._l_tokens, self._l_user_tokens = _Labelled(self.tokens), _Labelled(self.user_tokens)
        self._l_op_duration, self._l_rejections = _Labelled(self.op_duration), _Labelled(self.rejections)
        self._l_op_errors, self._l_steps = _Labelled(self.op_errors), _Labelled(self.steps)
        self._l_http_requests, self._l_http_duration = _Labelled(self.http_requests), _Labelled(self.http_duration)
        self.tracing = False  # set when traces are exported (operation spans in track)
        self.scrape_errors = Counter("twinkle_worker_scrape_errors", "Worker replicas that did not answer a "
                                     "scrape", ["base_model"], registry=r)

    # ---- hooks ---------------------------------------------------------------------------------------------
    def usage(self, user: str, base_model: str, trained: int, prefilled: int, sampled: int) -> None:
        for kind, n in (("trained", trained), ("prefilled", prefilled), ("sampled", sampled)):
            if n:
                self._l_tokens(base_model, kind).inc(n)
                self._l_user_tokens(user, base_model, kind).inc(n)

    def operation_done(self, operation: str, base_model: str, seconds: float, err: BaseException | None) -> None:
        self._l_op_duration(operation, base_model).observe(seconds)
        if err is not None:
            if getattr(err, "status", None) == 429:
                self._l_rejections(operation, base_model).inc()
            else:
                self._l_op_errors(operation, base_model, _err_kind(err)).inc()
        elif operation == "optim_step":
            self._l_steps(base_model).inc()

    def rejected(self, operation: str, base_model: str) -> None:
        self._l_rejections(operation, base_model).inc()

    async def track(self, operation: str, base_model: str, coro: Awaitable[Any],
                    attrs: dict[str, Any] | None = None) -> Any:
        if self.tracing:
            from .tracing import operation_span

            async with operation_span(operation, {"twinkle.operation": operation, "twinkle.base_model": base_model,
                                                  **(attrs or {})}) as span:
                try:
                    return await self._timed(operation, base_model, coro)
                except BaseException as e:
                    from opentelemetry.trace import Status, StatusCode

                    span.set_status(Status(StatusCode.ERROR, type(e).__name__))
                    raise
        return await self._timed(operation, base_model, coro)

    async def _timed(self, operation: str, base_model: str, coro: Awaitable[Any]) -> Any:
        t0 = time.perf_counter()
        try:
            out = await coro
        except BaseException as e:
            from twinkle.server.state.common import unwrap

            self.operation_done(operation, base_model, time.perf_counter() - t0, unwrap(e))
            raise
        self.operation_done(operation, base_model, time.perf_counter() - t0, None)
        return out

    # ---- scrape ----------------------------------------------------------------------------------------------
    async def collect(self, service: Any) -> list[Metric]:
        """Every metric family the endpoint serves: the gateway's own, then every worker replica's (labelled by
        ``base_model`` and ``replica``). The Prometheus scrape and the OTLP push (:mod:`.otlp_metrics`) both
        read this, so they show the same families, labels and values."""
        import asyncio

        self.state.labels("sessions_active").set(len(service.sessions.active))
        self.state.labels("runs_active").set(len(service.runs.active))
        self.state.labels("futures_pending").set(sum(1 for f in service.futures.by_id.values() if f.state is None))
        self.checkpoint_bytes.set(sum(int(c.info.size_bytes or 0) for c in service.checkpoints.by_key.values()))

        calls: list[tuple[dict[str, str], Any]] = []
        for name, reps in service.workers.items():
            for i, w in enumerate(reps):
                fn = getattr(w, "telemetry_exposition", None)
                if fn is not None:
                    calls.append(({"base_model": name, "replica": str(i)}, fn()))
        results = await asyncio.gather(*(asyncio.wait_for(c, 10.0) for _, c in calls), return_exceptions=True)
        parts: list[tuple[dict[str, str], str]] = []
        for (labels, _), res in zip(calls, results, strict=True):
            if isinstance(res, BaseException) or not isinstance(res, str):
                self.scrape_errors.labels(labels["base_model"]).inc()
                continue
            parts.append((labels, res))
        return list(self.registry.collect()) + merge_expositions(parts)

    async def render(self, service: Any) -> bytes:
        """The Prometheus exposition of :meth:`collect`."""
        merged = CollectorRegistry(auto_describe=False)
        merged.register(_Static(await self.collect(service)))
        return prometheus_client.generate_latest(merged)


class HttpMetricsMiddleware:
    """ASGI middleware: requests by route template/method/status, latency, in-flight."""

    def __init__(self, app: Any, metrics: GatewayMetrics):
        self.app = app
        self.m = metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [500]

        async def _send(message: Any) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message.get("status", 500))
            await send(message)

        m = self.m
        m.http_in_flight.inc()
        t0 = time.perf_counter()
        try:
            await self.app(scope, receive, _send)
        finally:
            m.http_in_flight.dec()
            route = scope.get("route")
            template = getattr(route, "path_format", None) or getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "GET")
            if method not in _METHODS:
                method = "OTHER"
            m._l_http_requests(template, method, str(status[0])).inc()
            m._l_http_duration(template, method).observe(time.perf_counter() - t0)


_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})


def metrics_token(env_name: str) -> str | None:
    v = os.environ.get(env_name)
    return v or None
