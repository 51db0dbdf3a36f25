"""Training runs: one LoRA adapter each, placed on one replica of its base model.

A run's state is ``active`` (its adapter is loaded on its replica), ``unloaded`` (its session ended; the
adapter was checkpointed and freed), ``lost`` (the adapter vanished: server restart or worker failure),
or ``deleted``. ``step`` counts applied optimizer steps; the metric history is kept in memory (bounded).
"""

from __future__ import annotations

import asyncio
import builtins
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any

from twinkle.types import (
    InvalidInputError,
    LimitExceededError,
    LoraConfig,
    NotFoundError,
    StateLostError,
    TwinkleError,
)
from twinkle.types.api import FutureRef, MetricPoint, RunInfo, SessionInfo

from ..store import Store
from .common import deferred, now
from .identity import User

_MAX_METRIC_POINTS = 10000
_ROW_FLUSH_DELAY_S = 1.0  # a forward/forward_backward's metrics reach the stored row within this (see Runs.record)
_DEFERRABLE = frozenset({"forward", "forward_backward"})
APPLIED_MEMORY = 64  # seq ids remembered per run (more than the worker's default ``result_memory`` of 32)


def with_mean_loss(metrics: dict[str, Any], weight: float) -> dict[str, Any]:
    """Run metrics carry ``loss`` = per-token mean (``loss:sum`` / the batch's loss weight): the one loss the
    notebook, the panel, ``%twinkle runs`` and the frames all show (the batch total stays as ``loss:sum``)."""
    total = metrics.get("loss:sum")
    if total is None or weight <= 0 or "loss" in metrics:
        return metrics
    return {"loss": float(total) / weight, **metrics}


@dataclass
class Applied:
    """A training call accepted for a run under a ``seq_id``: a retry of it is answered from this one."""

    kind: str
    ref: FutureRef
    task: asyncio.Task[Any]

    def retryable(self) -> bool:
        """The call failed in a way a retry may fix (a full queue, a lost adapter, a server error): a repeat
        of its seq_id runs again instead of getting the same failure."""
        t = self.task
        if not t.done():
            return False
        if t.cancelled():
            return True
        err = t.exception()
        if err is None:
            return False
        status = err.status if isinstance(err, TwinkleError) else 500
        return status in (404, 429) or status >= 500


@dataclass
class RunExtra:
    """What the gateway keeps about a run besides its public ``RunInfo``."""

    replica: int = 0
    ready: asyncio.Future[Any] | None = None  # the creation task; every op of the run waits for it
    metrics: list[MetricPoint] = field(default_factory=list)
    applied: OrderedDict[int, Applied] = field(default_factory=OrderedDict)  # seq_id -> the call it named
    dirty: bool = False  # work applied since the last training checkpoint (lost if the adapter is lost)
    saved_dirty: bool | None = None  # ``dirty`` as last written to the store (None: never written here)
    rollback: str | None = None  # a one-time notice: the run was reloaded from an older checkpoint
    unloading: bool = False  # its adapter is being removed on purpose (session end, delete): never reload it
    inflight: int = 0  # ops submitted and not finished: admission against max_pending_per_adapter (Service.submit)
    inflight_kinds: Counter[str] = field(default_factory=Counter)  # the same, by kind: named in the 429


class Runs:
    def __init__(self, store: Store):
        self.store = store
        self.by_id: dict[str, RunInfo] = {}
        self.extra: dict[str, RunExtra] = {}
        self._by_user: dict[str, list[str]] = {}
        self.active: set[str] = set()
        self._deferred: set[str] = set()  # runs whose stored row lags only in last_metrics / last_request_time
        self._timer: asyncio.TimerHandle | None = None

    def load(self) -> list[RunInfo]:
        """Read the stored runs. Runs that were ``active`` are ``lost`` now (the previous process's workers are
        gone); they are returned so the caller can say where each can resume from."""
        lost = []
        for row in self.store.runs():
            run = RunInfo.model_validate(row)
            if run.state == "active":
                run.state = "lost"
                lost.append(run)
            self.extra[run.run_id] = RunExtra(replica=int(row.get("_replica", 0) or 0), dirty=bool(row.get("_dirty")))
            self._add(run)
        for run in lost:
            self.save(run)
        return lost

    def _add(self, run: RunInfo) -> None:
        self.by_id[run.run_id] = run
        self._by_user.setdefault(run.user, []).append(run.run_id)
        self.set_state(run, run.state)

    def set_state(self, run: RunInfo, state: str) -> None:
        run.state = state  # type: ignore[assignment]
        if state == "active":
            self.active.add(run.run_id)
        else:
            self.active.discard(run.run_id)

    def save(self, run: RunInfo) -> None:
        row = run.model_dump(mode="json")
        extra = self.extra[run.run_id]
        row["_replica"] = extra.replica
        row["_dirty"] = extra.dirty
        self.store.put_run(row)
        extra.saved_dirty = extra.dirty
        self._deferred.discard(run.run_id)

    def flush(self) -> None:
        """Write the rows whose last metrics were deferred by ``record`` (on a timer, and at shutdown)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        ids, self._deferred = self._deferred, set()
        for run_id in ids:
            run = self.by_id.get(run_id)
            if run is not None:
                self.save(run)

    def get(self, user: User, run_id: str, field: str = "run_id") -> RunInfo:
        run = self.by_id.get(run_id) if isinstance(run_id, str) else None
        if run is None or run.user != user.name or run.state == "deleted":
            raise NotFoundError(f"run {run_id!r} not found", field=field)
        return run

    def get_active(self, user: User, run_id: str) -> RunInfo:
        return self.get_active_or_raise(self.get(user, run_id))

    @staticmethod
    def get_active_or_raise(run: RunInfo) -> RunInfo:
        """``run`` if it is active; otherwise the error that says what happened to it and how to go on."""
        run_id = run.run_id
        if run.state == "lost":
            reason = run.metadata.get("lost_reason") or "server restart or worker failure"
            where = (f"resume it from its last checkpoint {run.last_checkpoint}" if run.last_checkpoint
                     else "it has no checkpoint: create a new run")
            raise StateLostError(f"run {run_id!r} lost its adapter ({reason}); {where}", field="run_id")
        if run.state != "active":
            raise InvalidInputError(
                f"run {run_id!r} is {run.state}; resume it from a checkpoint (last: {run.last_checkpoint})",
                field="run_id",
            )
        return run

    def replica(self, run: RunInfo) -> int:
        return self.extra[run.run_id].replica

    def active_runs(self) -> list[RunInfo]:
        return [self.by_id[rid] for rid in self.active]

    def replica_counts(self, base_model: str, replicas: int) -> list[int]:
        counts = [0] * replicas
        for r in self.active_runs():
            if r.base_model == base_model:
                counts[self.extra[r.run_id].replica % replicas] += 1
        return counts

    def place(self, user: User, m: Any, lora: LoraConfig, max_per_user: int) -> int:
        """Check the user's and the model's capacity for a new adapter; returns the least loaded replica."""
        if lora.rank > m.max_lora_rank:
            raise LimitExceededError(
                f"LoRA rank {lora.rank} exceeds this model's max_lora_rank {m.max_lora_rank}", field="lora.rank"
            )
        mine = sum(1 for r in self.active_runs() if r.user == user.name)
        if mine >= max_per_user:
            raise LimitExceededError(
                f"user {user.name!r} already holds {mine} active runs (limit "
                f"{max_per_user}); delete or close one first", field="lora",
            )
        counts = self.replica_counts(m.served_name, m.replicas)
        replica = min(range(m.replicas), key=lambda i: counts[i])
        if counts[replica] >= m.max_adapters:
            raise LimitExceededError(
                f"model {m.served_name!r} is full ({m.max_adapters} adapters per replica x {m.replicas}); "
                "retry after other sessions close", field="base_model",
            )
        return replica

    def least_loaded_replica(self, base_model: str, replicas: int) -> int:
        if replicas == 1:
            return 0
        counts = self.replica_counts(base_model, replicas)
        return min(range(replicas), key=lambda i: counts[i])

    @staticmethod
    def _next_id(s: SessionInfo) -> str:
        n = 0
        prefix = f"{s.session_id}:train:"
        for rid in s.run_ids:
            if rid.startswith(prefix):
                tail = rid[len(prefix):]
                if tail.isdigit():
                    n = max(n, int(tail) + 1)
        return f"{prefix}{n}"

    def claim_id(self, user: User, s: SessionInfo, run_id: str | None) -> tuple[str, RunInfo | None]:
        """The id of a new run of session ``s`` (the next free one, or the client's); with the existing run
        when the client's id names one of its own (an idempotent retry)."""
        if run_id is None:
            return self._next_id(s), None
        if not isinstance(run_id, str) or not run_id.startswith(f"{s.session_id}:train:"):
            raise InvalidInputError(f"run id {run_id!r} must be {s.session_id}:train:<n>", field="run_id")
        existing = self.by_id.get(run_id)
        if existing is not None:
            if existing.user != user.name:
                raise NotFoundError(f"run {run_id!r} not found", field="run_id")
            return run_id, existing
        return run_id, None

    def new(
        self, user: User, s: SessionInfo, run_id: str, base_model: str, lora: LoraConfig, replica: int,
        name: str | None, metadata: dict[str, Any] | None,
    ) -> RunInfo:
        t = now()
        run = RunInfo(
            run_id=run_id, session_id=s.session_id, user=user.name, base_model=base_model, lora=lora, name=name,
            state="active", step=0, created_at=t, last_request_time=t, metadata=dict(metadata or {}),
        )
        self.extra[run_id] = RunExtra(replica=replica)
        self._add(run)
        self.save(run)
        return run

    def list(self, user: User, *, limit: int, offset: int) -> tuple[list[RunInfo], int]:
        if limit < 0 or offset < 0:
            raise InvalidInputError("limit and offset must be >= 0", field="limit" if limit < 0 else "offset")
        mine = sorted(
            (r for r in (self.by_id[rid] for rid in self._by_user.get(user.name, ())) if r.state != "deleted"),
            key=lambda r: r.created_at, reverse=True,
        )
        return mine[offset:offset + limit], len(mine)

    def metrics(self, run: RunInfo) -> builtins.list[MetricPoint]:  # ``list`` here is the method above
        return list(self.extra[run.run_id].metrics)

    def seen(self, run: RunInfo, seq_id: int, kind: str) -> Applied | None:
        """The earlier call of ``run`` under ``seq_id`` whose outcome a repeat gets (None: run it).

        Step, metric and checkpoint bookkeeping happen once, in the first call's task; a repeat shares that
        task, so a retry the worker answers from its memory is never counted twice. Reusing a seq_id for
        another kind of call is refused (the client has a bug; answering with the other call's result would
        hand it the wrong type)."""
        hit = self.extra[run.run_id].applied.get(seq_id)
        if hit is None:
            return None
        if hit.kind != kind:
            raise InvalidInputError(
                f"seq_id {seq_id} of run {run.run_id!r} was already used for a {hit.kind} call; a retry must "
                f"repeat the same call, and a new {kind} call needs a new seq_id", field="seq_id",
            )
        if hit.retryable():
            del self.extra[run.run_id].applied[seq_id]
            return None
        return hit

    def remember(self, run: RunInfo, seq_id: int, entry: Applied) -> None:
        applied = self.extra[run.run_id].applied
        applied[seq_id] = entry
        while len(applied) > APPLIED_MEMORY:
            applied.popitem(last=False)

    def record(self, run: RunInfo, kind: str, metrics: dict[str, Any] | None) -> None:
        """Note a completed call: last request time and (numeric) metrics at the run's current step."""
        clean = {}
        for k, v in (metrics or {}).items():
            try:
                clean[str(k)] = float(v)
            except (TypeError, ValueError):
                continue
        run.last_request_time = now()
        if clean:
            run.last_metrics = {**run.last_metrics, **clean}
            pts = self.extra[run.run_id].metrics
            pts.append(MetricPoint(step=run.step, time=run.last_request_time, kind=kind, metrics=clean))
            if len(pts) > _MAX_METRIC_POINTS:
                del pts[: len(pts) - _MAX_METRIC_POINTS]
        extra = self.extra[run.run_id]
        if kind in _DEFERRABLE and extra.saved_dirty is extra.dirty:
            # Only last_metrics / last_request_time changed (what recovery reads: step, state, the ``dirty`` flag,
            # checkpoints: is stored already): write the row within _ROW_FLUSH_DELAY_S, not on every call (an
            # SQLite write was ~12 % of a trivial forward_backward's server time). A crash loses at most that much
            # of these two informational fields.
            self._defer(run.run_id)
        else:
            self.save(run)

    def _defer(self, run_id: str) -> None:
        self._deferred.add(run_id)
        self._timer = deferred(self._timer, _ROW_FLUSH_DELAY_S, self.flush)
