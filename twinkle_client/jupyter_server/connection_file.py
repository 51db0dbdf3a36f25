"""Where kernels record the Twinkle connection they made, for the Jupyter server extension to read.

A kernel that connects (``%twinkle connect`` or ``init_twinkle_client``) calls :func:`record_connection`;
the Jupyter server extension calls :func:`latest_connection` to find the connection to show in the
sidebar panel. The file format (one JSON object per process, mode 0600)::

    $TWINKLE_HOME/connections/<pid>.json          # TWINKLE_HOME defaults to ~/.twinkle
    {"url": "http://host:8000", "api_key": "..." | null, "session_id": "..." | null,
     "pid": 1234, "time": 1732800000.0}

This is the format ``twinkle_client._state.write_connection`` (used by ``init_twinkle_client`` and
``%twinkle connect``) writes; ``updated_at`` is accepted as a synonym of ``time``.
``TWINKLE_CONNECTIONS_DIR`` overrides the folder. The newest file whose process is still alive wins.
This module is light: standard library only, safe to import from a kernel.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Connection", "connections_dir", "forget_connection", "latest_connection", "record_connection"]


@dataclass(frozen=True)
class Connection:
    """One recorded connection to a Twinkle server."""

    url: str
    api_key: str
    session_id: str | None = None
    pid: int | None = None
    updated_at: float = 0.0

    def key_hint(self) -> str:
        """The last four characters of the key, for display (never the key itself)."""
        if not self.api_key:
            return "none"
        return ("…" + self.api_key[-4:]) if len(self.api_key) > 8 else "…"


def connections_dir() -> Path:
    """The folder that holds one ``<pid>.json`` per connected process."""
    explicit = os.environ.get("TWINKLE_CONNECTIONS_DIR")
    if explicit:
        return Path(explicit).expanduser()
    home = os.environ.get("TWINKLE_HOME") or os.path.join("~", ".twinkle")
    return Path(home).expanduser() / "connections"


def record_connection(url: str, api_key: str, session_id: str | None = None, *, pid: int | None = None) -> Path:
    """Record (or refresh) this process's active connection; returns the file written."""
    pid = os.getpid() if pid is None else pid
    folder = connections_dir()
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{pid}.json"
    tmp = folder / f".{pid}.json.tmp"
    body = {"url": url, "api_key": api_key, "session_id": session_id, "pid": pid, "time": time.time()}
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(body, fh)
    os.replace(tmp, target)
    return target


def forget_connection(*, pid: int | None = None) -> None:
    """Remove this process's record (on session close or kernel exit)."""
    pid = os.getpid() if pid is None else pid
    try:
        (connections_dir() / f"{pid}.json").unlink()
    except FileNotFoundError:
        pass


def _alive(pid: int | None) -> bool:
    if pid is None:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read(path: Path) -> Connection | None:
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(raw, dict) or not isinstance(raw.get("url"), str):
        return None
    key = raw.get("api_key")
    pid = raw.get("pid")
    session_id = raw.get("session_id")
    updated = raw.get("time", raw.get("updated_at"))
    return Connection(
        url=raw["url"],
        api_key=key if isinstance(key, str) else "",
        session_id=session_id if isinstance(session_id, str) else None,
        pid=pid if isinstance(pid, int) else None,
        updated_at=float(updated) if isinstance(updated, (int, float)) else path.stat().st_mtime,
    )


def latest_connection() -> Connection | None:
    """The most recently recorded connection of a live process, or None."""
    folder = connections_dir()
    if not folder.is_dir():
        return None
    best: Connection | None = None
    for path in folder.glob("*.json"):
        conn = _read(path)
        if conn is None or not _alive(conn.pid):
            continue
        if best is None or conn.updated_at > best.updated_at:
            best = conn
    return best
