"""A run's life on a worker: creating it (a fresh adapter, or one resumed from a checkpoint), unloading it
(after an automatic checkpoint, when its session ends) and deleting it."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import Any

from twinkle.types import LoraConfig
from twinkle.types.api import FutureRef, MetricHistory, RunInfo, SessionInfo

from ..ops import LoadOp, SaveOp
from ..state.checkpoints import Checkpoints
from ..state.common import now as _now
from ..state.common import unwrap
from ..state.identity import User
from .context import Context
from .saving import Saving

__all__ = ["RunLifecycle"]

log = logging.getLogger("twinkle.server")


class RunLifecycle:
    def __init__(self, ctx: Context, saving: Saving):
        self.ctx = ctx
        self.saving = saving

    def _new_run(
        self, user: User, s: SessionInfo, run_id: str, base_model: str, lora: LoraConfig, replica: int,
        name: str | None, metadata: dict[str, Any] | None,
    ) -> RunInfo:
        s.run_ids.append(run_id)
        s.last_heartbeat = _now()
        self.ctx.sessions.save(s)
        return self.ctx.runs.new(user, s, run_id, base_model, lora, replica, name, metadata)

    async def create_run(
        self, user: User, *, session_id: str, base_model: str, lora: LoraConfig,
        run_id: str | None = None, name: str | None = None, metadata: dict[str, Any] | None = None,
    ) -> FutureRef:
        """Place a new adapter on a worker replica. ``run_id`` given (Tinker: ``{sid}:train:{n}``) makes the
        call idempotent: the same id for the same user returns the existing run's future. Result: RunInfo."""
        ctx = self.ctx
        s = ctx.sessions.get_active(user, session_id)
        m = ctx.model_cfg(base_model)
        rid, existing = ctx.runs.claim_id(user, s, run_id)
        if existing is not None:
            return await self._existing_run_future(user, existing)
        replica = ctx.runs.place(user, m, lora, ctx.config.limits.max_adapters_per_user)
        run = self._new_run(user, s, rid, m.served_name, lora, replica, name, metadata)
        worker = ctx.worker(m.served_name, replica)

        async def _go() -> RunInfo:
            await worker.create_adapter(rid, lora)
            return run.model_copy(deep=True)

        return ctx.spawn(user, "create_run", rid, _go(), ready_for=rid)

    async def resume_run(
        self, user: User, *, session_id: str, checkpoint: str, optimizer: bool = True,
        run_id: str | None = None, metadata: dict[str, Any] | None = None,
    ) -> FutureRef:
        """Create a run from a checkpoint (Tinker create-via-load). Result: RunInfo."""
        ctx = self.ctx
        s = ctx.sessions.get_active(user, session_id)
        ck = ctx.checkpoints.resolve(user, checkpoint)
        src = ctx.runs.by_id.get(ck.info.run_id)
        lora, base_model = Checkpoints.model_of(ck, src)
        m = ctx.model_cfg(base_model, field="checkpoint")
        rid, existing = ctx.runs.claim_id(user, s, run_id)
        if existing is not None:
            return await self._existing_run_future(user, existing)
        replica = ctx.runs.place(user, m, lora, ctx.config.limits.max_adapters_per_user)
        md = {**(metadata or {}), "resumed_from": ck.info.path}
        run = self._new_run(user, s, rid, m.served_name, lora, replica, src.name if src else None, md)
        worker = ctx.worker(m.served_name, replica)
        load = LoadOp(checkpoint=ck.info.path, optimizer=optimizer)

        async def _go() -> RunInfo:
            await worker.create_adapter(rid, lora)
            await worker.execute(rid, load, path=ck.dir)
            if optimizer:
                run.step = ck.info.step
            run.last_checkpoint = ck.info.path if ck.info.kind == "training" else None
            ctx.runs.save(run)
            return run.model_copy(deep=True)

        return ctx.spawn(user, "create_run", rid, _go(), ready_for=rid)

    async def _existing_run_future(self, user: User, run: RunInfo) -> FutureRef:
        ready = self.ctx.runs.extra[run.run_id].ready
        if ready is not None and not ready.done():
            async def _wait() -> RunInfo:
                await asyncio.shield(ready)
                return run.model_copy(deep=True)
            return self.ctx.spawn(user, "create_run", run.run_id, _wait())
        return self.ctx.futures.completed(user.name, "create_run", run.run_id, run.model_copy(deep=True))

    async def unload_run(self, run: RunInfo, *, checkpoint: bool, new_state: str = "unloaded") -> None:
        """Free ``run``'s adapter on its worker (after an automatic checkpoint when ``checkpoint``)."""
        runs = self.ctx.runs
        extra = runs.extra[run.run_id]
        extra.unloading = True
        if extra.ready is not None:
            try:
                await asyncio.shield(extra.ready)
            except Exception:
                pass
        worker = self.ctx.worker(run.base_model, extra.replica)
        if checkpoint and run.state == "active":
            name = time.strftime("auto-%Y%m%d-%H%M%S", time.gmtime()) + f"-{secrets.token_hex(2)}"
            try:
                await self.saving.save(run, worker, SaveOp(name=name, kind="training"), None)
            except Exception:
                log.exception("automatic checkpoint of %s failed", run.run_id)
        try:
            await worker.remove_adapter(run.run_id)
        except Exception as e:  # already gone on the worker: nothing to free
            log.info("remove_adapter(%s): %s", run.run_id, unwrap(e))
        runs.set_state(run, new_state)
        runs.save(run)

    async def delete_run(self, user: User, run_id: str) -> RunInfo:
        runs = self.ctx.runs
        run = runs.get(user, run_id)
        if run.state == "active":
            await self.unload_run(run, checkpoint=False, new_state="deleted")
        else:
            runs.set_state(run, "deleted")
            runs.save(run)
        return run.model_copy(deep=True)

    def get_metrics(self, user: User, run_id: str) -> MetricHistory:
        run = self.ctx.runs.get(user, run_id)
        return MetricHistory(run_id=run.run_id, points=self.ctx.runs.metrics(run))
