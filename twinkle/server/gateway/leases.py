"""Sessions are leases: a client heartbeats; a reaper task sleeps until the next deadline (a lease, a
checkpoint TTL, a result TTL; at most ``REAP_MAX_SLEEP_S``), expires sessions whose lease lapsed, checkpoints
their runs (``auto-<timestamp>``, kind training) and unloads them (run state → ``unloaded``)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from twinkle.types.api import SessionInfo

from ..state.common import now as _now
from ..state.identity import User
from .context import Context
from .run_lifecycle import RunLifecycle

__all__ = ["REAP_MAX_SLEEP_S", "Leases"]

log = logging.getLogger("twinkle.server")

REAP_MAX_SLEEP_S = 30.0  # the reaper wakes at least this often (and at each deadline + _REAP_SLACK_S)
_REAP_SLACK_S = 0.5  # wake this long after a deadline, so one tick handles it


class Leases:
    def __init__(self, ctx: Context, lifecycle: RunLifecycle):
        self.ctx = ctx
        self.lifecycle = lifecycle
        self._reaper: asyncio.Task[Any] | None = None
        self._kick: asyncio.Event | None = None
        self._closing = False

    # ---- the sessions API ----------------------------------------------------------------------------------
    def create_session(
        self, user: User, *, client: str = "twinkle", metadata: dict[str, Any] | None = None,
        tags: list[str] | None = None, lease_seconds: float | None = None,
    ) -> SessionInfo:
        cfg = self.ctx.config
        return self.ctx.sessions.create(
            user, client=client, metadata=metadata, tags=tags, lease_seconds=lease_seconds,
            default_lease=cfg.lease_seconds, max_lease=cfg.max_lease_seconds,
        )

    def request_stop(self, user: User, session_id: str) -> SessionInfo:
        """Ask the session's training loop to stop at its next step boundary: the flag rides on the replies of
        the session's training calls (``FutureRef.stop_requested``) until the client clears it."""
        s = self.ctx.sessions.get_active(user, session_id)
        s.stop_requested_at = _now()
        self.ctx.sessions.save(s)
        return s

    def clear_stop(self, user: User, session_id: str) -> SessionInfo:
        s = self.ctx.sessions.get(user, session_id)
        if s.stop_requested_at is not None:
            s.stop_requested_at = None
            self.ctx.sessions.save(s)
        return s

    async def end_session(self, s: SessionInfo, state: str, reason: str) -> None:
        """Close or expire ``s``: cancel its queued sampling requests, checkpoint and unload its runs."""
        ctx = self.ctx
        ctx.sessions.end(s, state, reason)
        n = ctx.futures.cancel_session(s.session_id, f"session {s.session_id} ended ({reason})")
        if n:
            log.info("session %s (%s): cancelled %d queued sampling requests", s.session_id, reason, n)
        for run_id in list(s.run_ids):
            run = ctx.runs.by_id.get(run_id)
            if run is not None and run.state == "active":
                await self.lifecycle.unload_run(run, checkpoint=True)

    # ---- the reaper ----------------------------------------------------------------------------------------
    def ensure_reaper(self) -> None:
        """Start the reaper task (once a loop runs; idempotent)."""
        if self._reaper is None or self._reaper.done():
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            self._kick = self.ctx.sessions.kick = self.ctx.checkpoints.kick = asyncio.Event()
            self._reaper = loop.create_task(self._reap_loop())

    async def stop(self) -> None:
        self._closing = True
        if self._reaper is not None:
            self._reaper.cancel()
            try:
                await self._reaper
            except (asyncio.CancelledError, Exception):
                pass
            self._reaper = None

    async def _reap_loop(self) -> None:
        """Sleeps until the next lease/TTL deadline (at most ``REAP_MAX_SLEEP_S``; a new session or TTL wakes
        it early), so an idle server does not tick."""
        while not self._closing:
            try:
                await self.reap()
            except Exception:
                log.exception("lease reaper tick failed")
            delay = max(0.05, min(REAP_MAX_SLEEP_S, self._next_deadline() - _now()))
            kick = self._kick
            if kick is None:
                await asyncio.sleep(delay)
                continue
            kick.clear()
            # Not ``asyncio.wait_for(kick.wait(), delay)``: on Python 3.11 that swallows a cancel arriving as the
            # kick is set, and the loop then sleeps again through shutdown.
            timer = asyncio.get_running_loop().call_later(delay, kick.set)
            try:
                await kick.wait()
            finally:
                timer.cancel()

    def _next_deadline(self) -> float:
        """When the reaper has something to do next (a lease may lapse, a checkpoint or future expires)."""
        ctx = self.ctx
        times = [ctx.futures.next_deadline(_REAP_SLACK_S)]
        for t in (ctx.sessions.next_deadline(), ctx.checkpoints.next_deadline()):
            if t is not None:
                times.append(t + _REAP_SLACK_S)
        return min(times)

    async def reap(self, now: float | None = None) -> None:
        """One reaper tick: expire lapsed sessions (checkpoint + unload), drop old futures and checkpoints.
        Work is proportional to what expires, not to the number of stored sessions/runs/checkpoints."""
        ctx = self.ctx
        t = now or _now()
        for s in ctx.sessions.lapsed(t):
            log.info("session %s of %s: lease lapsed, unloading its adapters", s.session_id, s.user)
            await self.end_session(s, "expired", "lease expired")
        ctx.futures.expire(t)
        ctx.checkpoints.expire(t)
