"""Training operations on a run (forward/backward, optimizer step, save/load, optimizer and LR-schedule
settings): validation before a future exists, exactly-once ``seq_id`` handling (a repeated id answers from
its first execution), back-pressure at submit, and the bookkeeping of the run's step, metrics and usage."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from twinkle.data.convert import loss_weight_and_tokens
from twinkle.model.images import check_image_data
from twinkle.types import (
    CapacityError,
    ForwardBackwardOutput,
    InvalidInputError,
    OptimStepResponse,
    TwinkleError,
)
from twinkle.types.api import FutureRef, RunInfo

from ..ops import (
    ForwardBackwardOp,
    LoadOp,
    Op,
    OptimStepOp,
    SaveOp,
    SetOptimizerOp,
    SetSchedulerOp,
    op_kind,
)
from ..state.common import jsonable, swallow, unwrap
from ..state.identity import User
from ..state.runs import Applied, RunExtra, with_mean_loss
from ..worker_api import WorkerAPI
from .context import Context
from .saving import Saving

__all__ = ["Training"]

log = logging.getLogger("twinkle.server")


class Training:
    def __init__(self, ctx: Context, saving: Saving):
        self.ctx = ctx
        self.saving = saving

    async def submit(self, user: User, run_id: str, op: Op, *, seq_id: int | None = None) -> FutureRef:
        """Queue a training op on the run's worker. Validation errors raise here (before a future exists)."""
        ctx = self.ctx
        run = ctx.runs.get_active(user, run_id)
        if seq_id is not None and (isinstance(seq_id, bool) or not isinstance(seq_id, int) or seq_id < 0):
            raise InvalidInputError("seq_id must be a non-negative integer", field="seq_id")
        extra = ctx.runs.extra[run.run_id]
        worker = ctx.worker(run.base_model, extra.replica)
        sess = ctx.sessions.by_id.get(run.session_id)
        if sess is not None:
            ctx.sessions.touch(sess, persist=False)  # training traffic keeps the lease alive too
        if seq_id is not None:
            hit = ctx.runs.seen(run, seq_id, op_kind(op))
            if hit is not None:
                return ctx.with_stop(self._replay(user, hit), sess)
        self._admit(run, extra)
        replay = seq_id is not None and run.last_seq_id is not None and seq_id <= run.last_seq_id
        if seq_id is not None and not replay:
            run.last_seq_id = seq_id
        try:
            ctx.check_rollback(run)
            typ, go = self._prepare(user, run, worker, op, seq_id, replay=replay)
        except TwinkleError:
            # refused here: tell the worker the seq_id is consumed, so the run's next ops do not wait for it
            self._skip_on_worker(worker, run.run_id, seq_id)
            raise
        ref, task = ctx.spawn_task(user, typ, run.run_id, ctx.guard(run, go), after=extra.ready)
        extra.inflight += 1
        extra.inflight_kinds[typ] += 1

        def _done(_t: Any) -> None:
            extra.inflight -= 1
            extra.inflight_kinds[typ] -= 1

        task.add_done_callback(_done)
        if seq_id is not None:
            ctx.runs.remember(run, seq_id, Applied(typ, ref, task))
        return ctx.with_stop(ref, sess)

    def _admit(self, run: RunInfo, extra: RunExtra) -> None:
        """Back-pressure at submit: a run with ``max_pending_per_adapter`` ops in flight gets an HTTP 429 with
        Retry-After before its seq_id is consumed (the Tinker SDK retries it with backoff), not a failed future
        from the worker's queue (which the SDK never retries: a batch split into many chunks would fail for its
        size). The worker keeps its own check as the last line; it never fires for ops admitted here."""
        m = self.ctx.config.model(run.base_model)
        limit = m.scheduler.max_pending_per_adapter if m is not None else None
        if limit is not None and extra.inflight >= limit:
            kinds = ", ".join(f"{n} {k}" for k, n in extra.inflight_kinds.most_common() if n > 0)
            raise CapacityError(f"too many requests in flight for this run ({extra.inflight}: {kinds}; at most "
                                f"{limit}, scheduler.max_pending_per_adapter); retry shortly", retry_after=1.0)

    def _replay(self, user: User, hit: Applied) -> FutureRef:
        """A repeated seq_id: the first call's future (or, once that result left memory, a new future that
        gives the same outcome). Nothing is executed or counted again."""
        if hit.ref.future_id in self.ctx.futures.by_id:
            return hit.ref
        task = hit.task

        async def _same() -> Any:
            return await asyncio.shield(task)

        return self.ctx.spawn(user, hit.kind, hit.ref.run_id, _same())

    def skip_seq(self, user: User, run_id: str, seq_id: int | None) -> None:
        """A front door refused a request of ``run_id`` carrying ``seq_id`` before calling :meth:`submit`
        (e.g. a body that failed validation): mark the seq_id consumed so the run's later ops do not wait for
        it. Unknown/foreign runs and bad seq ids are ignored."""
        if seq_id is None or isinstance(seq_id, bool) or not isinstance(seq_id, int) or seq_id < 0:
            return
        run = self.ctx.runs.by_id.get(run_id) if isinstance(run_id, str) else None
        if run is None or run.user != user.name or run.state != "active":
            return
        if seq_id > (run.last_seq_id or 0):
            run.last_seq_id = seq_id
        self._skip_on_worker(self.ctx.worker(run.base_model, self.ctx.runs.replica(run)), run.run_id, seq_id)

    def _skip_on_worker(self, worker: WorkerAPI, run_id: str, seq_id: int | None) -> None:
        skip = getattr(worker, "skip", None)
        if seq_id is None or skip is None:
            return

        async def _go() -> None:
            try:
                await skip(run_id, seq_id)
            except Exception as e:  # the worker lost the adapter: nothing waits for the seq_id then
                log.info("skip(%s, %s): %s", run_id, seq_id, unwrap(e))

        asyncio.get_running_loop().create_task(_go()).add_done_callback(swallow)

    def _prepare(
        self, user: User, run: RunInfo, worker: WorkerAPI, op: Op, seq_id: int | None, *, replay: bool = False,
    ) -> tuple[str, Callable[[], Coroutine[Any, Any, Any]]]:
        """Validate ``op`` for ``run``; returns ``(future type, coroutine function that executes it)``. ``replay``: the
        seq_id was seen before (a client retry), so checks of state the first execution changed are left to the
        worker, which answers a repeated seq_id from its first execution."""
        ctx = self.ctx
        m = ctx.model_cfg(run.base_model)
        runs = ctx.runs
        extra = runs.extra[run.run_id]
        if isinstance(op, ForwardBackwardOp):
            if not op.data:
                raise InvalidInputError("data must hold at least one datum", field="data")
            check_image_data(op.data, ctx.model_info.get(m.served_name), m.served_name)
            n_tokens = sum(d.model_input.length for d in op.data)
            ctx.check_tokens(m, n_tokens, "data")
            typ = "forward" if op.forward_only else "forward_backward"
            weight = loss_weight_and_tokens(op.data)[0]

            async def _go() -> Any:
                out = await worker.execute(run.run_id, op, seq_id=seq_id)
                if not isinstance(out, ForwardBackwardOutput):
                    out = ForwardBackwardOutput.model_validate(out)
                if not replay:  # a replayed seq_id was answered from its first execution: metered then
                    if op.forward_only:
                        ctx.meter(user.name, run.base_model, prefilled=n_tokens)
                    else:
                        ctx.meter(user.name, run.base_model, trained=n_tokens)
                if not op.forward_only:
                    extra.dirty = True
                    runs.record(run, typ, with_mean_loss(out.metrics, weight))
                return out
            return typ, _go
        if isinstance(op, OptimStepOp):
            async def _step() -> Any:
                out = await worker.execute(run.run_id, op, seq_id=seq_id)
                if isinstance(out, dict):
                    out = OptimStepResponse(metrics=out.get("metrics", out))
                elif not isinstance(out, OptimStepResponse):
                    out = OptimStepResponse.model_validate(out)
                run.step += 1
                extra.dirty = True
                runs.record(run, "optim_step", out.metrics)
                return out
            return "optim_step", _step
        if isinstance(op, SaveOp):
            return "save", self.saving.prepare_save(run, worker, op, seq_id, replay=replay)
        if isinstance(op, LoadOp):
            return "load", self.saving.prepare_load(user, run, worker, op, seq_id)
        if isinstance(op, (SetOptimizerOp, SetSchedulerOp)):
            async def _set() -> Any:
                out = await worker.execute(run.run_id, op, seq_id=seq_id)
                return jsonable(out) if out is not None else {"run_id": run.run_id}
            return op.type, _set
        raise InvalidInputError(f"unknown operation {getattr(op, 'type', op)!r}", field="type")
