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


def check_unexpanded(value: str | None, what: str) -> None:
    """``$NAME`` left in a URL or key means the variable is not set: say which, and the near miss if any."""
    import difflib
    import os
    import re

    m = re.search(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", value or "")
    if m is None:
        return
    name = m.group(1)
    near = difflib.get_close_matches(name, list(os.environ), n=1, cutoff=0.8)
    hint = f" — did you mean ${near[0]}?" if near else " — set it (e.g. in the shell that starts Jupyter) or pass the value"
    raise ConnectionLostError(f"the {what} contains ${name}, but no environment variable {name} is set{hint}")


def explain_transport_error(url: str, e: Exception) -> str:
    """One actionable line for a network failure (TLS, proxy, DNS, refused, timeout)."""
    text = f"{type(e).__name__}: {e}"
    low = text.lower()
    if "certificate" in low or "ssl" in low or "tls" in low:
        return (f"TLS to {url} failed ({e}); use the server's CA (SSL_CERT_FILE=/path/ca.pem) or http:// if the "
                "server does not speak TLS")
    if isinstance(e, httpx.ProxyError) or "proxy" in low:
        return (f"the HTTP proxy refused or failed the request to {url} ({e}); set NO_PROXY={httpx.URL(url).host} "
                "to bypass it, or fix HTTP(S)_PROXY")
    if "name or service not known" in low or "nodename nor servname" in low or "getaddrinfo" in low:
        return (f"no answer from the Twinkle server at {url}: the host name {httpx.URL(url).host!r} does not "
                "resolve (typo in the URL?)")
    if "connection refused" in low or "errno 111" in low:
        return f"no answer from the Twinkle server at {url}: connection refused (is the server running, on this port?)"
    return f"no answer from the Twinkle server at {url} ({text})"


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
    elif body is None and response.content:
        # not JSON: some other web server (or a proxy's error page) answered — never dump its page
        kind = response.headers.get("content-type", "").split(";")[0].strip() or "non-JSON"
        klass: type[TwinkleError] = AuthenticationError if status in (401, 403) else InternalError if status >= 500 else NotFoundError
        err = klass(f"{response.request.url.host}:{response.request.url.port or ''} answered HTTP {status} with a "
                    f"{kind} page, not the Twinkle API: check the URL (host, port, no extra path) points at a "
                    "Twinkle server")
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
