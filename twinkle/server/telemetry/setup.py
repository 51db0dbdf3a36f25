"""Wires telemetry into the gateway app when ``telemetry.enabled`` is true (imported only then)."""

from __future__ import annotations

import hmac
import os
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response

from twinkle.types import AuthenticationError, ForbiddenError

from .metrics import GatewayMetrics, HttpMetricsMiddleware

__all__ = ["install_telemetry"]

_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def install_telemetry(app: FastAPI, config: Any, service: Any) -> GatewayMetrics:
    tel = config.telemetry
    metrics = GatewayMetrics()
    service.metrics = metrics
    app.state.metrics = metrics
    app.add_middleware(HttpMetricsMiddleware, metrics=metrics)
    prom = tel.prometheus
    if prom.enabled:
        token = (os.environ.get(prom.token_env) or None) if prom.access == "token" else None

        async def scrape(request: Request) -> Response:
            _authorize(request, service, prom.access, token)
            return Response(await metrics.render(service), media_type=_CONTENT_TYPE)

        app.add_api_route(prom.path, scrape, methods=["GET"], include_in_schema=False)
    if tel.otlp.endpoint:
        from .tracing import setup_tracing

        setup_tracing(tel, "gateway")
        metrics.tracing = True
        if tel.otlp.metrics:
            _install_metric_push(app, tel, metrics, service)
    from .logs import configure_logging

    configure_logging(config)
    return metrics


def _install_metric_push(app: FastAPI, tel: Any, metrics: GatewayMetrics, service: Any) -> None:
    """OTLP metric push for the app's lifetime: started inside the app's lifespan, stopped (with a last push)
    before the service stops, so the worker replicas still answer."""
    from contextlib import asynccontextmanager

    from .otlp_metrics import OtlpMetricsPusher

    pusher = app.state.otlp_metrics = OtlpMetricsPusher(tel, metrics, service)
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(a: Any) -> Any:
        async with inner(a) as state:
            pusher.start()
            try:
                yield state
            finally:
                await pusher.stop()

    app.router.lifespan_context = lifespan


def _authorize(request: Request, service: Any, access: str, token: str | None) -> None:
    if access == "open":
        return
    from ..deps import api_key_from_request

    presented = api_key_from_request(request)
    if access == "token" and token and presented and hmac.compare_digest(presented.encode(), token.encode()):
        return
    if presented is None:
        raise AuthenticationError("the metrics endpoint needs an admin API key" +
                                  (" or the scrape token" if access == "token" else ""), field="authorization")
    user = service.authenticate(presented)
    if not user.is_admin:
        raise ForbiddenError("the metrics endpoint is readable by admins only", field="authorization")


def worker_observer(tel: Any, base_model: str, replica: int, **gauges: Any) -> Any:
    """The scheduler observer of a worker replica. ``tel``: the telemetry config (a dict through Ray) or True."""
    from .config import TelemetryConfig
    from .metrics import WorkerMetrics
    from .observer import WorkerObserver

    cfg = TelemetryConfig.model_validate(tel) if isinstance(tel, dict) else None
    tracing = None
    if cfg is not None:
        from .logs import apply_logs

        apply_logs(cfg.logs)
    if cfg is not None and cfg.otlp.endpoint:
        from .tracing import WorkerTracing, setup_tracing

        setup_tracing(cfg, "worker")
        tracing = WorkerTracing(base_model, replica)
    return WorkerObserver(WorkerMetrics(**gauges), tracing)
