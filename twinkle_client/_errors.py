"""Typed client errors: the server's JSON error body rebuilt as the matching ``twinkle.types`` exception."""

from __future__ import annotations

from typing import Any

import httpx

from twinkle.types import (
    AuthenticationError,
    CapacityError,
    GoneError,
    InternalError,
    InvalidInputError,
    LimitExceededError,
    NotFoundError,
    StateLostError,
    TwinkleError,
    UnsupportedError,
)

__all__ = [
    "AuthenticationError",
    "CapacityError",
    "ConnectionLostError",
    "GoneError",
    "InternalError",
    "InvalidInputError",
    "LimitExceededError",
    "NotFoundError",
    "StateLostError",
    "TwinkleError",
    "UnsupportedError",
    "error_from_response",
]


class ConnectionLostError(TwinkleError):
    """No server answered at the session's URL (after retrying for the configured time)."""

    status = 503
    category = "server"
    code = "connection_lost"


def error_from_response(response: httpx.Response) -> TwinkleError:
    """Build the typed exception for a non-2xx ``response`` (a twinkle body, a FastAPI 422, or anything)."""
    status = response.status_code
    try:
        body: Any = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and "error" in body:
        err = TwinkleError.from_dict(body, status=status)
    elif isinstance(body, dict) and isinstance(body.get("detail"), list) and body["detail"]:
        # FastAPI request validation: [{loc: [...], msg, type}]
        first = body["detail"][0] if isinstance(body["detail"][0], dict) else {}
        loc = [str(p) for p in first.get("loc", []) if p not in ("body", "query", "path")]
        field = ".".join(loc) or None
        err = InvalidInputError(f"{field or 'request'}: {first.get('msg', 'invalid value')}", field=field)
        err.status = status
    else:
        text = body.get("detail") if isinstance(body, dict) else response.text[:500]
        klass = {401: AuthenticationError, 404: NotFoundError, 410: GoneError, 413: LimitExceededError,
                 429: CapacityError}.get(status, InvalidInputError if 400 <= status < 500 else InternalError)
        err = klass(f"HTTP {status}: {text or response.reason_phrase}")
        err.status = status
    ids = [f"{name} {response.headers[h]}" for name, h in (("request id", "x-request-id"), ("trace id", "x-trace-id"))
           if response.headers.get(h) and response.headers[h] not in err.message]
    if ids:  # the ids an operator looks up in the server's logs and traces
        err.request_id, err.trace_id = response.headers.get("x-request-id"), response.headers.get("x-trace-id")
        err.message = f"{err.message} ({', '.join(ids)})"
        err.args = (err.message,)
    if isinstance(err, CapacityError):
        retry = response.headers.get("retry-after")
        try:
            err.retry_after = float(retry) if retry is not None else float(err.detail.get("retry_after", 1.0))
        except ValueError:
            err.retry_after = 1.0
    return err
