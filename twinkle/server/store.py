"""Embedded SQLite persistence: API keys (hashed), sessions, runs, checkpoints, samplers, future results.

One ``Store`` per process. The gateway writes through it; the CLI (``twinkle-server keys ...``) opens the same
file from another process (WAL mode makes that safe). Rows are plain dicts; the service turns them into the
API models.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["KEY_PREFIX", "Store", "hash_key"]

KEY_PREFIX = "tml-"  # the Tinker SDK only accepts keys that start with this

_SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    key_id TEXT PRIMARY KEY, user TEXT NOT NULL, key_hash TEXT NOT NULL UNIQUE,
    created_at REAL NOT NULL, revoked_at REAL, is_admin INTEGER NOT NULL DEFAULT 0, note TEXT);
CREATE TABLE IF NOT EXISTS sessions (
    session_id TEXT PRIMARY KEY, user TEXT NOT NULL, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, user TEXT NOT NULL, session_id TEXT NOT NULL, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS checkpoints (
    run_id TEXT NOT NULL, kind TEXT NOT NULL, name TEXT NOT NULL, user TEXT NOT NULL,
    dir TEXT NOT NULL, data TEXT NOT NULL, PRIMARY KEY (run_id, kind, name));
CREATE TABLE IF NOT EXISTS samplers (
    sampler_id TEXT PRIMARY KEY, user TEXT NOT NULL, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS futures (
    future_id TEXT PRIMARY KEY, user TEXT NOT NULL, expires_at REAL NOT NULL, data TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS runs_user ON runs(user);
CREATE INDEX IF NOT EXISTS ckpt_user ON checkpoints(user);
CREATE INDEX IF NOT EXISTS sessions_user ON sessions(user);
CREATE INDEX IF NOT EXISTS samplers_user ON samplers(user);
CREATE INDEX IF NOT EXISTS futures_expiry ON futures(expires_at);
CREATE INDEX IF NOT EXISTS keys_user ON keys(user);
"""


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class Store:
    """Thread-safe SQLite store (one connection, one lock)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, timeout=30.0, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _exec(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # ---- keys --------------------------------------------------------------------------------------------
    def create_key(self, user: str, *, is_admin: bool = False, note: str | None = None) -> tuple[str, str]:
        """Returns ``(key_id, key)``; only the hash is stored, so the key is shown once."""
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        key_id = "k-" + secrets.token_hex(6)
        self._exec(
            "INSERT INTO keys (key_id, user, key_hash, created_at, is_admin, note) VALUES (?,?,?,?,?,?)",
            (key_id, user, hash_key(key), time.time(), int(is_admin), note),
        )
        return key_id, key

    def lookup_key(self, key: str) -> dict[str, Any] | None:
        rows = self._exec(
            "SELECT key_id, user, is_admin FROM keys WHERE key_hash=? AND revoked_at IS NULL", (hash_key(key),)
        )
        if not rows:
            return None
        key_id, user, is_admin = rows[0]
        return {"key_id": key_id, "user": user, "is_admin": bool(is_admin)}

    def list_keys(self, user: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT key_id, user, created_at, revoked_at, is_admin, note FROM keys"
        rows = self._exec(sql + (" WHERE user=?" if user else "") + " ORDER BY created_at", (user,) if user else ())
        cols = ("key_id", "user", "created_at", "revoked_at", "is_admin", "note")
        return [dict(zip(cols, r, strict=True)) for r in rows]

    def revoke_key(self, key_id: str) -> bool:
        with self._lock:
            cur = self._db.execute(
                "UPDATE keys SET revoked_at=? WHERE key_id=? AND revoked_at IS NULL", (time.time(), key_id)
            )
            return cur.rowcount > 0

    # ---- generic JSON rows -------------------------------------------------------------------------------
    def put_session(self, row: dict[str, Any]) -> None:
        self._exec(
            "INSERT OR REPLACE INTO sessions (session_id, user, data) VALUES (?,?,?)",
            (row["session_id"], row["user"], json.dumps(row)),
        )

    def sessions(self) -> list[dict[str, Any]]:
        return [json.loads(r[0]) for r in self._exec("SELECT data FROM sessions")]

    def put_run(self, row: dict[str, Any]) -> None:
        self._exec(
            "INSERT OR REPLACE INTO runs (run_id, user, session_id, data) VALUES (?,?,?,?)",
            (row["run_id"], row["user"], row["session_id"], json.dumps(row)),
        )

    def runs(self) -> list[dict[str, Any]]:
        return [json.loads(r[0]) for r in self._exec("SELECT data FROM runs")]

    def put_checkpoint(self, row: dict[str, Any], user: str, directory: str) -> None:
        self._exec(
            "INSERT OR REPLACE INTO checkpoints (run_id, kind, name, user, dir, data) VALUES (?,?,?,?,?,?)",
            (row["run_id"], row["kind"], row["name"], user, directory, json.dumps(row)),
        )

    def delete_checkpoint(self, run_id: str, kind: str, name: str) -> None:
        self._exec("DELETE FROM checkpoints WHERE run_id=? AND kind=? AND name=?", (run_id, kind, name))

    def checkpoints(self) -> list[tuple[dict[str, Any], str, str]]:
        """``(row, user, dir)`` for every checkpoint."""
        return [(json.loads(d), u, p) for d, u, p in self._exec("SELECT data, user, dir FROM checkpoints")]

    def put_sampler(self, row: dict[str, Any]) -> None:
        self._exec(
            "INSERT OR REPLACE INTO samplers (sampler_id, user, data) VALUES (?,?,?)",
            (row["sampler_id"], row["user"], json.dumps(row)),
        )

    def samplers(self) -> list[dict[str, Any]]:
        return [json.loads(r[0]) for r in self._exec("SELECT data FROM samplers")]

    # ---- future results ----------------------------------------------------------------------------------
    def put_future(self, future_id: str, user: str, expires_at: float, row: dict[str, Any]) -> None:
        self._exec(
            "INSERT OR REPLACE INTO futures (future_id, user, expires_at, data) VALUES (?,?,?,?)",
            (future_id, user, expires_at, json.dumps(row)),
        )

    def get_future(self, future_id: str) -> tuple[str, dict[str, Any]] | None:
        rows = self._exec(
            "SELECT user, data FROM futures WHERE future_id=? AND expires_at>?", (future_id, time.time())
        )
        return (rows[0][0], json.loads(rows[0][1])) if rows else None

    def prune_futures(self, now: float | None = None) -> int:
        with self._lock:
            cur = self._db.execute("DELETE FROM futures WHERE expires_at<=?", (now or time.time(),))
            return cur.rowcount
