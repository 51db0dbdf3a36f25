"""The gateway's service layer: everything the HTTP routes (native and Tinker) call.

Routes stay thin: parse → ``Service`` → serialise. Both the native routes (``twinkle.server.routes_native``)
and the Tinker routes (``twinkle.server.tinker``) use ONLY the public methods below, so the two front doors
share sessions, runs and checkpoints.

``Service`` is a facade over the state registries of :mod:`twinkle.server.state` (identity and sessions,
runs, checkpoints, futures, samplers); it holds the work that crosses them (a lapsed lease checkpoints and
unloads the session's runs; a training op validates against the run, runs on its worker and updates the
run's step and metrics) and talks to model workers through :class:`~twinkle.server.worker_api.WorkerAPI`.

Ids: a session id is an opaque string without ``/`` or ``:``; a run id (= Tinker model id) is
``{session_id}:train:{n}``; a sampler id is ``{session_id}:sample:{n}``; a checkpoint path is
``tinker://{run_id}/{weights|sampler_weights}/{name}``.

Future results are Python objects (``ForwardBackwardOutput``, ``OptimStepResponse``, ``CheckpointInfo``,
``RunInfo``, ``SampleResponse``, ``dict``); each front door serialises them (JSON or protobuf).

Sessions are leases: a reaper task sleeps until the next deadline (a lease, a checkpoint TTL, a result TTL;
at most ``_REAP_MAX_SLEEP_S``), expires sessions whose lease lapsed, checkpoints their runs
(``auto-<timestamp>``, kind training) and unloads them (run state → ``unloaded``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import secrets
import time
from collections.abc import Callable, Coroutine
from typing import Any, NamedTuple

from twinkle.data.convert import loss_weight_and_tokens
from twinkle.loss import describe_losses
from twinkle.model.images import check_image_data, expand_prompt
from twinkle.types import (
    CapacityError,
    ForbiddenError,
    ForwardBackwardOutput,
    InvalidInputError,
    LimitExceededError,
    LoraConfig,
    ModelInfo,
    NotFoundError,
    OptimStepResponse,
    SampleResponse,
    StateLostError,
    TwinkleError,
)
from twinkle.types.api import (
    BaseModelInfo,
    Capabilities,
    CheckpointInfo,
    FutureRef,
    FutureState,
    MetricHistory,
    RunInfo,
    ServerStatus,
    SessionInfo,
    WorkerStatus,
)

from .ops import (
    ForwardBackwardOp,
    LoadOp,
    Op,
    OptimStepOp,
    SampleOp,
    SaveOp,
    SetOptimizerOp,
    SetSchedulerOp,
    op_kind,
)
from .recovery import Recovery
from .state.checkpoints import Checkpoints, Ckpt, parse_checkpoint_path
from .state.common import jsonable, swallow, unwrap, validate_checkpoint_name, validate_user_name
from .state.common import now as _now
from .state.futures import Futures
from .state.identity import Identity, Sessions, User
from .state.runs import Applied, Runs, with_mean_loss
from .state.samplers import Samplers
from .telemetry.usage import Usage
from .worker_api import WorkerAPI

__all__ = [
    "Service", "User", "WorkerAPI", "parse_checkpoint_path", "validate_checkpoint_name", "validate_user_name",
]

log = logging.getLogger("twinkle.server")

_VERSION = "0.1.0"
_REAP_MAX_SLEEP_S = 30.0  # the reaper wakes at least this often (and at each deadline + _REAP_SLACK_S)
_REAP_SLACK_S = 0.5  # wake this long after a deadline, so one tick handles it

# Kept importable under its old name (``app`` imports ``_unwrap``).
_unwrap = unwrap



class SampleTarget(NamedTuple):
    """What a sample request samples with (``Service.sample_target``)."""

    worker: Any
    adapter_id: str | None
    checkpoint_dir: str | None
    after: Any  # an awaitable to wait for first (the run's adapter being ready), or None
    run: Any
    run_id: str | None
    session_id: str | None
    base_model: str = ""  # the served model name (usage metering)


class Service:
    """The gateway service. ``workers`` maps a served base-model name to its replicas' workers."""

    def __init__(self, config: Any, workers: dict[str, list[WorkerAPI]], store: Any | None = None):
        from .config import ServerConfig
        from .store import Store

        self.config: ServerConfig = config
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
        self._lost_at_start: list[RunInfo] = []
        self._model_info: dict[str, ModelInfo] = {}
        self._reaper: asyncio.Task[Any] | None = None
        self._kick: asyncio.Event | None = None
        self._closing = False
        self._load_state()

    # Read-only views of the registries' maps (tests and benchmarks poke at them).
    @property
    def _sessions(self) -> dict[str, SessionInfo]:
        return self.sessions.by_id

    @property
    def _runs(self) -> dict[str, RunInfo]:
        return self.runs.by_id

    @property
    def _ckpts(self) -> dict[tuple[str, str, str], Ckpt]:
        return self.checkpoints.by_key

    @property
    def _futures(self) -> dict[str, Any]:
        return self.futures.by_id

    @property
    def _auth_cache(self) -> dict[str, Any]:
        return self.identity.cache

    # ---- lifecycle ---------------------------------------------------------------------------------------
    def _load_state(self) -> None:
        # Tens of thousands of long-lived rows: without the cyclic GC running over them while they are built
        # (quadratic), then moved out of its way (``gc.freeze``) so later collections do not scan them.
        enabled = gc.isenabled()
        gc.disable()
        try:
            self.sessions.load()
            self._lost_at_start = self.runs.load()
            self.checkpoints.load()
            self.samplers.load()
        finally:
            if enabled:
                gc.enable()
            gc.freeze()

    async def start(self) -> None:
        """Start the lease reaper, reload the runs the previous process had loaded (in the background) and
        fetch each model's info (idempotent)."""
        self._ensure_reaper()
        lost, self._lost_at_start = self._lost_at_start, []
        if lost:
            self.recovery.restore_after_restart(lost, _now())
        await self._refresh_model_info()

    async def stop(self) -> None:
        self._closing = True
        self.usage.flush()
        if self._reaper is not None:
            self._reaper.cancel()
            try:
                await self._reaper
            except (asyncio.CancelledError, Exception):
                pass
            self._reaper = None
        self.recovery.stop()

    def _ensure_reaper(self) -> None:
        if self._reaper is None or self._reaper.done():
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            self._kick = self.sessions.kick = self.checkpoints.kick = asyncio.Event()
            self._reaper = loop.create_task(self._reap_loop())

    async def refresh_model_info(self) -> None:
        """Fetch (once) each model's info from its first worker, for ``capabilities``."""
        await self._refresh_model_info()

    async def _refresh_model_info(self) -> None:
        for m in self.config.models:
            if m.served_name in self._model_info:
                continue
            try:
                info = await self.workers[m.served_name][0].model_info()
                self._model_info[m.served_name] = info if isinstance(info, ModelInfo) else ModelInfo.model_validate(info)
            except Exception:  # a worker still loading: capabilities show what is known
                log.warning("model_info of %s not available yet", m.served_name, exc_info=True)

    # ---- auth --------------------------------------------------------------------------------------------
    def add_bootstrap_key(self, key: str, user: str) -> None:
        """Accept ``key`` (not stored) as an admin key of ``user`` for this process's lifetime."""
        self.identity.add_bootstrap_key(key, user)

    def authenticate(self, api_key: str | None) -> User:
        """Raise ``AuthenticationError`` for a missing/unknown/revoked key."""
        return self.identity.authenticate(api_key)

    # ---- sessions ----------------------------------------------------------------------------------------
    async def create_session(
        self, user: User, *, client: str = "twinkle", metadata: dict[str, Any] | None = None,
        tags: list[str] | None = None, lease_seconds: float | None = None,
    ) -> SessionInfo:
        self._ensure_reaper()
        s = self.sessions.create(
            user, client=client, metadata=metadata, tags=tags, lease_seconds=lease_seconds,
            default_lease=self.config.lease_seconds, max_lease=self.config.max_lease_seconds,
        )
        return s.model_copy(deep=True)

    async def heartbeat(self, user: User, session_id: str) -> SessionInfo:
        """Extend the lease. ``GoneError`` once the session expired or closed."""
        self._ensure_reaper()
        s = self.sessions.get_active(user, session_id)
        self.sessions.touch(s)
        return s.model_copy(deep=True)

    async def get_session(self, user: User, session_id: str) -> SessionInfo:
        """Re-attach: a session still within its lease is extended by this call."""
        self._ensure_reaper()
        s = self.sessions.get(user, session_id)
        self.sessions.touch(s)
        return s.model_copy(deep=True)

    async def request_stop(self, user: User, session_id: str) -> SessionInfo:
        """Ask the session's training loop to stop at its next step boundary: the flag rides on the replies of
        the session's training calls (``FutureRef.stop_requested``) until the client clears it."""
        s = self.sessions.get_active(user, session_id)
        s.stop_requested_at = _now()
        self.sessions.save(s)
        return s.model_copy(deep=True)

    async def clear_stop(self, user: User, session_id: str) -> SessionInfo:
        s = self.sessions.get(user, session_id)
        if s.stop_requested_at is not None:
            s.stop_requested_at = None
            self.sessions.save(s)
        return s.model_copy(deep=True)

    async def list_sessions(self, user: User) -> list[SessionInfo]:
        return [s.model_copy(deep=True) for s in self.sessions.list(user)]

    async def close_session(self, user: User, session_id: str, reason: str = "closed") -> SessionInfo:
        """Checkpoint (auto) and unload the session's adapters; state → closed."""
        s = self.sessions.get(user, session_id)
        if s.state == "active":
            await self._end_session(s, "closed", reason)
        return s.model_copy(deep=True)

    async def _end_session(self, s: SessionInfo, state: str, reason: str) -> None:
        self.sessions.end(s, state, reason)
        n = self.futures.cancel_session(s.session_id, f"session {s.session_id} ended ({reason})")
        if n:
            log.info("session %s (%s): cancelled %d queued sampling requests", s.session_id, reason, n)
        for run_id in list(s.run_ids):
            run = self.runs.by_id.get(run_id)
            if run is not None and run.state == "active":
                await self._unload_run(run, checkpoint=True)

    async def _unload_run(self, run: RunInfo, *, checkpoint: bool, new_state: str = "unloaded") -> None:
        extra = self.runs.extra[run.run_id]
        extra.unloading = True
        if extra.ready is not None:
            try:
                await asyncio.shield(extra.ready)
            except Exception:
                pass
        worker = self._worker(run.base_model, extra.replica)
        if checkpoint and run.state == "active":
            name = time.strftime("auto-%Y%m%d-%H%M%S", time.gmtime()) + f"-{secrets.token_hex(2)}"
            try:
                await self._do_save(run, worker, SaveOp(name=name, kind="training"), None)
            except Exception:
                log.exception("automatic checkpoint of %s failed", run.run_id)
        try:
            await worker.remove_adapter(run.run_id)
        except Exception as e:  # already gone on the worker: nothing to free
            log.info("remove_adapter(%s): %s", run.run_id, unwrap(e))
        self.runs.set_state(run, new_state)
        self.runs.save(run)

    async def _reap_loop(self) -> None:
        """Sleeps until the next lease/TTL deadline (at most ``_REAP_MAX_SLEEP_S``; a new session or TTL wakes
        it early), so an idle server does not tick."""
        while not self._closing:
            try:
                await self.reap()
            except Exception:
                log.exception("lease reaper tick failed")
            delay = max(0.05, min(_REAP_MAX_SLEEP_S, self._next_deadline() - _now()))
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
        times = [self.futures.next_deadline(_REAP_SLACK_S)]
        for t in (self.sessions.next_deadline(), self.checkpoints.next_deadline()):
            if t is not None:
                times.append(t + _REAP_SLACK_S)
        return min(times)

    async def reap(self, now: float | None = None) -> None:
        """One reaper tick: expire lapsed sessions (checkpoint + unload), drop old futures and checkpoints.
        Work is proportional to what expires, not to the number of stored sessions/runs/checkpoints."""
        t = now or _now()
        for s in self.sessions.lapsed(t):
            log.info("session %s of %s: lease lapsed, unloading its adapters", s.session_id, s.user)
            await self._end_session(s, "expired", "lease expired")
        self.futures.expire(t)
        self.checkpoints.expire(t)

    # ---- runs --------------------------------------------------------------------------------------------
    def _worker(self, base_model: str, replica: int) -> WorkerAPI:
        reps = self.workers[base_model]
        return reps[replica % len(reps)]

    def _model_cfg(self, base_model: str, field: str = "base_model") -> Any:
        m = self.config.model(base_model) if isinstance(base_model, str) else None
        if m is None:
            names = [x.served_name for x in self.config.models]
            raise InvalidInputError(f"base model {base_model!r} is not served here (served: {names})", field=field)
        return m

    def _new_run(
        self, user: User, s: SessionInfo, run_id: str, base_model: str, lora: LoraConfig, replica: int,
        name: str | None, metadata: dict[str, Any] | None,
    ) -> RunInfo:
        s.run_ids.append(run_id)
        s.last_heartbeat = _now()
        self.sessions.save(s)
        return self.runs.new(user, s, run_id, base_model, lora, replica, name, metadata)

    def _spawn(
        self, user: User, typ: str, run_id: str | None, coro: Coroutine[Any, Any, Any], *,
        after: asyncio.Future[Any] | None = None, ready_for: str | None = None, session_id: str | None = None,
        base_model: str | None = None,
    ) -> FutureRef:
        ref, task = self._spawn_task(user, typ, run_id, coro, after=after, session_id=session_id,
                                     base_model=base_model)
        if ready_for is not None:
            self.runs.extra[ready_for].ready = task
            task.add_done_callback(lambda t: self._on_ready(ready_for, t))
        return ref

    def _spawn_task(
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

    async def create_run(
        self, user: User, *, session_id: str, base_model: str, lora: LoraConfig,
        run_id: str | None = None, name: str | None = None, metadata: dict[str, Any] | None = None,
    ) -> FutureRef:
        """Place a new adapter on a worker replica. ``run_id`` given (Tinker: ``{sid}:train:{n}``) makes the
        call idempotent: the same id for the same user returns the existing run's future. Result: RunInfo."""
        self._ensure_reaper()
        s = self.sessions.get_active(user, session_id)
        m = self._model_cfg(base_model)
        rid, existing = self.runs.claim_id(user, s, run_id)
        if existing is not None:
            return await self._existing_run_future(user, existing)
        replica = self.runs.place(user, m, lora, self.config.limits.max_adapters_per_user)
        run = self._new_run(user, s, rid, m.served_name, lora, replica, name, metadata)
        worker = self._worker(m.served_name, replica)

        async def _go() -> RunInfo:
            await worker.create_adapter(rid, lora)
            return run.model_copy(deep=True)

        return self._spawn(user, "create_run", rid, _go(), ready_for=rid)

    async def _existing_run_future(self, user: User, run: RunInfo) -> FutureRef:
        ready = self.runs.extra[run.run_id].ready
        if ready is not None and not ready.done():
            async def _wait() -> RunInfo:
                await asyncio.shield(ready)
                return run.model_copy(deep=True)
            return self._spawn(user, "create_run", run.run_id, _wait())
        return self.futures.completed(user.name, "create_run", run.run_id, run.model_copy(deep=True))

    async def get_run(self, user: User, run_id: str) -> RunInfo:
        return self.runs.get(user, run_id).model_copy(deep=True)

    async def list_runs(self, user: User, *, limit: int = 100, offset: int = 0) -> tuple[list[RunInfo], int]:
        page, total = self.runs.list(user, limit=limit, offset=offset)
        return [r.model_copy(deep=True) for r in page], total

    async def delete_run(self, user: User, run_id: str) -> RunInfo:
        run = self.runs.get(user, run_id)
        if run.state == "active":
            await self._unload_run(run, checkpoint=False, new_state="deleted")
        else:
            self.runs.set_state(run, "deleted")
            self.runs.save(run)
        return run.model_copy(deep=True)

    async def get_metrics(self, user: User, run_id: str) -> MetricHistory:
        run = self.runs.get(user, run_id)
        return MetricHistory(run_id=run.run_id, points=self.runs.metrics(run))

    def token_limit(self, base_model: str) -> int:
        """The most tokens one request to ``base_model`` (a served name) may hold."""
        m = self._model_cfg(base_model)
        return int(min(m.max_tokens_per_request, self.config.limits.max_tokens_per_request))

    def _check_tokens(self, m: Any, n: int, field: str) -> None:
        limit = self.token_limit(m.served_name)
        if n > limit:
            raise LimitExceededError(f"{n} tokens in one request exceed the limit of {limit}", field=field)

    async def submit(self, user: User, run_id: str, op: Op, *, seq_id: int | None = None) -> FutureRef:
        """Queue a training op on the run's worker. Validation errors raise here (before a future exists)."""
        self._ensure_reaper()
        run = self.runs.get_active(user, run_id)
        if seq_id is not None and (isinstance(seq_id, bool) or not isinstance(seq_id, int) or seq_id < 0):
            raise InvalidInputError("seq_id must be a non-negative integer", field="seq_id")
        extra = self.runs.extra[run.run_id]
        worker = self._worker(run.base_model, extra.replica)
        sess = self.sessions.by_id.get(run.session_id)
        if sess is not None:
            self.sessions.touch(sess, persist=False)  # training traffic keeps the lease alive too
        if seq_id is not None:
            hit = self.runs.seen(run, seq_id, op_kind(op))
            if hit is not None:
                return self._with_stop(self._replay(user, hit), sess)
        self._admit(run, extra)
        replay = seq_id is not None and run.last_seq_id is not None and seq_id <= run.last_seq_id
        if seq_id is not None and not replay:
            run.last_seq_id = seq_id
        try:
            self._check_rollback(run)
            typ, go = self._prepare(user, run, worker, op, seq_id, replay=replay)
        except TwinkleError:
            # refused here: tell the worker the seq_id is consumed, so the run's next ops do not wait for it
            self._skip_on_worker(worker, run.run_id, seq_id)
            raise
        ref, task = self._spawn_task(user, typ, run.run_id, self._guard(run, go), after=extra.ready)
        extra.inflight += 1
        task.add_done_callback(lambda _t: setattr(extra, "inflight", extra.inflight - 1))
        if seq_id is not None:
            self.runs.remember(run, seq_id, Applied(typ, ref, task))
        return self._with_stop(ref, sess)

    def _admit(self, run: RunInfo, extra: Any) -> None:
        """Back-pressure at submit: a run with ``max_pending_per_adapter`` ops in flight gets an HTTP 429 with
        Retry-After before its seq_id is consumed (the Tinker SDK retries it with backoff), not a failed future
        from the worker's queue (which the SDK never retries: a batch split into many chunks would fail for its
        size). The worker keeps its own check as the last line; it never fires for ops admitted here."""
        m = self.config.model(run.base_model)
        limit = m.scheduler.max_pending_per_adapter if m is not None else None
        if limit is not None and extra.inflight >= limit:
            raise CapacityError(f"too many requests in flight for this run ({extra.inflight}); retry shortly",
                                retry_after=1.0)

    @staticmethod
    def _with_stop(ref: FutureRef, sess: SessionInfo | None) -> FutureRef:
        """A pending stop request of the run's session rides on the reply (see ``request_stop``)."""
        if sess is not None and sess.stop_requested_at is not None:
            return ref.model_copy(update={"stop_requested": True})
        return ref

    def _check_rollback(self, run: RunInfo) -> None:
        msg = self.recovery.take_rollback(run)
        if msg is not None:
            raise StateLostError(msg, field="run_id")

    async def _guard(self, run: RunInfo, fn: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
        """Run a worker call of ``run``. When its adapter turns out missing (the replica restarted), the run is
        reloaded from its checkpoint and the call runs again if nothing was lost; otherwise it fails with what
        happened to the run (which checkpoint, which step), not with the worker's "adapter not loaded"."""
        try:
            return await fn()
        except Exception as e:
            if not await self.recovery.on_failure(run, e):
                raise
        return await fn()

    def _replay(self, user: User, hit: Applied) -> FutureRef:
        """A repeated seq_id: the first call's future (or, once that result left memory, a new future that
        gives the same outcome). Nothing is executed or counted again."""
        if hit.ref.future_id in self.futures.by_id:
            return hit.ref
        task = hit.task

        async def _same() -> Any:
            return await asyncio.shield(task)

        return self._spawn(user, hit.kind, hit.ref.run_id, _same())

    async def skip_seq(self, user: User, run_id: str, seq_id: int | None) -> None:
        """A front door refused a request of ``run_id`` carrying ``seq_id`` before calling :meth:`submit`
        (e.g. a body that failed validation): mark the seq_id consumed so the run's later ops do not wait for
        it. Unknown/foreign runs and bad seq ids are ignored."""
        if seq_id is None or isinstance(seq_id, bool) or not isinstance(seq_id, int) or seq_id < 0:
            return
        run = self.runs.by_id.get(run_id) if isinstance(run_id, str) else None
        if run is None or run.user != user.name or run.state != "active":
            return
        if seq_id > (run.last_seq_id or 0):
            run.last_seq_id = seq_id
        self._skip_on_worker(self._worker(run.base_model, self.runs.replica(run)), run.run_id, seq_id)

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
        m = self._model_cfg(run.base_model)
        runs = self.runs
        extra = runs.extra[run.run_id]
        if isinstance(op, ForwardBackwardOp):
            if not op.data:
                raise InvalidInputError("data must hold at least one datum", field="data")
            check_image_data(op.data, self._model_info.get(m.served_name), m.served_name)
            n_tokens = sum(d.model_input.length for d in op.data)
            self._check_tokens(m, n_tokens, "data")
            typ = "forward" if op.forward_only else "forward_backward"
            weight = loss_weight_and_tokens(op.data)[0]

            async def _go() -> Any:
                out = await worker.execute(run.run_id, op, seq_id=seq_id)
                if not isinstance(out, ForwardBackwardOutput):
                    out = ForwardBackwardOutput.model_validate(out)
                if not replay:  # a replayed seq_id was answered from its first execution: metered then
                    if op.forward_only:
                        self.meter(user.name, run.base_model, prefilled=n_tokens)
                    else:
                        self.meter(user.name, run.base_model, trained=n_tokens)
                if not op.forward_only:
                    extra.dirty = True
                    runs.record(run, typ, with_mean_loss(out.metrics, weight))
                return out
        elif isinstance(op, OptimStepOp):
            typ = "optim_step"

            async def _go() -> Any:
                out = await worker.execute(run.run_id, op, seq_id=seq_id)
                if isinstance(out, dict):
                    out = OptimStepResponse(metrics=out.get("metrics", out))
                elif not isinstance(out, OptimStepResponse):
                    out = OptimStepResponse.model_validate(out)
                run.step += 1
                extra.dirty = True
                runs.record(run, typ, out.metrics)
                return out
        elif isinstance(op, SaveOp):
            typ = "save"
            key = Checkpoints.key(run, op)
            if key in self.checkpoints.by_key and not op.overwrite and not replay:
                raise InvalidInputError(
                    f"checkpoint {op.name!r} of run {run.run_id!r} already exists (pass overwrite=true)", field="name"
                )

            async def _go() -> Any:
                return await self._do_save(run, worker, op, seq_id)
        elif isinstance(op, LoadOp):
            typ = "load"
            ck = self.checkpoints.resolve(user, op.checkpoint, run=run)

            async def _go() -> Any:
                await worker.execute(run.run_id, op, seq_id=seq_id, path=ck.dir)
                if op.optimizer:
                    run.step = ck.info.step
                extra.dirty = True
                runs.record(run, "load", {})
                return {"run_id": run.run_id, "path": ck.info.path, "model_id": run.run_id, "step": run.step}
        elif isinstance(op, (SetOptimizerOp, SetSchedulerOp)):
            typ = op.type

            async def _go() -> Any:
                out = await worker.execute(run.run_id, op, seq_id=seq_id)
                return jsonable(out) if out is not None else {"run_id": run.run_id}
        else:
            raise InvalidInputError(f"unknown operation {getattr(op, 'type', op)!r}", field="type")
        return typ, _go

    # ---- checkpoints -------------------------------------------------------------------------------------
    async def _do_save(self, run: RunInfo, worker: WorkerAPI, op: SaveOp, seq_id: int | None) -> CheckpointInfo:
        key = Checkpoints.key(run, op)
        d = self.checkpoints.directory(run, op.kind, op.name)
        if not op.overwrite and key not in self.checkpoints.by_key and d.exists():
            # a directory no checkpoint record points at (left by an old process): replacing it loses nothing
            op = dataclasses.replace(op, overwrite=True)
        # The worker writes into a temporary sibling and renames it into place (replacing the old checkpoint
        # only once the new one is complete), so a failed save never loses an existing checkpoint.
        out = await worker.execute(run.run_id, op, seq_id=seq_id, path=str(d))
        size = out.get("size_bytes") if isinstance(out, dict) else None
        if size is None and d.exists():
            size = sum(p.stat().st_size for p in d.rglob("*") if p.is_file())
        info = self.checkpoints.record(run, op, d, size, run.step)
        if op.kind == "training":
            run.last_checkpoint = info.path
            self.runs.extra[run.run_id].dirty = False
        self.runs.record(run, "save", {})
        return info.model_copy()

    async def resume_run(
        self, user: User, *, session_id: str, checkpoint: str, optimizer: bool = True,
        run_id: str | None = None, metadata: dict[str, Any] | None = None,
    ) -> FutureRef:
        """Create a run from a checkpoint (Tinker create-via-load). Result: RunInfo."""
        self._ensure_reaper()
        s = self.sessions.get_active(user, session_id)
        ck = self.checkpoints.resolve(user, checkpoint)
        src = self.runs.by_id.get(ck.info.run_id)
        lora, base_model = Checkpoints.model_of(ck, src)
        m = self._model_cfg(base_model, field="checkpoint")
        rid, existing = self.runs.claim_id(user, s, run_id)
        if existing is not None:
            return await self._existing_run_future(user, existing)
        replica = self.runs.place(user, m, lora, self.config.limits.max_adapters_per_user)
        md = {**(metadata or {}), "resumed_from": ck.info.path}
        run = self._new_run(user, s, rid, m.served_name, lora, replica, src.name if src else None, md)
        worker = self._worker(m.served_name, replica)
        load = LoadOp(checkpoint=ck.info.path, optimizer=optimizer)

        async def _go() -> RunInfo:
            await worker.create_adapter(rid, lora)
            await worker.execute(rid, load, path=ck.dir)
            if optimizer:
                run.step = ck.info.step
            run.last_checkpoint = ck.info.path if ck.info.kind == "training" else None
            self.runs.save(run)
            return run.model_copy(deep=True)

        return self._spawn(user, "create_run", rid, _go(), ready_for=rid)

    async def list_checkpoints(self, user: User, run_id: str | None = None) -> list[CheckpointInfo]:
        if run_id is not None:
            self.runs.get(user, run_id)
        return self.checkpoints.list(user, run_id)

    async def get_checkpoint(self, user: User, path: str) -> CheckpointInfo:
        """Resolve a ``tinker://`` path the user may read (own, or published)."""
        return self.checkpoints.readable(user, path)

    async def delete_checkpoint(self, user: User, run_id: str, checkpoint_id: str) -> CheckpointInfo:
        key, ck = self.checkpoints.own(user, run_id, checkpoint_id)
        self.checkpoints.drop(key)
        return ck.info.model_copy()

    async def set_checkpoint_ttl(self, user: User, run_id: str, checkpoint_id: str, ttl_seconds: float | None) -> CheckpointInfo:
        key, ck = self.checkpoints.own(user, run_id, checkpoint_id)
        self.checkpoints.set_ttl(key, ck, ttl_seconds)
        return ck.info.model_copy()

    async def set_checkpoint_public(self, user: User, run_id: str, checkpoint_id: str, public: bool) -> CheckpointInfo:
        _, ck = self.checkpoints.own(user, run_id, checkpoint_id)
        ck.info.public = bool(public)
        self.checkpoints.save(ck)
        return ck.info.model_copy()

    # ---- sampling ----------------------------------------------------------------------------------------
    async def create_sampler(
        self, user: User, *, session_id: str, sampler_id: str | None = None,
        base_model: str | None = None, checkpoint: str | None = None, run_id: str | None = None,
    ) -> dict[str, Any]:
        """Register a sampler (base model, a checkpoint path, or a run's live weights).
        Returns ``{"sampler_id", "base_model", "model_path"}``."""
        s = self.sessions.get_active(user, session_id)
        sampler_id, old = self.samplers.claim_id(user, s, sampler_id)
        if old is not None:
            return Samplers.public(old)
        model_path = None
        if checkpoint is not None:
            ck = self.checkpoints.resolve(user, checkpoint)
            _, bm = Checkpoints.model_of(ck, self.runs.by_id.get(ck.info.run_id))
            if base_model is not None and self._model_cfg(base_model).served_name != bm:
                raise InvalidInputError(f"checkpoint {checkpoint!r} belongs to base model {bm!r}", field="base_model")
            base_model, model_path = bm, ck.info.path
        elif run_id is not None:
            base_model = self.runs.get_active(user, run_id).base_model
        elif base_model is None:
            raise InvalidInputError("give base_model, checkpoint or run_id", field="base_model")
        m = self._model_cfg(base_model)
        return Samplers.public(self.samplers.add(user, s, sampler_id, m.served_name, model_path, run_id))

    async def get_sampler(self, user: User, sampler_id: str) -> dict[str, Any]:
        return Samplers.public(self.samplers.row(user, sampler_id))

    async def sample(
        self, user: User, op: SampleOp, *, sampler_id: str | None = None, base_model: str | None = None,
        run_id: str | None = None, checkpoint: str | None = None, session_id: str | None = None,
    ) -> FutureRef:
        self._ensure_reaper()
        stop_of = None
        if session_id is not None:  # the caller's own session (a pending Stop rides on the reply)
            stop_of = self.sessions.by_id.get(session_id)
            if stop_of is None or stop_of.user != user.name:
                raise NotFoundError(f"session {session_id!r} not found", field="session_id")
        t = self.sample_target(user, op, sampler_id=sampler_id, base_model=base_model, run_id=run_id,
                               checkpoint=checkpoint)
        worker, adapter_id, ck_dir, run = t.worker, t.adapter_id, t.checkpoint_dir, t.run

        async def _go() -> Any:
            out = await worker.sample(op, adapter_id=adapter_id, checkpoint_path=ck_dir)
            out = out if isinstance(out, SampleResponse) else SampleResponse.model_validate(out)
            self.meter(user.name, t.base_model, prefilled=len(op.prompt),
                       sampled=sum(len(seq.tokens) for seq in out.sequences))
            return out

        ref = self._spawn(user, "sample", t.run_id, _go() if run is None else self._guard(run, _go), after=t.after,
                          session_id=t.session_id, base_model=t.base_model)
        # a loop that only samples sees the panel's Stop too
        if stop_of is None and t.session_id:
            stop_of = self.sessions.by_id.get(t.session_id)
        self._touch_session(t.session_id)
        return self._with_stop(ref, stop_of)

    def _touch_session(self, session_id: str | None) -> None:
        """Traffic of a session's own work proves its client alive: extend the lease (as a heartbeat would). A
        client busy for minutes sampling, whose heartbeats time out on a loaded machine, keeps its session."""
        s = self.sessions.by_id.get(session_id) if session_id else None
        if s is not None:
            self.sessions.touch(s, persist=False)

    def sample_target(
        self, user: User, op: SampleOp, *, sampler_id: str | None = None, base_model: str | None = None,
        run_id: str | None = None, checkpoint: str | None = None,
    ) -> SampleTarget:
        """Validate a sample request (``op`` gets its defaults) and resolve what it samples with. Another
        user's run or checkpoint is a 404. Used by ``sample`` and the streaming/OpenAI routes."""
        session_id: str | None = None
        if sampler_id is not None:
            row = self.samplers.row(user, sampler_id)
            base_model, run_id, checkpoint = row["base_model"], row.get("run_id"), row.get("model_path")
            session_id = row.get("session_id")
        adapter_id: str | None = None
        ck_dir: str | None = None
        replica: int | None = None
        after = None
        run: RunInfo | None = None
        if run_id is not None:
            run = self.runs.get_active(user, run_id)
            self._check_rollback(run)
            base_model, adapter_id = run.base_model, run.run_id
            session_id = session_id or run.session_id
            replica = self.runs.replica(run)
            after = self.runs.extra[run.run_id].ready
        elif checkpoint is not None:
            ck = self.checkpoints.resolve(user, checkpoint)
            _, bm = Checkpoints.model_of(ck, self.runs.by_id.get(ck.info.run_id))
            base_model, ck_dir = bm, ck.dir
        if base_model is None:
            raise InvalidInputError("give sampler_id, base_model, run_id or checkpoint", field="base_model")
        m = self._model_cfg(base_model)
        if not op.prompt:
            raise InvalidInputError("prompt must hold at least one token", field="prompt")
        op.prompt, op.images = expand_prompt(op.prompt, self._model_info.get(m.served_name), m.served_name)
        self._check_tokens(m, len(op.prompt), "prompt")
        if op.num_samples < 1 or op.num_samples > m.sampler.max_num_samples:
            raise LimitExceededError(
                f"num_samples {op.num_samples} is outside 1..{m.sampler.max_num_samples}", field="num_samples"
            )
        params = op.params
        if params.max_tokens is None:
            op.params = params = params.model_copy(update={"max_tokens": m.sampler.default_max_tokens})
        if params.max_tokens is not None and params.max_tokens > m.sampler.max_tokens:
            raise LimitExceededError(
                f"max_tokens {params.max_tokens} exceeds this model's limit {m.sampler.max_tokens}",
                field="sampling_params.max_tokens",
            )
        if replica is None:
            replica = self.runs.least_loaded_replica(m.served_name, len(self.workers[m.served_name]))
        worker = self._worker(m.served_name, replica)
        return SampleTarget(worker, adapter_id, ck_dir, after, run, run_id, session_id, m.served_name)

    # ---- usage -------------------------------------------------------------------------------------------
    def meter(self, user: str, base_model: str, *, trained: int = 0, prefilled: int = 0, sampled: int = 0) -> None:
        """Account tokens to ``user`` (the usage ledger, and the token counters when telemetry is on)."""
        self.usage.add(user, base_model, trained=trained, prefilled=prefilled, sampled=sampled)
        if self.metrics is not None:
            self.metrics.usage(user, base_model, trained, prefilled, sampled)

    async def get_usage(self, user: User, *, of_user: str | None = None, all_users: bool = False,
                        since: float | None = None, until: float | None = None) -> list[dict[str, Any]]:
        """Usage rows. A user reads their own; an admin may name another user or ask for everyone."""
        if (all_users or (of_user is not None and of_user != user.name)) and not user.is_admin:
            raise ForbiddenError("usage of other users is visible to admins only", field="user")
        who = None if all_users else (of_user or user.name)
        return self.usage.report(who, since, until)

    # ---- futures -----------------------------------------------------------------------------------------
    async def wait(self, user: User, future_id: str, timeout: float = 30.0) -> FutureState:
        """Long-poll: returns as soon as the future completes, or ``status=pending`` after ``timeout``. Polling
        for a session's pending work extends that session's lease."""
        fut = self.futures.by_id.get(future_id) if isinstance(future_id, str) else None
        if fut is not None and fut.user == user.name and fut.state is None:
            run = self.runs.by_id.get(fut.run_id) if fut.run_id else None
            self._touch_session(fut.session_id or (run.session_id if run is not None else None))
        return await self.futures.wait(user.name, future_id, timeout)

    def future_run_id(self, user: User, future_id: str) -> str | None:
        return self.futures.run_id_of(user.name, future_id)

    # ---- server ------------------------------------------------------------------------------------------
    def capabilities(self) -> Capabilities:
        models = []
        for m in self.config.models:
            info = self._model_info.get(m.served_name)
            models.append(BaseModelInfo(
                name=m.served_name, backend=m.backend, vocab_size=info.vocab_size if info else None,
                max_length=info.max_length if info else None, max_lora_rank=m.max_lora_rank,
                max_adapters=m.max_adapters * m.replicas, max_tokens_per_request=min(
                    m.max_tokens_per_request, self.config.limits.max_tokens_per_request),
                tokenizer_id=info.tokenizer_id if info else None, replicas=m.replicas,
                vision=info.vision if info else None,
            ))
        return Capabilities(version=_VERSION, base_models=models, losses=describe_losses())

    async def status(self) -> ServerStatus:
        await self._refresh_model_info()
        workers: list[WorkerStatus] = []
        for m in self.config.models:
            for i, w in enumerate(self.workers[m.served_name]):
                try:
                    st: Any = await w.status()
                except Exception as e:
                    log.warning("status of %s[%d] failed: %s", m.served_name, i, unwrap(e))
                    st = {}
                if hasattr(st, "model_dump"):
                    st = st.model_dump()
                st = dict(st or {})
                adapters = st.get("adapters", 0)
                if isinstance(adapters, (list, tuple)):
                    adapters = len(adapters)
                workers.append(WorkerStatus(
                    base_model=m.served_name, replica=i, adapters=int(adapters),
                    queue_depth=int(st.get("queue_depth", 0) or 0), batches_run=int(st.get("batches_run", 0) or 0),
                    last_batch=st.get("last_batch"), mixed_batches=int(st.get("mixed_batches", 0) or 0),
                    max_adapters_in_batch=int(st.get("max_adapters_in_batch", 0) or 0),
                    recent_batches=list(st.get("recent_batches") or []),
                ))
        return ServerStatus(
            version=_VERSION, uptime_s=_now() - self.started_at,
            sessions_active=len(self.sessions.active),
            runs_active=len(self.runs.active),
            workers=workers,
        )

