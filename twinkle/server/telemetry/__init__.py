"""Observability for the server: Prometheus metrics (gateway + worker replicas), usage metering per user.

Only :mod:`.config` and :mod:`.usage` are imported when telemetry is off; :mod:`.metrics` (prometheus_client)
is imported by the gateway and the workers only when ``telemetry.enabled`` is true. See docs/observability.md.
"""

from .config import LogsConfig, OtlpConfig, PrometheusConfig, TelemetryConfig

__all__ = ["LogsConfig", "OtlpConfig", "PrometheusConfig", "TelemetryConfig"]
