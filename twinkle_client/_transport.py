"""One keep-alive ``httpx.Client`` per session, with auth, typed errors and retry over network blips.

The transport is pluggable (``httpx.MockTransport``, a Starlette test transport, …) so the client is tested
against an in-process app with no sockets, as httpx itself is.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx

from ._errors import CapacityError, ConnectionLostError, error_from_response, explain_transport_error

API_PREFIX = "/api/v1/twinkle"
_USER_AGENT = "twinkle-client/0.1"


class _Requests:
    """What the sync and async clients share: headers, URL and argument building, decoding and error mapping
    (httpx's Client/AsyncClient split: the same requests, two ways to wait for them)."""

    def __init__(self, base_url: str, api_key: str | None, *, timeout: float, retry_seconds: float):
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.retry_seconds = retry_seconds
        self.timeout = timeout
        self.headers = {"User-Agent": _USER_AGENT}
        if api_key:
            self.headers["X-API-Key"] = api_key
        self._closed = threading.Event()
        self.on_connection_change: Callable[[bool], None] | None = None

    def _client_kwargs(self) -> dict[str, Any]:
        return {"base_url": self.base_url, "headers": self.headers,
                "timeout": httpx.Timeout(self.timeout, connect=10.0),
                "limits": httpx.Limits(max_keepalive_connections=8, max_connections=16)}

    @staticmethod
    def _build(path: str, json: Any, params: dict[str, Any] | None, timeout: float | None) -> tuple[str, dict[str, Any]]:
        url = path if path.startswith("/") else f"{API_PREFIX}/{path}"
        # W3C trace context: the server's spans for this call join this trace (its id is in error messages)
        kwargs: dict[str, Any] = {"params": params, "headers": {"traceparent": new_traceparent()}}
        if json is not None:
            kwargs["json"] = json
        if timeout is not None:
            kwargs["timeout"] = httpx.Timeout(timeout, connect=10.0)
        return url, kwargs

    def _network_error(self, e: Exception, retry: bool, deadline: float, delay: float) -> None:
        """Raise unless this network failure should be retried after ``delay``."""
        if isinstance(e, RuntimeError) and "closed" not in str(e).lower():
            raise e
        self._notify(False)
        if not retry or self._closed.is_set() or time.monotonic() + delay > deadline:
            raise ConnectionLostError(explain_transport_error(self.base_url, e)) from None

    def _decode(self, response: httpx.Response, retry: bool, deadline: float) -> tuple[bool, Any]:
        """``(True, body)`` for a success; ``(False, seconds)`` to retry a 429; raises the typed error."""
        self._notify(True)
        if response.status_code < 400:
            return True, (response.json() if response.content else None)
        err = error_from_response(response)
        if isinstance(err, CapacityError) and retry and time.monotonic() + err.retry_after <= deadline:
            return False, max(0.0, err.retry_after)
        raise err

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


class HTTP(_Requests):
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
        super().__init__(base_url, api_key, timeout=timeout, retry_seconds=retry_seconds)
        self.transport = transport
        self._client = httpx.Client(transport=transport, **self._client_kwargs())

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
        url, kwargs = self._build(path, json, params, timeout)
        deadline = time.monotonic() + (self.retry_seconds if retry_seconds is None else retry_seconds)
        delay = 0.1
        while True:
            try:
                response = self._client.request(method, url, **kwargs)
            except (httpx.TransportError, RuntimeError) as e:  # connect/read errors, a closed pool
                self._network_error(e, retry, deadline, delay)
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            ok, value = self._decode(response, retry, deadline)
            if ok:
                return value
            time.sleep(value)

    def get(self, path: str, **kw: Any) -> Any:
        return self.request("GET", path, **kw)

    def post(self, path: str, json: Any = None, **kw: Any) -> Any:
        return self.request("POST", path, json=json if json is not None else {}, **kw)

    def delete(self, path: str, **kw: Any) -> Any:
        return self.request("DELETE", path, **kw)

    def close(self) -> None:
        self._closed.set()
        self._client.close()

    def async_twin(self) -> AsyncHTTP:
        """An ``AsyncHTTP`` to the same server with the same key (for ``await``-ing calls in a notebook)."""
        return AsyncHTTP(self.base_url, self.api_key, transport=self.transport, timeout=self.timeout,
                         retry_seconds=self.retry_seconds)


class _ThreadedTransport(httpx.AsyncBaseTransport):
    """A sync transport (an in-process test app) used from async code: each request runs in a worker thread."""

    def __init__(self, inner: httpx.BaseTransport):
        self._inner = inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        req = httpx.Request(request.method, request.url, headers=request.headers, content=body)
        resp = await asyncio.to_thread(self._inner.handle_request, req)
        content = await asyncio.to_thread(resp.read)
        return httpx.Response(resp.status_code, headers=resp.headers, content=content, request=request)


class AsyncHTTP(_Requests):
    """The async twin of :class:`HTTP` (same requests, same errors and retries; ``await`` instead of block)."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        *,
        transport: httpx.AsyncBaseTransport | httpx.BaseTransport | None = None,
        timeout: float = 60.0,
        retry_seconds: float = 60.0,
    ):
        super().__init__(base_url, api_key, timeout=timeout, retry_seconds=retry_seconds)
        if isinstance(transport, httpx.BaseTransport):
            transport = _ThreadedTransport(transport)
        self._client = httpx.AsyncClient(transport=transport, **self._client_kwargs())

    async def request(
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
        url, kwargs = self._build(path, json, params, timeout)
        deadline = time.monotonic() + (self.retry_seconds if retry_seconds is None else retry_seconds)
        delay = 0.1
        while True:
            try:
                response = await self._client.request(method, url, **kwargs)
            except (httpx.TransportError, RuntimeError) as e:
                self._network_error(e, retry, deadline, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            ok, value = self._decode(response, retry, deadline)
            if ok:
                return value
            await asyncio.sleep(value)

    async def get(self, path: str, **kw: Any) -> Any:
        return await self.request("GET", path, **kw)

    async def post(self, path: str, json: Any = None, **kw: Any) -> Any:
        return await self.request("POST", path, json=json if json is not None else {}, **kw)

    async def delete(self, path: str, **kw: Any) -> Any:
        return await self.request("DELETE", path, **kw)

    async def aclose(self) -> None:
        self._closed.set()
        await self._client.aclose()


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
