"""SO_REUSEADDR for the gateway replica's own HTTP socket (Ray Serve's direct ingress, ``http.proxy: direct``).

Ray Serve 2.60 binds a direct-ingress socket without ``SO_REUSEADDR`` (``serve/_private/http_util.py``,
``start_asgi_http_server``). With ``http.proxy: direct`` that socket is ``http.port``: when the gateway replica
dies with client connections open (kill -9, a crash of a worker hosted in it, the launcher killed), the kernel
keeps those connections (FIN_WAIT2, then TIME_WAIT: up to a minute or more) and, without the flag on both sides,
neither the replica Serve starts in its place nor a new launch can bind the port — and Serve then blocks the
port for good. Every usual server sets the flag (uvicorn does when it binds itself).

:func:`reuse_address` makes the sockets that module creates set it, in the calling process only (the gateway
replica calls it in its constructor, before Serve starts the replica's HTTP server). If Ray's module does not
look as expected it changes nothing and returns False.
"""

from __future__ import annotations

import socket
from typing import Any

__all__ = ["reuse_address"]


class _ReuseAddrSocketModule:
    """Stands in for the ``socket`` module inside Ray Serve's ``http_util``: ``socket.socket(...)`` there returns a
    socket with ``SO_REUSEADDR`` set; every other name is the real module's."""

    def __getattr__(self, name: str) -> Any:
        return getattr(socket, name)

    @staticmethod
    def socket(*args: Any, **kwargs: Any) -> socket.socket:
        sock = socket.socket(*args, **kwargs)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        return sock


def reuse_address() -> bool:
    """Install the stand-in (idempotent). True when Serve's direct-ingress sockets now get ``SO_REUSEADDR``."""
    try:
        from ray.serve._private import http_util
    except ImportError:
        return False
    current = getattr(http_util, "socket", None)
    if isinstance(current, _ReuseAddrSocketModule):
        return True
    if current is not socket or not callable(getattr(http_util, "start_asgi_http_server", None)):
        return False
    http_util.socket = _ReuseAddrSocketModule()
    return True
