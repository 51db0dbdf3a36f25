"""The gateway replica's direct-ingress socket gets SO_REUSEADDR (twinkle/server/_reuse_addr.py), in process."""

from __future__ import annotations

import socket

from twinkle.server import _reuse_addr


def test_serve_http_util_sockets_get_reuse_address(monkeypatch):
    from ray.serve._private import http_util

    monkeypatch.setattr(http_util, "socket", socket)  # restored afterwards: other tests see Ray unchanged
    assert _reuse_addr.reuse_address() and _reuse_addr.reuse_address()  # idempotent
    with http_util.socket.socket(http_util.socket.AF_INET, http_util.socket.SOCK_STREAM) as s:
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) == 1
    assert http_util.socket.SOL_SOCKET == socket.SOL_SOCKET  # every other name is the real module's


def test_an_unexpected_module_is_left_alone(monkeypatch):
    from ray.serve._private import http_util

    other = object()
    monkeypatch.setattr(http_util, "socket", other)
    assert _reuse_addr.reuse_address() is False and http_util.socket is other
