"""One keep-alive ``httpx.Client`` per session, with auth, typed errors and retry over network blips.

The transport is pluggable (``httpx.MockTransport``, a Starlette test transport, …) so the client is tested
against an in-process app with no sockets, as httpx itself is.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx

from ._errors import CapacityError, ConnectionLostError, error_from_response

API_PREFIX = "/api/v1/twinkle"
_USER_AGENT = "twinkle-client/0.1"


class HTTP:
    """Thin JSON-over-HTTP helper. ``retry_seconds``: how long a network blip or a 429 is retried before
    giving up with ``ConnectionLostError`` / ``CapacityError``."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        *,
        transport: httpx.BaseTransport | None = None,
        timeout: float = 60.0,
        retry_seconds: float = 60.0,
    ):
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.retry_seconds = retry_seconds
        headers = {"User-Agent": _USER_AGENT}
        if api_key:
            headers["X-API-Key"] = api_key
        self._client = httpx.Client(
            base_url=self.base_url,
            headers=headers,
            transport=transport,
            timeout=httpx.Timeout(timeout, connect=10.0),
            limits=httpx.Limits(max_keepalive_connections=8, max_connections=16),
        )
        self._closed = threading.Event()
        self.on_connection_change: Callable[[bool], None] | None = None

    # ------------------------------------------------------------------------------------------------------
    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
        timeout: float | None = None,
        retry: bool = True,
        retry_seconds: float | None = None,
    ) -> Any:
        """Send one request; return the decoded JSON body. Non-2xx raise the typed ``TwinkleError``."""
        url = path if path.startswith("/") else f"{API_PREFIX}/{path}"
        budget = self.retry_seconds if retry_seconds is None else retry_seconds
        deadline = time.monotonic() + budget
        delay = 0.1
        # W3C trace context: the server's spans for this call join this trace (its id is in error messages)
        kwargs: dict[str, Any] = {"params": params, "headers": {"traceparent": new_traceparent()}}
        if json is not None:
            kwargs["json"] = json
        if timeout is not None:
            kwargs["timeout"] = httpx.Timeout(timeout, connect=10.0)
        while True:
            try:
                response = self._client.request(method, url, **kwargs)
            except (httpx.TransportError, RuntimeError) as e:  # connect/read errors, a closed pool
                if isinstance(e, RuntimeError) and "closed" not in str(e).lower():
                    raise
                self._notify(False)
                if not retry or self._closed.is_set() or time.monotonic() + delay > deadline:
                    raise ConnectionLostError(
                        f"no answer from the Twinkle server at {self.base_url} ({type(e).__name__}: {e})"
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            self._notify(True)
            if response.status_code < 400:
                if not response.content:
                    return None
                return response.json()
            err = error_from_response(response)
            if isinstance(err, CapacityError) and retry and time.monotonic() + err.retry_after <= deadline:
                time.sleep(max(0.0, err.retry_after))
                continue
            raise err

    def get(self, path: str, **kw: Any) -> Any:
        return self.request("GET", path, **kw)

    def post(self, path: str, json: Any = None, **kw: Any) -> Any:
        return self.request("POST", path, json=json if json is not None else {}, **kw)

    def delete(self, path: str, **kw: Any) -> Any:
        return self.request("DELETE", path, **kw)

    def close(self) -> None:
        self._closed.set()
        self._client.close()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def _notify(self, ok: bool) -> None:
        cb = self.on_connection_change
        if cb is not None:
            try:
                cb(ok)
            except Exception:  # a UI callback must never break a request
                pass


class SyncASGITransport(httpx.BaseTransport):
    """Drive an ASGI app (e.g. the Twinkle gateway) in-process from the sync client: the app runs on an event
    loop in a helper thread (an anyio blocking portal); requests from any thread are served concurrently, so a
    long-poll and a heartbeat can be in flight together. ``startup``/``shutdown``: async callables run on that
    loop (httpx's ASGITransport does not run the app's lifespan)."""

    def __init__(self, app: Any, *, startup: Callable[[], Any] | None = None,
                 shutdown: Callable[[], Any] | None = None):
        from anyio.from_thread import start_blocking_portal

        self._inner = httpx.ASGITransport(app=app)
        self._cm = start_blocking_portal()
        self._portal = self._cm.__enter__()
        self._shutdown = shutdown
        if startup is not None:
            self._portal.call(startup)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        body = request.read()

        async def _send() -> httpx.Response:
            req = httpx.Request(request.method, request.url, headers=request.headers, content=body)
            resp = await self._inner.handle_async_request(req)
            content = await resp.aread()  # an async transport's stream
            return httpx.Response(resp.status_code, headers=resp.headers, content=content, request=request)

        return self._portal.call(_send)

    def close(self) -> None:
        """Keep the app running (sessions may share one transport); call ``shutdown_app()`` to stop it."""

    def shutdown_app(self) -> None:
        if self._shutdown is not None:
            self._portal.call(self._shutdown)
            self._shutdown = None
        self._cm.__exit__(None, None, None)


def new_traceparent() -> str:
    """A fresh W3C ``traceparent`` (sampled): ``00-<trace id>-<span id of this call>-01``."""
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"
