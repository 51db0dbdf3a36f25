"""Registered samplers: ``{session_id}:sample:{n}`` → a base model, a checkpoint path or a run's live weights."""

from __future__ import annotations

from typing import Any

from twinkle.types import InvalidInputError, NotFoundError
from twinkle.types.api import SessionInfo

from ..store import Store
from .common import now
from .identity import User

_PUBLIC = ("sampler_id", "base_model", "model_path")


class Samplers:
    def __init__(self, store: Store):
        self.store = store
        self.by_id: dict[str, dict[str, Any]] = {}
        self._next: dict[str, int] = {}  # session id -> the next free sampler number

    def load(self) -> None:
        for row in self.store.samplers():
            self.by_id[row["sampler_id"]] = row
            self._count(row["sampler_id"])

    def _count(self, sampler_id: str) -> None:
        sid, _, n = sampler_id.rpartition(":sample:")
        if n.isdigit():
            self._next[sid] = max(self._next.get(sid, 0), int(n) + 1)

    @staticmethod
    def public(row: dict[str, Any]) -> dict[str, Any]:
        return {k: row[k] for k in _PUBLIC}

    def row(self, user: User, sampler_id: str) -> dict[str, Any]:
        row = self.by_id.get(sampler_id) if isinstance(sampler_id, str) else None
        if row is None or row["user"] != user.name:
            raise NotFoundError(f"sampler {sampler_id!r} not found", field="sampler_id")
        return row

    def claim_id(self, user: User, s: SessionInfo, sampler_id: str | None) -> tuple[str, dict[str, Any] | None]:
        """The id of a new sampler of session ``s``; with the existing row when the client's id names one of
        its own samplers (an idempotent retry)."""
        if sampler_id is not None:
            if not isinstance(sampler_id, str) or not sampler_id.startswith(f"{s.session_id}:sample:"):
                raise InvalidInputError(f"sampler id must be {s.session_id}:sample:<n>", field="sampler_id")
            old = self.by_id.get(sampler_id)
            if old is not None:
                if old["user"] != user.name:
                    raise NotFoundError(f"sampler {sampler_id!r} not found", field="sampler_id")
                return sampler_id, old
            return sampler_id, None
        n = self._next.get(s.session_id, 0)
        sampler_id = f"{s.session_id}:sample:{n}"
        while sampler_id in self.by_id:
            n += 1
            sampler_id = f"{s.session_id}:sample:{n}"
        return sampler_id, None

    def add(self, user: User, s: SessionInfo, sampler_id: str, base_model: str, model_path: str | None,
            run_id: str | None) -> dict[str, Any]:
        row = {
            "sampler_id": sampler_id, "user": user.name, "session_id": s.session_id, "base_model": base_model,
            "model_path": model_path, "run_id": run_id, "created_at": now(),
        }
        self.by_id[sampler_id] = row
        self._count(sampler_id)
        self.store.put_sampler(row)
        return row
