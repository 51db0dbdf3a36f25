"""Who is calling, and their sessions.

API keys are looked up in the store (hashed) and cached for ``_AUTH_CACHE_S`` (a revoked key fails within
that time); bootstrap keys live only in this process. A session is a lease: every heartbeat (and every
training call) moves its deadline; :meth:`Sessions.lapsed` pops the sessions whose lease ran out, in deadline
order, from a heap (work proportional to what expires, not to the number of stored sessions).
"""

from __future__ import annotations

import asyncio
import builtins
import heapq
import time
import uuid
from dataclasses import dataclass
from typing import Any

from twinkle.types import AuthenticationError, GoneError, InvalidInputError, NotFoundError
from twinkle.types.api import SessionInfo

from ..store import Store
from .common import now, validate_user_name

_AUTH_CACHE_S = 2.0
_AUTH_CACHE_MAX = 10000


@dataclass(frozen=True)
class User:
    name: str
    key_id: str
    is_admin: bool = False


class Identity:
    """API keys → users."""

    def __init__(self, store: Store):
        self.store = store
        self.cache: dict[str, tuple[float, User]] = {}
        self._bootstrap: dict[str, User] = {}

    def add_bootstrap_key(self, key: str, user: str) -> None:
        """Accept ``key`` (not stored) as an admin key of ``user`` for this process's lifetime."""
        self._bootstrap[key] = User(name=validate_user_name(user), key_id="bootstrap", is_admin=True)

    def authenticate(self, api_key: str | None) -> User:
        """Raise ``AuthenticationError`` for a missing/unknown/revoked key."""
        if not api_key:
            raise AuthenticationError("missing API key: send X-API-Key or Authorization: Bearer <key>")
        if api_key in self._bootstrap:
            return self._bootstrap[api_key]
        hit = self.cache.get(api_key)
        t = time.monotonic()
        if hit is not None and hit[0] > t:
            return hit[1]
        row = self.store.lookup_key(api_key)
        if row is None:
            self.cache.pop(api_key, None)
            raise AuthenticationError("unknown or revoked API key")
        user = User(name=row["user"], key_id=row["key_id"], is_admin=row["is_admin"])
        if len(self.cache) > _AUTH_CACHE_MAX:
            self.cache.clear()
        self.cache[api_key] = (t + _AUTH_CACHE_S, user)
        return user


class Sessions:
    """Sessions by id, per user, and the lease heap of the active ones."""

    def __init__(self, store: Store):
        self.store = store
        self.by_id: dict[str, SessionInfo] = {}
        self._by_user: dict[str, list[str]] = {}
        self.active: set[str] = set()
        self._lease_heap: list[tuple[float, str]] = []  # (lease deadline, session id); stale entries re-pushed
        self.kick: asyncio.Event | None = None  # set when a new deadline may be earlier than the reaper's sleep

    def load(self) -> None:
        for row in self.store.sessions():
            self._add(SessionInfo.model_validate(row))

    def _add(self, s: SessionInfo) -> None:
        self.by_id[s.session_id] = s
        self._by_user.setdefault(s.user, []).append(s.session_id)
        if s.state == "active":
            self.active.add(s.session_id)
            heapq.heappush(self._lease_heap, (s.last_heartbeat + s.lease_seconds, s.session_id))
            if self.kick is not None:
                self.kick.set()

    def save(self, s: SessionInfo) -> None:
        self.store.put_session(s.model_dump(mode="json"))

    def get(self, user: User, session_id: str, field: str = "session_id") -> SessionInfo:
        s = self.by_id.get(session_id) if isinstance(session_id, str) else None
        if s is None or s.user != user.name:
            raise NotFoundError(f"session {session_id!r} not found", field=field)
        return s

    def get_active(self, user: User, session_id: str, field: str = "session_id") -> SessionInfo:
        s = self.get(user, session_id, field)
        if s.state != "active":
            raise GoneError(f"session {session_id!r} is {s.state}; create a new session", field=field)
        return s

    def create(
        self, user: User, *, client: str, metadata: dict[str, Any] | None, tags: list[str] | None,
        lease_seconds: float | None, default_lease: float, max_lease: float,
    ) -> SessionInfo:
        if client not in ("twinkle", "tinker"):
            raise InvalidInputError(f"unknown client {client!r}", field="client")
        lease = float(lease_seconds) if lease_seconds else default_lease
        if lease <= 0:
            raise InvalidInputError("lease_seconds must be > 0", field="lease_seconds")
        lease = min(lease, max_lease)
        md = dict(metadata or {})
        if tags:
            md.setdefault("tags", list(tags))
        t = now()
        s = SessionInfo(
            session_id="s" + uuid.uuid4().hex[:20], user=user.name, client=client, state="active",
            created_at=t, last_heartbeat=t, lease_seconds=lease, metadata=md, run_ids=[],
        )
        self._add(s)
        self.save(s)
        return s

    def touch(self, s: SessionInfo, *, persist: bool = True) -> None:
        """Extend the lease of an active session."""
        if s.state == "active":
            s.last_heartbeat = now()
            if persist:
                self.save(s)

    def list(self, user: User) -> list[SessionInfo]:
        return [self.by_id[sid] for sid in self._by_user.get(user.name, ())]

    def end(self, s: SessionInfo, state: str, reason: str) -> None:
        s.state = state  # type: ignore[assignment]
        self.active.discard(s.session_id)
        s.metadata = {**s.metadata, "end_reason": reason}
        self.save(s)

    def next_deadline(self) -> float | None:
        return self._lease_heap[0][0] if self._lease_heap else None

    def lapsed(self, t: float) -> builtins.list[SessionInfo]:  # ``list`` here is the method above
        """The active sessions whose lease ran out before ``t`` (each returned once)."""
        out = []
        heap = self._lease_heap
        while heap and heap[0][0] < t:
            _, sid = heapq.heappop(heap)
            s = self.by_id.get(sid)
            if s is None or s.state != "active" or sid not in self.active:
                continue
            deadline = s.last_heartbeat + s.lease_seconds
            if t - s.last_heartbeat > s.lease_seconds:
                out.append(s)
            else:  # heart-beaten since: look again at its new deadline
                heapq.heappush(heap, (deadline, sid))
        return out
