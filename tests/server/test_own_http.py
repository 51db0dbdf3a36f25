"""The gateway replica's own HTTP server (twinkle/server/own_http.py), in process: lifespan, SO_REUSEADDR, the
port taken again at once after a stop with a client connection open, a clear error on a busy port."""

from __future__ import annotations

import asyncio
import socket
from contextlib import asynccontextmanager

import httpx
import pytest
from fastapi import FastAPI

from twinkle.net import free_port
from twinkle.server.own_http import OwnHTTPServer, bind_socket


def _app(events: list[str]) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        events.append("start")
        yield
        events.append("stop")

    app = FastAPI(lifespan=lifespan)

    @app.get("/ping")
    async def ping() -> dict[str, str]:
        return {"pong": "yes"}

    return app


def test_serves_runs_the_lifespan_and_gives_the_port_back_at_once():
    async def main() -> None:
        port = free_port()
        events: list[str] = []
        server = OwnHTTPServer(_app(events), "127.0.0.1", port)
        assert server._sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 1
        await server.start()
        assert server.alive() and events == ["start"]
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as c:  # keep-alive connection open
            r = await c.get("/ping")
            assert r.status_code == 200 and r.json() == {"pong": "yes"} and "date" in r.headers
            await server.stop(timeout=5)
            assert events == ["start", "stop"] and not server.alive()
            # a gateway replica restarted in its place binds the same port at once
            again = OwnHTTPServer(_app(events), "127.0.0.1", port)
            await again.start()
            try:
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as c2:
                    assert (await c2.get("/ping")).status_code == 200
            finally:
                await again.stop(timeout=5)

    asyncio.run(asyncio.wait_for(main(), 60))


def test_a_busy_port_fails_in_the_constructor():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(OSError):
            bind_socket("127.0.0.1", port)


def test_a_failing_lifespan_is_reported():
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        raise RuntimeError("no database")
        yield  # pragma: no cover

    async def main() -> None:
        server = OwnHTTPServer(FastAPI(lifespan=lifespan), "127.0.0.1", free_port())
        with pytest.raises(RuntimeError, match="did not start"):
            await server.start(timeout=20)
        await server.stop(timeout=2)

    asyncio.run(asyncio.wait_for(main(), 60))
