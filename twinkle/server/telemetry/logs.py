"""Log configuration from the ``telemetry.logs`` block: levels of the ``twinkle`` logger hierarchy, optional
JSON lines (with the OpenTelemetry trace/span ids when a span is current), and a filter that masks API keys
and bearer tokens in every record the server's handlers write."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any

__all__ = ["JsonFormatter", "RedactSecrets", "configure_logging", "redact"]

_SECRET_RES = (
    re.compile(r"tml-[A-Za-z0-9_\-]{8,}"),  # Twinkle/Tinker API keys
    re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=\-]{8,}"),
    re.compile(r"(?i)((?:x-api-key|api[_-]?key|token|authorization)[\"']?\s*[:=]\s*[\"']?)[^\s\"',}]{8,}"),
)


def redact(text: str) -> str:
    """``text`` with API keys and tokens replaced by ``[REDACTED]``."""
    for i, rx in enumerate(_SECRET_RES):
        text = rx.sub("[REDACTED]" if i == 0 else r"\1[REDACTED]", text)
    return text


class RedactSecrets(logging.Filter):
    """Masks secrets in a record's final message (arguments included)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:
            return True
        clean = redact(msg)
        if clean != msg:
            record.msg, record.args = clean, None
        return True


def _trace_ids() -> tuple[str | None, str | None]:
    otel = sys.modules.get("opentelemetry.trace")
    if otel is None:
        return None, None
    ctx = otel.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None, None
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(), "logger": record.name, "message": redact(record.getMessage()),
        }
        trace_id, span_id = _trace_ids()
        if trace_id:
            out["trace_id"], out["span_id"] = trace_id, span_id
        rid = getattr(record, "request_id", None)
        if rid:
            out["request_id"] = rid
        if record.exc_info:
            out["exception"] = redact(self.formatException(record.exc_info))
        return json.dumps(out, ensure_ascii=False)


def configure_logging(config: Any) -> None:
    """Apply ``telemetry.logs`` (levels, format) and the secret filter to the root handlers."""
    apply_logs(config.telemetry.logs, config.log_level)


def apply_logs(logs: Any, default_level: str = "info") -> None:
    """``logs``: a :class:`~.config.LogsConfig` (the gateway and every worker replica call this)."""
    level = (logs.level or default_level).upper()
    logging.getLogger("twinkle").setLevel(level)
    for name, lvl in logs.levels.items():
        logging.getLogger(name).setLevel(lvl.upper())
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler())
    for h in root.handlers:
        if not any(isinstance(f, RedactSecrets) for f in h.filters):
            h.addFilter(RedactSecrets())
        if logs.format == "json":
            h.setFormatter(JsonFormatter())
