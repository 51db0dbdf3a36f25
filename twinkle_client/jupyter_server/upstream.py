"""Talks to the Twinkle server on behalf of the browser (the key never leaves the Jupyter server).

Framework-free (httpx only) so it is tested without a Jupyter server. :class:`ConnectionStore` decides
which connection is active (typed into the panel, or recorded by a kernel); :class:`Upstream` calls the
Twinkle server and turns every failure into a state the panel can show: ``server_down``, ``bad_key`` or
``error`` with a plain-English message.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass
from typing import Any

import httpx

from .connection_file import Connection, latest_connection

__all__ = [
    "API_PREFIX",
    "ConnectionStore",
    "Upstream",
    "UpstreamError",
    "normalize_url",
]

API_PREFIX = "/api/v1/twinkle"
_HEALTH_PATH = "/api/v1/healthz"
_CAPABILITIES_TTL_S = 60.0
_RUNS_LIMIT = 50
# Read-only routes the browser may fetch, and the one it may delete.
# Ids are word characters, '.', '-' and ':' (run ids look like "s5c4…:train:0"); never '/' or "..".
_ID = r"(?!\.\.)[\w.:-]+"
_GET_ALLOWED = re.compile(rf"^(capabilities|status|sessions(/{_ID})?|runs(/{_ID}(/(metrics|checkpoints))?)?|checkpoints)$")
_POST_ALLOWED = re.compile(rf"^(sessions|runs)/{_ID}/stop$")  # the Stop buttons (work while the kernel is busy)
_DELETE_ALLOWED = re.compile(rf"^runs/{_ID}(/checkpoints/(training|sampler|weights|sampler_weights)/{_ID})?$")


def normalize_url(url: str) -> str:
    """``http://h:8000/api/v1/`` → ``http://h:8000``; adds ``http://`` when no scheme is given."""
    url = url.strip()
    if not url:
        raise ValueError("empty server URL")
    if "://" not in url:
        url = "http://" + url
    url = url.rstrip("/")
    for suffix in (API_PREFIX, "/api/v1"):
        if url.endswith(suffix):
            url = url[: -len(suffix)]
    parsed = httpx.URL(url)
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"not an http(s) URL: {url!r}")
    return url


class UpstreamError(Exception):
    """A call to the Twinkle server failed; ``state`` says how (server_down | bad_key | not_found | error)."""

    def __init__(self, state: str, message: str, status: int | None = None):
        super().__init__(message)
        self.state = state
        self.message = message
        self.status = status

    def to_dict(self) -> dict[str, Any]:
        return {"state": self.state, "message": self.message, "status": self.status}


@dataclass
class _Panel:
    conn: Connection


class ConnectionStore:
    """The active connection: the newest of the one typed into the panel and the ones kernels recorded."""

    def __init__(self) -> None:
        self._panel: _Panel | None = None

    def set_panel(self, url: str, api_key: str) -> Connection:
        conn = Connection(url=normalize_url(url), api_key=api_key, updated_at=time.time())
        self._panel = _Panel(conn)
        return conn

    def clear_panel(self) -> None:
        self._panel = None

    def active(self) -> tuple[Connection, str] | None:
        """``(connection, source)`` with source ``panel`` or ``kernel``, or None when nothing is configured."""
        kernel = latest_connection()
        panel = self._panel.conn if self._panel else None
        if panel and (kernel is None or panel.updated_at >= kernel.updated_at):
            return panel, "panel"
        if kernel is not None:
            try:
                return Connection(
                    url=normalize_url(kernel.url),
                    api_key=kernel.api_key,
                    session_id=kernel.session_id,
                    pid=kernel.pid,
                    updated_at=kernel.updated_at,
                ), "kernel"
            except ValueError:
                return None
        return None

    @staticmethod
    def describe(conn: Connection, source: str) -> dict[str, Any]:
        """What the browser may see about a connection (no key)."""
        return {
            "url": conn.url,
            "source": source,
            "session_id": conn.session_id,
            "key_hint": conn.key_hint(),
            "updated_at": conn.updated_at,
        }


def _error_message(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and body.get("error"):
        return str(body["error"])
    text = resp.text.strip()
    return text[:200] if text else resp.reason_phrase


class Upstream:
    """Async calls to one Twinkle server, with errors classified for display."""

    def __init__(self, transport: httpx.AsyncBaseTransport | None = None, timeout: float = 10.0):
        self._transport = transport
        self._timeout = httpx.Timeout(timeout, connect=min(3.0, timeout))
        self._capabilities: dict[str, tuple[float, Any]] = {}

    def _client(self, conn: Connection) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=conn.url,
            headers={"X-API-Key": conn.api_key, "User-Agent": "twinkle-jupyterlab"}
            if conn.api_key
            else {"User-Agent": "twinkle-jupyterlab"},
            timeout=self._timeout,
            transport=self._transport,
        )

    async def request(self, conn: Connection, method: str, path: str, params: dict[str, Any] | None = None) -> Any:
        """Call ``{API_PREFIX}/{path}`` and return its JSON, or raise :class:`UpstreamError`."""
        async with self._client(conn) as client:
            return await self._call(client, conn, method, f"{API_PREFIX}/{path}", params)

    async def _call(
        self, client: httpx.AsyncClient, conn: Connection, method: str, path: str, params: dict[str, Any] | None
    ) -> Any:
        try:
            resp = await client.request(method, path, params=params)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise UpstreamError("server_down", f"Cannot reach the Twinkle server at {conn.url} ({exc.__class__.__name__}).") from exc
        except httpx.TimeoutException as exc:
            raise UpstreamError("server_down", f"The Twinkle server at {conn.url} did not answer in time.") from exc
        except httpx.HTTPError as exc:
            raise UpstreamError("server_down", f"Cannot talk to the Twinkle server at {conn.url}: {exc}.") from exc
        if resp.status_code in (401, 403):
            raise UpstreamError(
                "bad_key",
                f"The Twinkle server at {conn.url} rejected the API key ({resp.status_code}: {_error_message(resp)}).",
                resp.status_code,
            )
        if resp.status_code == 404:
            raise UpstreamError("not_found", f"Not found: {_error_message(resp)}", 404)
        if resp.status_code >= 400:
            raise UpstreamError(
                "error", f"The Twinkle server answered {resp.status_code}: {_error_message(resp)}", resp.status_code
            )
        try:
            return resp.json()
        except ValueError as exc:
            raise UpstreamError("error", f"The server at {conn.url} did not answer with JSON; is it a Twinkle server?") from exc

    async def _cached_capabilities(self, client: httpx.AsyncClient, conn: Connection) -> Any:
        key = f"{conn.url}|{conn.api_key}"
        hit = self._capabilities.get(key)
        now = time.monotonic()
        if hit and now - hit[0] < _CAPABILITIES_TTL_S:
            return hit[1]
        caps = await self._call(client, conn, "GET", f"{API_PREFIX}/capabilities", None)
        self._capabilities[key] = (now, caps)
        return caps

    async def overview(self, conn: Connection) -> dict[str, Any]:
        """Capabilities, status, live load, the caller's sessions and runs in one reply (the panel's poll)."""
        async with self._client(conn) as client:
            # Sessions/runs carry the key check each poll; capabilities are cached for a minute.
            results: tuple[Any, Any] = await asyncio.gather(
                self._call(client, conn, "GET", f"{API_PREFIX}/sessions", None),
                self._call(client, conn, "GET", f"{API_PREFIX}/runs", {"limit": _RUNS_LIMIT}),
                return_exceptions=True,
            )
            sessions, runs = results
            for item in (sessions, runs):
                if isinstance(item, UpstreamError):
                    if item.state == "not_found":
                        raise UpstreamError(
                            "error", f"{conn.url} does not look like a Twinkle server (404 on the native API).", 404
                        )
                    raise item
                if isinstance(item, BaseException):
                    raise item
            try:
                caps = await self._cached_capabilities(client, conn)
            except UpstreamError:
                caps = None
            status: Any
            load: Any
            status, load = await asyncio.gather(
                self._call(client, conn, "GET", f"{API_PREFIX}/status", None),
                # live load (queue depth, tokens/s) + the caller's own usage; absent on servers without it
                self._call(client, conn, "GET", f"{API_PREFIX}/load", None),
                return_exceptions=True,
            )
        return {
            "capabilities": caps,
            "status": None if isinstance(status, BaseException) else status,
            "load": None if isinstance(load, BaseException) else load,
            "sessions": (sessions or {}).get("sessions", []) if isinstance(sessions, dict) else [],
            "runs": (runs or {}).get("runs", []) if isinstance(runs, dict) else [],
        }


def allowed(method: str, path: str) -> bool:
    """Whether the browser may proxy ``method path`` (read-only routes, a stop request, deleting a checkpoint)."""
    if method == "GET":
        return bool(_GET_ALLOWED.match(path))
    if method == "POST":
        return bool(_POST_ALLOWED.match(path))
    if method == "DELETE":
        return bool(_DELETE_ALLOWED.match(path))
    return False
