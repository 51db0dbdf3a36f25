"""The ``telemetry:`` block of the server YAML (strict: an unknown key is an error naming it).

Example::

    telemetry:
      enabled: true
      service_name: twinkle
      resource_attributes: {deployment.environment: lab}
      prometheus:
        path: /metrics
        access: token            # open | admin | token
        token_env: TWINKLE_METRICS_TOKEN
      otlp:
        endpoint: http://localhost:4318
        protocol: http/protobuf  # or grpc
        metrics: true            # push metrics over OTLP too (traces always go there)
      trace_sample_ratio: 1.0
      metric_export_interval_s: 15
      logs: {format: json, level: info}

Off by default: then nothing in this package is imported on the request path.
Nothing here imports prometheus_client or OpenTelemetry.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["LogsConfig", "OtlpConfig", "PrometheusConfig", "TelemetryConfig"]

_ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_ATTR_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.\-]{0,127}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PrometheusConfig(_Strict):
    enabled: bool = Field(True, description="serve the Prometheus exposition (when telemetry is enabled)")
    path: str = Field("/metrics", description="HTTP path of the exposition on the server's own listener")
    access: Literal["open", "admin", "token"] = Field(
        "admin",
        description="who may read it: 'open' (anyone who reaches the port), 'admin' (an admin API key), "
        "'token' (Authorization: Bearer <the value of token_env>; an admin API key works too)",
    )
    token_env: str = Field("TWINKLE_METRICS_TOKEN",
                           description="environment variable holding the scrape token (access: token)")

    @field_validator("path")
    @classmethod
    def _check_path(cls, v: str) -> str:
        if not re.match(r"^/[A-Za-z0-9._/-]*$", v) or v.startswith("/api/"):
            raise ValueError("path must start with '/', use letters, digits, '.', '_', '-', '/' only, "
                             "and lie outside /api/")
        return v

    @field_validator("token_env")
    @classmethod
    def _check_env(cls, v: str) -> str:
        if not _ENV_RE.match(v):
            raise ValueError("token_env is the NAME of an environment variable (letters, digits, '_')")
        return v


class OtlpConfig(_Strict):
    endpoint: str | None = Field(None, description="OTLP collector, e.g. http://localhost:4318 (http/protobuf) "
                                                   "or http://localhost:4317 (grpc); none: no OTLP export")
    protocol: Literal["grpc", "http/protobuf"] = "http/protobuf"
    headers: dict[str, str] = Field(default_factory=dict,
                                    description="extra headers sent to the collector (e.g. an auth header)")
    timeout_s: float = Field(10.0, gt=0, le=300)
    metrics: bool = Field(True, description="push metrics too (every metric_export_interval_s); false when the "
                                            "collector takes traces only (e.g. Tempo) and Prometheus scrapes")

    @field_validator("endpoint")
    @classmethod
    def _check_endpoint(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^https?://[^\s/]+(/\S*)?$", v):
            raise ValueError("endpoint must be an http:// or https:// URL")
        return v


class LogsConfig(_Strict):
    format: Literal["text", "json"] = Field("text", description="json: one JSON object per line with trace ids")
    level: Literal["debug", "info", "warning", "error"] | None = Field(
        None, description="level of the 'twinkle' logger hierarchy (default: the server's log_level)")
    levels: dict[str, Literal["debug", "info", "warning", "error"]] = Field(
        default_factory=dict, description="per-logger levels, e.g. {twinkle.server.scheduler: debug}")


class TelemetryConfig(_Strict):
    enabled: bool = Field(False, description="metrics, traces and JSON logs; off: nothing is measured")
    service_name: str = Field("twinkle", min_length=1, max_length=128)
    resource_attributes: dict[str, str] = Field(
        default_factory=dict, description="OpenTelemetry resource attributes (deployment.environment, ...)")
    trace_sample_ratio: float = Field(1.0, ge=0.0, le=1.0,
                                      description="share of new traces recorded (a sampled parent is followed)")
    metric_export_interval_s: float = Field(15.0, ge=1.0, le=3600.0,
                                            description="how often metrics are pushed over OTLP")
    prometheus: PrometheusConfig = Field(default_factory=PrometheusConfig)
    otlp: OtlpConfig = Field(default_factory=OtlpConfig)
    logs: LogsConfig = Field(default_factory=LogsConfig)

    @field_validator("resource_attributes")
    @classmethod
    def _check_attrs(cls, v: dict[str, str]) -> dict[str, str]:
        for k in v:
            if not _ATTR_RE.match(k):
                raise ValueError(f"resource attribute name {k!r} may use letters, digits, '.', '_', '-' only")
        return v
