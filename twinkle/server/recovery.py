"""Bringing runs back after a fault: a worker replica that restarted (Ray Serve replaces a killed replica,
empty) or a gateway that restarted (the previous process's workers are gone).

A run whose adapter vanished is reloaded **in place** (same run id, same replica index) from its latest
training checkpoint (``RunInfo.last_checkpoint``: the user's own saves and the automatic ones taken when a
lease lapses or a session closes), with the optimizer state, and its step counter is set back to that
checkpoint's step. Work applied after that checkpoint is gone with the replica's memory: when there was any
(the run is *dirty*), the next call on the run fails once with a :class:`~twinkle.types.StateLostError` that
names the checkpoint and the step the run continues from, so a client never trains on rolled-back weights
without knowing. A run without a checkpoint (or whose reload fails) becomes ``lost``; its error says so.

Detection is lazy (no polling of idle replicas): a call whose adapter is missing on its worker, or whose
worker call failed with a non-Twinkle error (Ray's actor-died errors), makes the gateway ask that replica
which adapters it holds; every active run of the replica that it no longer holds is reloaded. At gateway
start, runs that were active when the previous process died are reloaded the same way.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any, Protocol

from twinkle.types import NotFoundError, StateLostError, TwinkleError
from twinkle.types.api import RunInfo

from .ops import LoadOp
from .state.checkpoints import Checkpoints, Ckpt, parse_checkpoint_path
from .state.common import swallow, unwrap
from .state.identity import Sessions
from .state.runs import Runs
from .worker_api import WorkerAPI

log = logging.getLogger("twinkle.server")


def adapter_missing(err: BaseException) -> bool:
    """The worker answered that it does not hold the adapter (its replica restarted since)."""
    return isinstance(err, NotFoundError) and "not loaded" in err.message


def worker_failed(err: BaseException) -> bool:
    """The call failed in a way that may mean the replica died or restarted."""
    return adapter_missing(err) or not isinstance(err, TwinkleError)


class RecoveryHost(Protocol):
    """What recovery needs of the gateway service (``gateway.context.Context`` is one); a protocol, so that this
    module does not import the context that imports it."""

    workers: dict[str, list[WorkerAPI]]
    sessions: Sessions
    runs: Runs
    checkpoints: Checkpoints

    def worker(self, base_model: str, replica: int) -> WorkerAPI: ...


class Recovery:
    def __init__(self, service: RecoveryHost):
        self.svc = service
        self._checks: dict[tuple[str, int], asyncio.Task[Any]] = {}  # (model, replica) -> a running check

    def stop(self) -> None:
        """Shutdown: stop the replica checks still running (reloads are the runs' ``ready`` tasks)."""
        for t in self._checks.values():
            t.cancel()
        self._checks.clear()

    # ---- messages ------------------------------------------------------------------------------------------
    def _checkpoint(self, run: RunInfo) -> Ckpt | None:
        if not run.last_checkpoint:
            return None
        try:
            ck = self.svc.checkpoints.by_key.get(parse_checkpoint_path(run.last_checkpoint))
        except TwinkleError:
            return None
        return ck if ck is not None and Path(ck.dir).exists() else None

    def rollback_message(self, run: RunInfo, why: str, ck: Ckpt) -> str:
        return (
            f"run {run.run_id!r}: {why}; it was reloaded from checkpoint {ck.info.path} (step {ck.info.step}); "
            f"the work applied after that checkpoint (the run was at step {run.step}) is lost. The run continues "
            f"from step {ck.info.step}: redo the lost steps, then carry on"
        )

    # ---- detection -----------------------------------------------------------------------------------------
    async def on_failure(self, run: RunInfo, err: BaseException) -> bool:
        """A worker call on ``run`` failed with ``err``. When the failure may be a replica restart, check the
        replica (reloading the runs it lost). Returns True when the call should simply run again (its adapter
        was reloaded and nothing was lost); raises ``StateLostError`` when the run was rolled back or lost;
        returns False to keep ``err``."""
        err = unwrap(err)
        if not worker_failed(err) or self.svc.runs.extra[run.run_id].unloading:
            return False
        check = self.check_replica(run.base_model, self.svc.runs.replica(run))
        if not adapter_missing(err):
            return False
        await asyncio.shield(check)
        extra = self.svc.runs.extra[run.run_id]
        if extra.ready is not None:
            try:
                await asyncio.shield(extra.ready)
            except Exception:
                pass
        if run.state == "lost":
            self.svc.runs.get_active_or_raise(run)
        notice = self.take_rollback(run)
        if notice is not None:
            raise StateLostError(notice, field="run_id")
        return run.state == "active"

    def take_rollback(self, run: RunInfo) -> str | None:
        """The one-time notice of a rolled-back run (cleared once given)."""
        extra = self.svc.runs.extra[run.run_id]
        msg, extra.rollback = extra.rollback, None
        return msg

    def check_replica(self, base_model: str, replica: int) -> asyncio.Task[Any]:
        """Ask the replica which adapters it holds and reload the active runs it lost (one check at a time
        per replica: concurrent failures share it)."""
        key = (base_model, replica % len(self.svc.workers[base_model]))
        t = self._checks.get(key)
        if t is not None and not t.done():
            return t
        task = asyncio.get_running_loop().create_task(self._check(*key))
        task.add_done_callback(swallow)
        self._checks[key] = task
        return task

    async def _check(self, base_model: str, replica: int) -> None:
        svc = self.svc
        worker = svc.worker(base_model, replica)
        n = len(svc.workers[base_model])
        try:
            st: Any = await worker.status()  # waits for a restarting replica (the handle queues the call)
            held = set((st.model_dump() if hasattr(st, "model_dump") else dict(st or {})).get("adapter_ids") or ())
        except Exception as e:
            log.warning("replica %s[%d] did not answer a status call: %s", base_model, replica, unwrap(e))
            return
        for run in svc.runs.active_runs():
            extra = svc.runs.extra[run.run_id]
            if run.base_model != base_model or extra.replica % n != replica % n or run.run_id in held:
                continue
            if extra.unloading or (extra.ready is not None and not extra.ready.done()):
                continue  # being removed on purpose, or being created (or reloaded) right now
            self.reload(run, "its worker replica restarted and lost the adapter")

    # ---- reload --------------------------------------------------------------------------------------------
    def reload(self, run: RunInfo, why: str) -> None:
        """Reload ``run`` in place from its latest checkpoint (in the background; the run's calls wait for it),
        or mark it lost when it has none."""
        svc = self.svc
        extra = svc.runs.extra[run.run_id]
        ck = self._checkpoint(run)
        if ck is None:
            self._lose(run, f"{why}, and it has no checkpoint to reload from")
            return
        rolled_back = extra.dirty or run.step != ck.info.step
        if rolled_back:
            extra.rollback = self.rollback_message(run, why, ck)
        log.warning("run %s: %s; reloading it from %s", run.run_id, why, ck.info.path)
        worker = svc.worker(run.base_model, extra.replica)
        # the worker's seq_id sequence continues at the first call still in flight (it is run again after the
        # reload), else after the last one the run consumed
        in_flight = [seq for seq, a in extra.applied.items() if not a.task.done()]
        next_seq = min(in_flight) if in_flight else (run.last_seq_id + 1 if run.last_seq_id is not None else None)

        async def _go() -> RunInfo:
            try:
                try:
                    await worker.remove_adapter(run.run_id)  # a half-created leftover, if any
                except Exception:
                    pass
                await worker.create_adapter(run.run_id, run.lora, next_seq_id=next_seq)
                await worker.execute(run.run_id, LoadOp(checkpoint=ck.info.path, optimizer=True), path=ck.dir)
            except BaseException as e:
                extra.rollback = None
                self._lose(run, f"{why}, and reloading it from {ck.info.path} failed ({unwrap(e)})")
                raise
            run.step = ck.info.step
            extra.dirty = False
            if rolled_back:
                extra.applied.clear()  # results from before the rollback must not answer retries
            run.metadata = {**run.metadata, "recovered_from": ck.info.path}
            svc.runs.save(run)
            return run.model_copy(deep=True)

        task = asyncio.get_running_loop().create_task(_go())
        task.add_done_callback(swallow)
        extra.ready = task

    def _lose(self, run: RunInfo, reason: str) -> None:
        log.warning("run %s is lost: %s", run.run_id, reason)
        self.svc.runs.set_state(run, "lost")
        run.metadata = {**run.metadata, "lost_reason": reason}
        self.svc.runs.save(run)

    def restore_after_restart(self, runs: list[RunInfo], now: float) -> None:
        """Runs that were active when the previous gateway process died (now ``lost``): reload those whose
        session is still within its lease and that have a checkpoint; the others keep ``lost`` with a reason
        (their error names the checkpoint to resume from)."""
        svc = self.svc
        for run in runs:
            s = svc.sessions.by_id.get(run.session_id)
            live = s is not None and s.state == "active" and now - s.last_heartbeat <= s.lease_seconds
            if not live or self._checkpoint(run) is None:
                why = "the server restarted while the run was loaded"
                if live:
                    why += ", and the run has no checkpoint to reload from"
                run.metadata = {**run.metadata, "lost_reason": why}
                svc.runs.save(run)
                continue
            svc.runs.set_state(run, "active")
            self.reload(run, "the server restarted")
