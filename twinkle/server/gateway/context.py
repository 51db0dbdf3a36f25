"""What every part of the gateway service shares: the config, the model workers, the state registries, and the
helpers that cross them (which worker serves a run, a model's limits, spawning a future for queued work,
usage metering, retrying a call after its replica restarted)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from twinkle.types import InvalidInputError, LimitExceededError, ModelInfo, StateLostError
from twinkle.types.api import FutureRef, RunInfo, SessionInfo

from ..config import ModelConfig, ServerConfig
from ..recovery import Recovery
from ..state.checkpoints import Checkpoints
from ..state.common import now as _now
from ..state.common import swallow
from ..state.futures import Futures
from ..state.identity import Identity, Sessions, User
from ..state.runs import Runs
from ..state.samplers import Samplers
from ..store import Store
from ..telemetry.usage import Usage
from ..worker_api import WorkerAPI

__all__ = ["Context"]

log = logging.getLogger("twinkle.server")


class Context:
    """The gateway's shared state. ``workers`` maps a served base-model name to its replicas' workers."""

    def __init__(self, config: ServerConfig, workers: dict[str, list[WorkerAPI]], store: Store | None = None):
        self.config = config
        self.workers = workers
        for m in config.models:
            if m.served_name not in workers or not workers[m.served_name]:
                raise InvalidInputError(f"no worker for model {m.served_name!r}", field="workers")
        self.store: Store = store or Store(config.persistence.sqlite_file())
        self.checkpoint_root = config.persistence.checkpoint_dir()
        self.started_at = _now()
        self.identity = Identity(self.store)
        self.sessions = Sessions(self.store)
        self.runs = Runs(self.store)
        self.checkpoints = Checkpoints(self.store, self.checkpoint_root)
        self.futures = Futures(self.store, config.persistence.future_ttl_seconds)
        self.samplers = Samplers(self.store)
        self.usage = Usage(self.store)
        self.metrics: Any = None  # telemetry.metrics.GatewayMetrics when telemetry is on
        self.recovery = Recovery(self)
        self.model_info: dict[str, ModelInfo] = {}

    # ---- workers and models --------------------------------------------------------------------------------
    def worker(self, base_model: str, replica: int) -> WorkerAPI:
        reps = self.workers[base_model]
        return reps[replica % len(reps)]

    def model_cfg(self, base_model: str, field: str = "base_model") -> ModelConfig:
        m = self.config.model(base_model) if isinstance(base_model, str) else None
        if m is None:
            names = [x.served_name for x in self.config.models]
            raise InvalidInputError(f"base model {base_model!r} is not served here (served: {names})", field=field)
        return m

    def token_limit(self, base_model: str) -> int:
        """The most tokens one request to ``base_model`` (a served name) may hold."""
        m = self.model_cfg(base_model)
        return int(min(m.max_tokens_per_request, self.config.limits.max_tokens_per_request))

    def check_tokens(self, m: ModelConfig, n: int, field: str) -> None:
        limit = self.token_limit(m.served_name)
        if n > limit:
            raise LimitExceededError(f"{n} tokens in one request exceed the limit of {limit}", field=field)

    async def refresh_model_info(self) -> None:
        """Fetch (once) each model's info from its first worker, for ``capabilities``."""
        for m in self.config.models:
            if m.served_name in self.model_info:
                continue
            try:
                info = await self.workers[m.served_name][0].model_info()
                self.model_info[m.served_name] = info if isinstance(info, ModelInfo) else ModelInfo.model_validate(info)
            except Exception:  # a worker still loading: capabilities show what is known
                log.warning("model_info of %s not available yet", m.served_name, exc_info=True)

    # ---- futures -------------------------------------------------------------------------------------------
    def spawn(
        self, user: User, typ: str, run_id: str | None, coro: Coroutine[Any, Any, Any], *,
        after: asyncio.Future[Any] | None = None, ready_for: str | None = None, session_id: str | None = None,
        base_model: str | None = None,
    ) -> FutureRef:
        """Run ``coro`` as the future of a request; ``ready_for``: the task creates (or reloads) that run, whose
        calls wait for it (and which is lost when it fails)."""
        ref, task = self.spawn_task(user, typ, run_id, coro, after=after, session_id=session_id,
                                    base_model=base_model)
        if ready_for is not None:
            self.runs.extra[ready_for].ready = task
            task.add_done_callback(lambda t: self._on_ready(ready_for, t))
        return ref

    def spawn_task(
        self, user: User, typ: str, run_id: str | None, coro: Coroutine[Any, Any, Any], *,
        after: asyncio.Future[Any] | None = None, session_id: str | None = None, base_model: str | None = None,
    ) -> tuple[FutureRef, asyncio.Task[Any]]:
        if self.metrics is not None:
            if base_model is None:
                run = self.runs.by_id.get(run_id) if run_id is not None else None
                base_model = run.base_model if run is not None else ""
            coro = self.metrics.track(typ, base_model, coro, {
                "enduser.id": user.name, "twinkle.run_id": run_id,
                "twinkle.session_id": session_id or (run_id.split(":", 1)[0] if run_id else None)})
        ref, task = self.futures.spawn(user.name, typ, run_id, coro, after=after, session_id=session_id)
        task.add_done_callback(swallow)
        return ref, task

    def _on_ready(self, run_id: str, task: asyncio.Task[Any]) -> None:
        swallow(task)
        if task.cancelled() or task.exception() is not None:
            run = self.runs.by_id.get(run_id)
            if run is not None and run.state == "active":
                self.runs.set_state(run, "lost")
                self.runs.save(run)

    @staticmethod
    def with_stop(ref: FutureRef, sess: SessionInfo | None) -> FutureRef:
        """A pending stop request of the run's session rides on the reply (see ``Service.request_stop``)."""
        if sess is not None and sess.stop_requested_at is not None:
            return ref.model_copy(update={"stop_requested": True})
        return ref

    # ---- a run's worker calls ------------------------------------------------------------------------------
    def check_rollback(self, run: RunInfo) -> None:
        msg = self.recovery.take_rollback(run)
        if msg is not None:
            raise StateLostError(msg, field="run_id")

    async def guard(self, run: RunInfo, fn: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
        """Run a worker call of ``run``. When its adapter turns out missing (the replica restarted), the run is
        reloaded from its checkpoint and the call runs again if nothing was lost; otherwise it fails with what
        happened to the run (which checkpoint, which step), not with the worker's "adapter not loaded"."""
        try:
            return await fn()
        except Exception as e:
            if not await self.recovery.on_failure(run, e):
                raise
        return await fn()

    # ---- usage ---------------------------------------------------------------------------------------------
    def touch_session(self, session_id: str | None) -> None:
        """Traffic of a session's own work proves its client alive: extend the lease (as a heartbeat would). A
        client busy for minutes sampling, whose heartbeats time out on a loaded machine, keeps its session."""
        s = self.sessions.by_id.get(session_id) if session_id else None
        if s is not None:
            self.sessions.touch(s, persist=False)

    def meter(self, user: str, base_model: str, *, trained: int = 0, prefilled: int = 0, sampled: int = 0) -> None:
        """Account tokens to ``user`` (the usage ledger, and the token counters when telemetry is on)."""
        self.usage.add(user, base_model, trained=trained, prefilled=prefilled, sampled=sampled)
        if self.metrics is not None:
            self.metrics.usage(user, base_model, trained, prefilled, sampled)
