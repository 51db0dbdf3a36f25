"""OTLP metric push: the families the Prometheus endpoint serves, sent to ``telemetry.otlp`` every
``telemetry.metric_export_interval_s`` seconds. Imported only when telemetry is on and an OTLP endpoint is set.

One source of truth: :meth:`GatewayMetrics.collect` gathers the gateway's prometheus_client families and every
worker replica's (over the same worker interface a scrape uses); :func:`to_metrics_data` translates them into
the OpenTelemetry SDK's metric data model and the SDK's OTLP exporter (gRPC or HTTP/protobuf) sends them:

==================  ====================================================================================
Prometheus family   OTLP metric (same name, description and labels as attributes; cumulative temporality)
==================  ====================================================================================
counter             Sum, monotonic, value of the ``<name>_total`` sample
gauge / unknown     Gauge
histogram           Histogram with the same bucket bounds (``le`` without ``+Inf``), per-bucket counts
                    (the cumulative ``_bucket`` samples differenced), ``_count`` and ``_sum``
summary             ``<name>_count`` and ``<name>_sum`` as monotonic Sums (the server defines none)
==================  ====================================================================================

Why not OTel instruments: the OpenTelemetry API has no observable histogram, so histograms recorded by
prometheus_client cannot be re-observed with their buckets, and SDK 1.45's periodic reader takes no external
metric producer. Pushing the collected families through the SDK's own data classes and exporters keeps the
two outputs identical by construction. A collector's Prometheus exporter (or Prometheus' OTLP receiver) adds
``_total`` to monotonic sums, so the names come back as on ``/metrics``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Iterable
from typing import Any

from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Gauge,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricExporter,
    MetricExportResult,
    MetricsData,
    NumberDataPoint,
    ResourceMetrics,
    ScopeMetrics,
    Sum,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

__all__ = ["OtlpMetricsPusher", "make_exporter", "to_metrics_data"]

log = logging.getLogger("twinkle.server.telemetry")
_CUMULATIVE = AggregationTemporality.CUMULATIVE
_SCOPE = InstrumentationScope("twinkle.server")


def make_exporter(tel: Any) -> MetricExporter:
    """The SDK's OTLP metric exporter for ``tel.otlp`` (protocol, endpoint, headers, timeout)."""
    endpoint = tel.otlp.endpoint.rstrip("/")
    if tel.otlp.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcExporter

        return GrpcExporter(endpoint=endpoint, headers=tuple(tel.otlp.headers.items()) or None,
                            timeout=tel.otlp.timeout_s, insecure=endpoint.startswith("http://"))
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpExporter

    url = endpoint if endpoint.endswith("/v1/metrics") else endpoint + "/v1/metrics"
    return HttpExporter(endpoint=url, headers=dict(tel.otlp.headers) or None, timeout=tel.otlp.timeout_s)


def _number(labels: dict[str, str], start: int, now: int, value: float) -> NumberDataPoint:
    return NumberDataPoint(attributes=dict(labels), start_time_unix_nano=start, time_unix_nano=now, value=value)


def _key(labels: dict[str, str], drop: str | None = None) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, v) for k, v in labels.items() if k != drop))


def _histogram(fam: Any, start: int, now: int) -> list[HistogramDataPoint]:
    series: dict[tuple[tuple[str, str], ...], dict[str, Any]] = {}
    for s in fam.samples:
        le = s.labels.get("le") if s.name.endswith("_bucket") else None
        one = series.setdefault(_key(s.labels, "le" if le is not None else None),
                                {"buckets": [], "count": 0, "sum": 0.0})
        if le is not None:
            one["buckets"].append((float(le), s.value))
        elif s.name.endswith("_count"):
            one["count"] = int(s.value)
        elif s.name.endswith("_sum"):
            one["sum"] = s.value
    points = []
    for key, one in series.items():
        cumulative = sorted(one["buckets"])
        bounds = [b for b, _ in cumulative if not math.isinf(b)]
        counts: list[int] = []
        prev = 0.0
        for _, c in cumulative:
            counts.append(int(c - prev))
            prev = c
        if not cumulative or not math.isinf(cumulative[-1][0]):  # +Inf missing: the rest falls in the last bucket
            counts.append(max(0, one["count"] - int(prev)))
        points.append(HistogramDataPoint(
            attributes=dict(key), start_time_unix_nano=start, time_unix_nano=now, count=one["count"],
            sum=one["sum"], bucket_counts=counts, explicit_bounds=bounds,
            min=None, max=None))  # type: ignore[arg-type]  # unknown from a Prometheus histogram: left unset
    return points


def _metric(fam: Any, start: int, now: int) -> list[Metric]:
    doc = fam.documentation or None
    unit = getattr(fam, "unit", "") or ""
    if fam.type == "counter":
        pts = [_number(s.labels, start, now, s.value) for s in fam.samples if s.name.endswith("_total")]
        return [Metric(fam.name, doc, unit, Sum(pts, _CUMULATIVE, True))] if pts else []
    if fam.type == "histogram":
        hps = _histogram(fam, start, now)
        return [Metric(fam.name, doc, unit, Histogram(hps, _CUMULATIVE))] if hps else []
    if fam.type == "summary":
        out = []
        for suffix in ("_count", "_sum"):
            pts = [_number(s.labels, start, now, s.value) for s in fam.samples if s.name == fam.name + suffix]
            if pts:
                out.append(Metric(fam.name + suffix, doc, unit, Sum(pts, _CUMULATIVE, True)))
        return out
    pts = [_number(s.labels, start, now, s.value) for s in fam.samples if not math.isnan(s.value)]
    return [Metric(fam.name, doc, unit, Gauge(pts))] if pts else []


def to_metrics_data(families: Iterable[Any], resource: Resource, start_ns: int,
                    now_ns: int | None = None) -> MetricsData:
    """prometheus_client metric families → the SDK's :class:`MetricsData` (see the table in the module doc)."""
    now = now_ns if now_ns is not None else time.time_ns()
    metrics: list[Metric] = []
    for fam in families:
        metrics.extend(_metric(fam, start_ns, now))
    return MetricsData([ResourceMetrics(resource, [ScopeMetrics(_SCOPE, metrics, "")], "")])


class OtlpMetricsPusher:
    """Every ``interval_s``: collect the gateway's families (gateway + worker replicas) and export them."""

    def __init__(self, tel: Any, metrics: Any, service: Any, exporter: MetricExporter | None = None):
        self.metrics = metrics
        self.service = service
        self.interval_s = float(tel.metric_export_interval_s)
        self.exporter = exporter if exporter is not None else make_exporter(tel)
        self.resource = Resource.create({"service.name": tel.service_name, "twinkle.role": "gateway",
                                         **tel.resource_attributes})
        self.start_ns = time.time_ns()  # start of every cumulative series: the counters start with the process
        self._task: asyncio.Task[None] | None = None
        self.failures = 0

    async def push(self) -> bool:
        """Collect and export once (the exporter's blocking I/O runs in a thread). True when exported."""
        families = await self.metrics.collect(self.service)
        data = to_metrics_data(families, self.resource, self.start_ns)
        try:
            res = await asyncio.to_thread(self.exporter.export, data, timeout_millis=self.interval_s * 1000)
        except Exception as e:  # an unreachable collector never stops the server
            res = MetricExportResult.FAILURE
            log.warning("OTLP metric export failed: %s", type(e).__name__)
        if res is not MetricExportResult.SUCCESS:
            self.failures += 1
            return False
        return True

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.push()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.failures += 1
                log.warning("OTLP metric collection failed: %s", type(e).__name__)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="twinkle-otlp-metrics")

    async def stop(self) -> None:
        """Stop the loop, push a last time (so short runs are not lost) and shut the exporter down."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            with contextlib.suppress(Exception):
                await self.push()
        await asyncio.to_thread(self.exporter.shutdown)
