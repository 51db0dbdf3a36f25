"""Small networking helpers shared by the server's launcher, ``LocalServer`` and the tests."""

from __future__ import annotations

import random
import socket
import threading

__all__ = ["free_port"]

_RAY_WORKER_PORTS = (10002, 19999)  # Ray's default min/max_worker_port: its workers bind there
_given: set[int] = set()  # ports this process handed out already (never twice)
_lock = threading.Lock()


def _ephemeral() -> tuple[int, int]:
    """The OS's range for outgoing connections' local ports (Linux; the IANA range elsewhere)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = (int(x) for x in f.read().split())
            return lo, hi
    except (OSError, ValueError):
        return 49152, 65535


def _binds(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now, chosen outside the OS's ephemeral range and Ray's worker ports.

    A port the OS picks (``bind(0)``) comes from the ephemeral range, from which every outgoing connection also
    takes its local port: between choosing the port and a server binding it seconds later (a Ray cluster starting
    opens hundreds of connections), one of them can take it and the bind fails with EADDRINUSE (a CI run lost a
    whole integration session to this). A random port below (or above) that range and above Ray's worker ports is
    only ever taken by a listener that asks for it."""
    lo, hi = _ephemeral()
    spans = [(a, b) for a, b in ((_RAY_WORKER_PORTS[1] + 1, lo - 1), (hi + 1, 65535)) if b - a >= 1000]
    rng = random.SystemRandom()
    with _lock:
        for _ in range(200 if spans else 0):
            a, b = spans[0] if len(spans) == 1 else rng.choice(spans)
            port = rng.randint(a, b)
            if port not in _given and _binds(host, port):
                _given.add(port)
                return port
        with socket.socket() as s:  # no such range here: let the OS choose
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        _given.add(port)
        return port
