"""Futures: the results of queued work. Each is an asyncio task in the gateway; ``wait`` awaits an
``asyncio.Event`` (no poll interval). Completed results stay in memory and in SQLite for
``persistence.future_ttl_seconds``; after a gateway restart ``wait`` answers from SQLite."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from twinkle.types import GoneError, InternalError, NotFoundError, TwinkleError
from twinkle.types.api import FutureRef, FutureState, StepTiming
from twinkle.types.outputs import timing_of

from ..store import Store
from .common import jsonable, now, swallow, unwrap

log = logging.getLogger("twinkle.server")

_PRUNE_EVERY_S = 60.0  # expired future rows are deleted from SQLite this often


@dataclass
class Future:
    future_id: str
    user: str
    type: str
    run_id: str | None
    event: asyncio.Event = field(default_factory=asyncio.Event)
    state: FutureState | None = None
    done_at: float = 0.0
    task: asyncio.Task[Any] | None = None
    session_id: str | None = None  # the session whose end cancels this work while it is still queued
    cancel_reason: str | None = None
    created_at: float = field(default_factory=now)


class Futures:
    def __init__(self, store: Store, ttl_seconds: float):
        self.store = store
        self.ttl_seconds = ttl_seconds
        self.by_id: dict[str, Future] = {}
        self._done: deque[tuple[float, str]] = deque()  # (done_at, future id), in completion order
        self._next_prune = 0.0
        self._by_session: dict[str, set[str]] = {}  # session id -> its cancellable futures still running

    def _new(self, user: str, typ: str, run_id: str | None) -> Future:
        fut = Future(future_id="f" + uuid.uuid4().hex, user=user, type=typ, run_id=run_id)
        self.by_id[fut.future_id] = fut
        return fut

    def spawn(
        self, user: str, typ: str, run_id: str | None, coro: Coroutine[Any, Any, Any], *,
        after: asyncio.Future[Any] | None = None, session_id: str | None = None,
    ) -> tuple[FutureRef, asyncio.Task[Any]]:
        """Run ``coro`` (after ``after`` finished, whatever its outcome) as a task whose outcome is the future's.
        ``session_id``: the work is cancelled when that session ends (:meth:`cancel_session`)."""
        fut = self._new(user, typ, run_id)
        if session_id is not None:
            fut.session_id = session_id
            self._by_session.setdefault(session_id, set()).add(fut.future_id)

        async def _runner() -> Any:
            try:
                if after is not None and not after.done():
                    await asyncio.shield(after)
                result = await coro
            except BaseException as exc:
                coro.close()
                err = unwrap(exc)
                if isinstance(err, asyncio.CancelledError):
                    err = (GoneError(f"the request was cancelled: {fut.cancel_reason}") if fut.cancel_reason
                           else InternalError("the request was cancelled (server shutting down)"))
                if not isinstance(err, TwinkleError):
                    rid = uuid.uuid4().hex[:12]
                    log.error("request %s (%s on %s) failed [request id %s]", fut.future_id, typ, run_id, rid,
                              exc_info=(type(err), err, err.__traceback__))
                    err = InternalError(f"internal error (request id {rid})", detail={"request_id": rid})
                self.finish(fut, None, err)
                raise err from None
            self.finish(fut, result, None)
            return result

        task = asyncio.get_running_loop().create_task(_runner())
        fut.task = task
        return FutureRef(future_id=fut.future_id, run_id=run_id), task

    def completed(self, user: str, typ: str, run_id: str | None, result: Any) -> FutureRef:
        """A future that is already complete (an idempotent call answered from state)."""
        fut = self._new(user, typ, run_id)
        self.finish(fut, result, None)
        return FutureRef(future_id=fut.future_id, run_id=run_id)

    def cancel_session(self, session_id: str, reason: str) -> int:
        """Cancel the session's queued work (its worker drops it before running it). Returns how many."""
        n = 0
        for fid in self._by_session.pop(session_id, ()):
            fut = self.by_id.get(fid)
            if fut is not None and fut.state is None and fut.task is not None and not fut.task.done():
                fut.cancel_reason = reason
                fut.task.cancel()
                n += 1
        return n

    def finish(self, fut: Future, result: Any, err: TwinkleError | None) -> None:
        if fut.session_id is not None:
            pending = self._by_session.get(fut.session_id)
            if pending is not None:
                pending.discard(fut.future_id)
                if not pending:
                    del self._by_session[fut.session_id]
        fut.done_at = now()
        self._done.append((fut.done_at, fut.future_id))
        if err is None:
            fut.state = FutureState(future_id=fut.future_id, status="complete", type=fut.type, result=result,
                                    timing=StepTiming(server_s=max(0.0, fut.done_at - fut.created_at),
                                                      **(timing_of(result) or {})))
        else:
            body = err.to_dict()
            body["status"] = err.status
            fut.state = FutureState(future_id=fut.future_id, status="failed", type=fut.type, error=body)
        fut.event.set()
        # Persist after the waiters have answered (a long-poll woken by ``event.set`` runs first): the row only
        # serves reads after a gateway restart, and serializing a result + an SQLite write is not free.
        try:
            asyncio.get_running_loop().call_soon(self._persist, fut, result)
        except RuntimeError:  # no running loop (synchronous use)
            self._persist(fut, result)

    def _persist(self, fut: Future, result: Any) -> None:
        assert fut.state is not None
        try:
            row = {
                "future_id": fut.future_id, "status": fut.state.status, "type": fut.type,
                "result": jsonable(result), "error": fut.state.error, "run_id": fut.run_id,
            }
            self.store.put_future(fut.future_id, fut.user, fut.done_at + self.ttl_seconds, row)
        except Exception:
            log.exception("could not persist the result of future %s", fut.future_id)

    async def wait(self, user: str, future_id: str, timeout: float = 30.0) -> FutureState:
        """Long-poll: returns as soon as the future completes, or ``status=pending`` after ``timeout``."""
        fut = self.by_id.get(future_id) if isinstance(future_id, str) else None
        if fut is None:
            row = self.store.get_future(future_id) if isinstance(future_id, str) else None
            if row is None or row[0] != user:
                raise NotFoundError(f"future {future_id!r} not found (or expired)", field="future_id")
            d = row[1]
            return FutureState(future_id=future_id, status=d["status"], type=d.get("type"),
                               result=d.get("result"), error=d.get("error"))
        if fut.user != user:
            raise NotFoundError(f"future {future_id!r} not found (or expired)", field="future_id")
        if fut.state is None and timeout > 0:
            try:
                await asyncio.wait_for(fut.event.wait(), timeout)
            except asyncio.TimeoutError:
                pass
        if fut.state is not None:
            return fut.state
        return FutureState(future_id=future_id, status="pending", type=fut.type)

    def run_id_of(self, user: str, future_id: str) -> str | None:
        fut = self.by_id.get(future_id)
        return fut.run_id if fut is not None and fut.user == user else None

    def next_deadline(self, slack: float) -> float:
        """When :meth:`expire` next has work (``slack`` after a result's TTL, so one tick handles it)."""
        times = [self._next_prune]
        if self._done:
            times.append(self._done[0][0] + self.ttl_seconds + slack)
        return min(times)

    def expire(self, t: float) -> None:
        """Forget results older than the TTL (memory now, SQLite every ``_PRUNE_EVERY_S``)."""
        cut = t - self.ttl_seconds
        done = self._done
        while done and done[0][0] < cut:
            _, fid = done.popleft()
            fut = self.by_id.get(fid)
            if fut is not None and fut.state is not None and fut.done_at < cut:
                del self.by_id[fid]
        if t >= self._next_prune:
            self.store.prune_futures(t)
            self._next_prune = t + _PRUNE_EVERY_S


__all__ = ["Future", "Futures", "swallow"]
