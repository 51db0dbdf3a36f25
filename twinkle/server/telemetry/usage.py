"""Usage metering per user and base model: tokens trained, prefilled and sampled, and checkpoint storage.

Counts live in the server's SQLite file (table ``usage``, one row per user, base model and UTC hour), so a
restart loses nothing: the gateway adds to an in-memory buffer on each completed operation (a dict update)
and writes it in one transaction at most once a second and when the service stops; reports flush first.
Checkpoint storage is read from the checkpoint records (bytes stored now, not a time series).

Always on (it is the accounting, not telemetry). Never imports prometheus_client or OpenTelemetry.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from typing import Any

from ..state.common import deferred

__all__ = ["USAGE_COLUMNS", "Usage", "parse_time"]

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS usage (user TEXT NOT NULL, base_model TEXT NOT NULL, hour INTEGER NOT NULL, "
    "tokens_trained INTEGER NOT NULL DEFAULT 0, tokens_prefilled INTEGER NOT NULL DEFAULT 0, "
    "tokens_sampled INTEGER NOT NULL DEFAULT 0, requests INTEGER NOT NULL DEFAULT 0, "
    "PRIMARY KEY (user, base_model, hour))"
)
_UPSERT = (
    "INSERT INTO usage (user, base_model, hour, tokens_trained, tokens_prefilled, tokens_sampled, requests) "
    "VALUES (?,?,?,?,?,?,?) ON CONFLICT(user, base_model, hour) DO UPDATE SET "
    "tokens_trained=tokens_trained+excluded.tokens_trained, "
    "tokens_prefilled=tokens_prefilled+excluded.tokens_prefilled, "
    "tokens_sampled=tokens_sampled+excluded.tokens_sampled, requests=requests+excluded.requests"
)
USAGE_COLUMNS = ("user", "base_model", "tokens_trained", "tokens_prefilled", "tokens_sampled", "requests",
                 "checkpoint_bytes", "checkpoints")
_FLUSH_DELAY_S = 1.0
RATE_WINDOW_S = 60.0


_MAX_EPOCH = 253402300799.0  # 9999-12-31T23:59:59Z


def parse_time(value: str | float | None, *, now: float | None = None, field: str = "since") -> float | None:
    """A time as epoch seconds in [0, year 9999] (anything else, NaN included, is a 400 on ``field``):
    ``None``, epoch seconds, an ISO date/time (UTC unless it names a zone) or a duration back from now
    (``90m``, ``24h``, ``7d``)."""
    from twinkle.types import InvalidInputError

    if value is None or value == "":
        return None
    try:
        t = _parse_time(value, now, field)
    except OverflowError:
        t = float("nan")
    if not 0.0 <= t <= _MAX_EPOCH:  # also false for NaN
        raise InvalidInputError(f"{field}={value!r} is not a time between 1970 and 9999", field=field)
    return t


def _parse_time(value: str | float, now: float | None, field: str) -> float:
    from datetime import datetime, timezone

    from twinkle.types import InvalidInputError

    if isinstance(value, (int, float)):
        return float(value)
    v = str(value).strip()
    t = time.time() if now is None else now
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    if len(v) > 1 and v[-1] in units and v[:-1].replace(".", "", 1).isdigit():
        return t - float(v[:-1]) * units[v[-1]]
    try:
        return float(v)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(v.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidInputError(
            f"{field}={value!r} is not a time: give an ISO date (2026-01-31, 2026-01-31T12:00Z), epoch seconds "
            "or a duration back from now (90m, 24h, 7d)", field=field) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


class Usage:
    """The usage ledger over a :class:`twinkle.server.store.Store` (its connection and lock)."""

    def __init__(self, store: Any):
        self.store = store
        self._buf: dict[tuple[str, str, int], list[int]] = {}
        self._buf_lock = threading.Lock()
        self._timer: asyncio.TimerHandle | None = None
        self._recent: deque[tuple[float, int, int, int]] = deque(maxlen=200_000)  # for tokens/s (all users)
        store._exec(_SCHEMA)

    # ---- recording ---------------------------------------------------------------------------------------
    def add(self, user: str, base_model: str, *, trained: int = 0, prefilled: int = 0, sampled: int = 0,
            at: float | None = None) -> None:
        hour = int((time.time() if at is None else at) // 3600) * 3600
        key = (user, base_model, hour)
        with self._buf_lock:
            row = self._buf.get(key)
            if row is None:
                row = self._buf[key] = [0, 0, 0, 0]
            row[0] += int(trained)
            row[1] += int(prefilled)
            row[2] += int(sampled)
            row[3] += 1
        self._recent.append((time.monotonic(), int(trained), int(prefilled), int(sampled)))
        self._schedule()

    def rates(self, window_s: float = RATE_WINDOW_S) -> dict[str, float]:
        """Tokens per second over the last ``window_s`` seconds, all users together (server load)."""
        cut = time.monotonic() - window_s
        while self._recent and self._recent[0][0] < cut:
            self._recent.popleft()
        sums = [0, 0, 0]
        for _, *v in self._recent:
            for i, n in enumerate(v):
                sums[i] += n
        return {k: round(n / window_s, 3) for k, n in zip(("trained", "prefilled", "sampled"), sums, strict=True)}

    def _schedule(self) -> None:
        self._timer = deferred(self._timer, _FLUSH_DELAY_S, self.flush)

    def flush(self) -> None:
        """Write the buffered counts (one transaction)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        with self._buf_lock:
            buf, self._buf = self._buf, {}
        if not buf:
            return
        rows = [(u, m, h, *v) for (u, m, h), v in buf.items()]
        st = self.store
        with st._lock:
            st._db.execute("BEGIN")
            try:
                st._db.executemany(_UPSERT, rows)
                st._db.execute("COMMIT")
            except BaseException:
                st._db.execute("ROLLBACK")
                with self._buf_lock:  # keep the counts for the next flush
                    for key, v in buf.items():
                        cur = self._buf.setdefault(key, [0, 0, 0, 0])
                        for i, n in enumerate(v):
                            cur[i] += n
                raise

    # ---- reporting ---------------------------------------------------------------------------------------
    def report(self, user: str | None = None, since: float | None = None,
               until: float | None = None) -> list[dict[str, Any]]:
        """One row per (user, base model): token sums over ``[since, until)`` (hour granularity: an hour is
        counted when it starts inside the window) and the checkpoint bytes stored now."""
        self.flush()
        where: list[str] = []
        args: list[Any] = []
        if user is not None:
            where.append("user=?")
            args.append(user)
        if since is not None:
            where.append("hour>=?")
            args.append(int(since // 3600) * 3600)
        if until is not None:
            where.append("hour<?")
            args.append(float(until))
        sql = ("SELECT user, base_model, SUM(tokens_trained), SUM(tokens_prefilled), SUM(tokens_sampled), "
               "SUM(requests) FROM usage" + (" WHERE " + " AND ".join(where) if where else "")
               + " GROUP BY user, base_model")
        out: dict[tuple[str, str], dict[str, Any]] = {}
        for u, m, tr, pf, sa, rq in self.store._exec(sql, tuple(args)):
            out[(u, m)] = {"user": u, "base_model": m, "tokens_trained": int(tr or 0),
                           "tokens_prefilled": int(pf or 0), "tokens_sampled": int(sa or 0),
                           "requests": int(rq or 0), "checkpoint_bytes": 0, "checkpoints": 0}
        ck_sql = ("SELECT c.user, COALESCE(json_extract(r.data, '$.base_model'), ''), "
                  "SUM(COALESCE(json_extract(c.data, '$.size_bytes'), 0)), COUNT(*) FROM checkpoints c "
                  "LEFT JOIN runs r ON r.run_id = c.run_id" + (" WHERE c.user=?" if user is not None else "")
                  + " GROUP BY 1, 2")
        for u, m, size, n in self.store._exec(ck_sql, (user,) if user is not None else ()):
            row = out.setdefault((u, m), {"user": u, "base_model": m, "tokens_trained": 0, "tokens_prefilled": 0,
                                          "tokens_sampled": 0, "requests": 0, "checkpoint_bytes": 0,
                                          "checkpoints": 0})
            row["checkpoint_bytes"] = int(size or 0)
            row["checkpoints"] = int(n or 0)
        return [out[k] for k in sorted(out)]
