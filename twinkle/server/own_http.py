"""The gateway replica's own HTTP server (``http.proxy: direct`` on a local Ray).

Ray Serve 2.60's "direct ingress" also lets an ingress replica serve HTTP itself, but it keeps Serve's Python
proxy actor running beside it (the controller forces a head-node proxy whenever direct ingress is on, and the
replica's HTTP server is off when proxies are disabled). That actor is one more Ray worker process: ~1 % of a
core while the server is idle (its main thread wakes every 10 ms, its uvicorn every 0.1 s) and ~1 s of start-up.
With ``direct`` on a local Ray the launcher therefore starts Serve with proxies disabled, and the gateway
replica runs the FastAPI app under uvicorn on ``http.host:http.port`` here, on the replica's own event loop
(the same loop Serve runs user code on: ``RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0``).

Compared with Serve's wrapper: the socket is bound with ``SO_REUSEADDR`` (a replica Serve restarts after a crash
with open connections takes the port again at once), keep-alive is Serve's 90 s, signals stay Ray's, the app's
lifespan (the service's start/stop) runs in the server, ``X-Forwarded-*`` headers are not trusted (nothing sits in
front of it), and the server's housekeeping tick (uvicorn wakes every 0.1 s to refresh its ``Date`` header and
check for exit) runs once a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Generator
from typing import Any

import uvicorn

__all__ = ["OwnHTTPServer", "bind_socket"]

log = logging.getLogger("twinkle.server")

KEEP_ALIVE_S = 90  # Ray Serve's default for its HTTP servers (uvicorn's own is 5 s)
TICK_S = 1.0


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket on ``host:port`` with ``SO_REUSEADDR`` (IPv6 for an address with ``:``)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class _Server(uvicorn.Server):
    """uvicorn without signal handlers (Ray's worker keeps its own) and with a 1 s housekeeping tick."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield

    wake: asyncio.Event | None = None

    async def main_loop(self) -> None:
        self.wake = asyncio.Event()
        counter = 0
        while not await self.on_tick(counter):
            counter = (counter + 10) % 864000  # on_tick refreshes the Date header when counter % 10 == 0
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.wake.wait(), TICK_S)  # stop() wakes it at once


class OwnHTTPServer:
    """Serves ``app`` on ``host:port`` from the running event loop until :meth:`stop`."""

    def __init__(self, app: Any, host: str, port: int):
        self.host, self.port = host, port
        self._sock = bind_socket(host, port)  # fails here (EADDRINUSE ...) rather than in a background task
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
        self._server = _Server(uvicorn.Config(
            app, host=host, port=port, lifespan="on", access_log=False, log_config=None, proxy_headers=False,
            timeout_keep_alive=KEEP_ALIVE_S))
        self._task: asyncio.Task[None] | None = None

    async def start(self, timeout: float = 120.0) -> None:
        """Start serving; returns once the app's lifespan has started and the socket accepts connections."""
        self._task = asyncio.get_running_loop().create_task(self._serve())
        deadline = asyncio.get_running_loop().time() + timeout
        while not self._server.started:
            if self._task.done():
                exc = self._task.exception()
                raise RuntimeError(f"the gateway's HTTP server on {self.host}:{self.port} did not start") from exc
            if asyncio.get_running_loop().time() > deadline:
                raise RuntimeError(f"the gateway's HTTP server on {self.host}:{self.port} did not start in time")
            await asyncio.sleep(0.01)

    async def _serve(self) -> None:
        try:
            await self._server.serve(sockets=[self._sock])
        except SystemExit as e:  # uvicorn exits the process when the lifespan's start-up fails: an error here
            raise RuntimeError(f"the gateway's HTTP server stopped (exit status {e.code})") from None

    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, let requests in flight finish (up to ``timeout``), run the lifespan's shutdown."""
        self._server.should_exit = True
        if self._server.wake is not None:
            self._server.wake.set()
        if self._task is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._task), timeout)
        with contextlib.suppress(OSError):
            self._sock.close()
