"""Small local state files (all JSON, mode 0600, under ``$TWINKLE_HOME``, default ``~/.twinkle``).

* ``connection.json`` — the most recent active connection ``{url, api_key, session_id, pid, time}``; read by
  ``Session.resume()`` and by the JupyterLab extension.
* ``connections/<pid>.json`` — the same, one file per live client process (removed on ``close()``).
* ``sessions/<session_id>.json`` — per run of the session: the next ``seq_id`` and the optimizer/LR settings
  last sent, so a re-attached process continues the sequence instead of replaying it.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

_LOCK = threading.Lock()


def twinkle_home() -> Path:
    return Path(os.environ.get("TWINKLE_HOME") or Path.home() / ".twinkle").expanduser()


def _write(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def _read(path: Path) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def connection_file(pid: int | None = None) -> Path:
    folder = os.environ.get("TWINKLE_CONNECTIONS_DIR")
    base = Path(folder).expanduser() if folder else twinkle_home() / "connections"
    return base / f"{os.getpid() if pid is None else pid}.json"


def write_connection(url: str, api_key: str | None, session_id: str) -> None:
    data = {"url": url, "api_key": api_key, "session_id": session_id, "pid": os.getpid(), "time": time.time()}
    with _LOCK:
        _write(connection_file(), data)
        _write(twinkle_home() / "connection.json", data)


def clear_connection(session_id: str) -> None:
    with _LOCK:
        for path in (connection_file(), twinkle_home() / "connection.json"):
            data = _read(path)
            if data is not None and data.get("session_id") == session_id:
                try:
                    path.unlink()
                except OSError:
                    pass


def read_connection(path: str | os.PathLike[str] | None = None) -> dict[str, Any] | None:
    return _read(Path(path) if path is not None else twinkle_home() / "connection.json")


class SessionState:
    """Per-session run bookkeeping, persisted on every change (a few hundred bytes)."""

    def __init__(self, session_id: str, *, persist: bool = True):
        self.path = twinkle_home() / "sessions" / f"{session_id}.json"
        self.persist = persist
        self._lock = threading.Lock()
        self.data: dict[str, Any] = (_read(self.path) if persist else None) or {"runs": {}}
        self.data.setdefault("runs", {})

    def run(self, run_id: str) -> dict[str, Any]:
        return self.data["runs"].setdefault(run_id, {"next_seq_id": 1})

    def next_seq_id(self, run_id: str) -> int:
        with self._lock:
            r = self.run(run_id)
            seq = int(r.get("next_seq_id", 1))
            r["next_seq_id"] = seq + 1
            self._save()
            return seq

    def bump_seq_id(self, run_id: str, at_least: int) -> None:
        with self._lock:
            r = self.run(run_id)
            r["next_seq_id"] = max(int(r.get("next_seq_id", 1)), int(at_least))
            self._save()

    def get(self, run_id: str, key: str) -> Any:
        return self.data["runs"].get(run_id, {}).get(key)

    def set(self, run_id: str, key: str, value: Any) -> None:
        with self._lock:
            self.run(run_id)[key] = value
            self._save()

    def _save(self) -> None:
        if self.persist:
            try:
                _write(self.path, self.data)
            except OSError:
                self.persist = False  # a read-only home must not break training
