"""Tornado handlers under ``{base_url}twinkle/`` (Jupyter-server auth applies to every one).

| method | route | reply |
|---|---|---|
| GET | ``twinkle/connection`` | ``{configured, connection}`` (never the key) |
| POST | ``twinkle/connection`` ``{url, api_key}`` | checks the server, then the same plus ``state``/``message`` |
| DELETE | ``twinkle/connection`` | forgets the connection typed into the panel |
| GET | ``twinkle/overview`` | ``{state, message, connection, capabilities, status, load, sessions, runs, checked_at}`` |
| GET/DELETE | ``twinkle/api/<native path>`` | the Twinkle server's JSON (read-only routes, and deleting a checkpoint) |
| POST | ``twinkle/api/{sessions,runs}/<id>/stop`` | asks that session's training loop to stop at its next step boundary |

``state`` is ``connected`` | ``not_configured`` | ``server_down`` | ``bad_key`` | ``error``.
"""

from __future__ import annotations

import json
import time
from typing import Any

from jupyter_server.base.handlers import APIHandler
from jupyter_server.utils import url_path_join
from tornado import web

from .upstream import ConnectionStore, Upstream, UpstreamError, allowed

__all__ = ["setup_handlers"]

_NOT_CONFIGURED = (
    "Not connected. Run `%twinkle connect URL --api-key KEY` in a notebook, "
    "or use “Twinkle: Connect to server”."
)


class _Base(APIHandler):
    def initialize(self, store: ConnectionStore, upstream: Upstream) -> None:
        self.store = store
        self.upstream = upstream

    def _reply(self, body: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.finish(json.dumps(body))


class ConnectionHandler(_Base):
    @web.authenticated
    async def get(self) -> None:
        active = self.store.active()
        self._reply(
            {
                "configured": active is not None,
                "connection": ConnectionStore.describe(*active) if active else None,
            }
        )

    @web.authenticated
    async def post(self) -> None:
        try:
            body = json.loads(self.request.body or b"{}")
        except ValueError:
            self._reply({"error": "body is not JSON", "field": "body"}, 400)
            return
        url, key = body.get("url"), body.get("api_key", "")
        if not isinstance(url, str) or not url.strip():
            self._reply({"error": "url is required", "field": "url"}, 400)
            return
        if not isinstance(key, str):
            self._reply({"error": "api_key must be a string", "field": "api_key"}, 400)
            return
        try:
            conn = self.store.set_panel(url, key.strip())
        except ValueError as exc:
            self._reply({"error": str(exc), "field": "url"}, 400)
            return
        state, message = "connected", f"Connected to {conn.url}."
        try:
            await self.upstream.overview(conn)
        except UpstreamError as exc:
            state, message = exc.state, exc.message
        self._reply(
            {
                "configured": True,
                "connection": ConnectionStore.describe(conn, "panel"),
                "state": state,
                "message": message,
            }
        )

    @web.authenticated
    async def delete(self) -> None:
        self.store.clear_panel()
        shown = self.get()  # typed Optional by tornado's ``authenticated``
        if shown is not None:
            await shown


class OverviewHandler(_Base):
    @web.authenticated
    async def get(self) -> None:
        active = self.store.active()
        body: dict[str, Any] = {
            "state": "not_configured",
            "message": _NOT_CONFIGURED,
            "connection": None,
            "capabilities": None,
            "status": None,
            "load": None,
            "sessions": [],
            "runs": [],
            "checked_at": time.time(),
        }
        if active is not None:
            conn, source = active
            body["connection"] = ConnectionStore.describe(conn, source)
            try:
                body.update(await self.upstream.overview(conn))
                body["state"], body["message"] = "connected", f"Connected to {conn.url}."
            except UpstreamError as exc:
                body["state"], body["message"] = ("error" if exc.state == "not_found" else exc.state), exc.message
        self._reply(body)


class ProxyHandler(_Base):
    async def _forward(self, method: str, path: str) -> None:
        if not allowed(method, path):
            self._reply({"error": f"{method} {path} is not proxied", "field": "path"}, 403)
            return
        active = self.store.active()
        if active is None:
            self._reply({"error": _NOT_CONFIGURED, "state": "not_configured"}, 409)
            return
        params = {k: self.get_argument(k) for k in self.request.arguments}
        try:
            data = await self.upstream.request(active[0], method, path, params or None)
        except UpstreamError as exc:
            status = {"server_down": 502, "bad_key": 401, "not_found": 404}.get(exc.state, 502)
            self._reply({"error": exc.message, **exc.to_dict()}, status)
            return
        self._reply(data)

    @web.authenticated
    async def get(self, path: str) -> None:
        await self._forward("GET", path)

    @web.authenticated
    async def delete(self, path: str) -> None:
        await self._forward("DELETE", path)

    @web.authenticated
    async def post(self, path: str) -> None:
        await self._forward("POST", path)


def setup_handlers(web_app: Any, upstream: Upstream | None = None, store: ConnectionStore | None = None) -> None:
    """Register the ``twinkle/`` routes on a Jupyter server's tornado application."""
    base = web_app.settings.get("base_url", "/")
    args = {"store": store or ConnectionStore(), "upstream": upstream or Upstream()}
    web_app.add_handlers(
        ".*$",
        [
            (url_path_join(base, "twinkle", "connection"), ConnectionHandler, args),
            (url_path_join(base, "twinkle", "overview"), OverviewHandler, args),
            (url_path_join(base, "twinkle", "api", "(.+)"), ProxyHandler, args),
        ],
    )
