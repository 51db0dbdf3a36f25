"""The gateway's service layer: everything the HTTP routes (native and Tinker) call.

Routes stay thin: parse → ``Service`` → serialise. Both the native routes (``twinkle.server.routes_native``)
and the Tinker routes (``twinkle.server.tinker``) use ONLY the public methods below, so the two front doors
share sessions, runs and checkpoints.

``Service`` is a thin facade. The state lives in the registries of :mod:`twinkle.server.state` (identity and
sessions, runs, checkpoints, futures, samplers); the work that crosses them lives in :mod:`twinkle.server.gateway`,
one module per concept (leases and the reaper, a run's lifecycle, training operations, saving and loading,
sampling, server information). Model workers are reached through :class:`~twinkle.server.worker_api.WorkerAPI`.

Ids: a session id is an opaque string without ``/`` or ``:``; a run id (= Tinker model id) is
``{session_id}:train:{n}``; a sampler id is ``{session_id}:sample:{n}``; a checkpoint path is
``tinker://{run_id}/{weights|sampler_weights}/{name}``.

Future results are Python objects (``ForwardBackwardOutput``, ``OptimStepResponse``, ``CheckpointInfo``,
``RunInfo``, ``SampleResponse``, ``dict``); each front door serialises them (JSON or protobuf).
"""

from __future__ import annotations

import gc
from typing import Any

from twinkle.types import ForbiddenError, LoraConfig, ModelInfo
from twinkle.types.api import (
    Capabilities,
    CheckpointInfo,
    FutureRef,
    FutureState,
    MetricHistory,
    RunInfo,
    ServerStatus,
    SessionInfo,
)

from .config import ServerConfig
from .gateway import info
from .gateway.context import Context
from .gateway.leases import Leases
from .gateway.run_lifecycle import RunLifecycle
from .gateway.sampling import SampleTarget, Sampling
from .gateway.saving import Saving
from .gateway.training import Training
from .ops import Op, SampleOp
from .state.checkpoints import Ckpt, parse_checkpoint_path
from .state.common import now as _now
from .state.common import validate_checkpoint_name, validate_user_name
from .state.identity import User
from .state.samplers import Samplers
from .store import Store
from .worker_api import WorkerAPI

__all__ = [
    "SampleTarget", "Service", "User", "WorkerAPI", "parse_checkpoint_path", "validate_checkpoint_name",
    "validate_user_name",
]


class Service:
    """The gateway service. ``workers`` maps a served base-model name to its replicas' workers."""

    def __init__(self, config: ServerConfig, workers: dict[str, list[WorkerAPI]], store: Store | None = None):
        self.ctx = ctx = Context(config, workers, store)
        # the shared state, by its own name (routes, telemetry and tests read these)
        self.config, self.workers, self.store = ctx.config, ctx.workers, ctx.store
        self.checkpoint_root, self.started_at = ctx.checkpoint_root, ctx.started_at
        self.identity, self.sessions, self.runs = ctx.identity, ctx.sessions, ctx.runs
        self.checkpoints, self.futures, self.samplers = ctx.checkpoints, ctx.futures, ctx.samplers
        self.usage, self.recovery = ctx.usage, ctx.recovery
        self.saving = Saving(ctx)
        self.lifecycle = RunLifecycle(ctx, self.saving)
        self.leases = Leases(ctx, self.lifecycle)
        self.training = Training(ctx, self.saving)
        self.sampling = Sampling(ctx)
        self._lost_at_start: list[RunInfo] = []
        self._load_state()

    @property
    def metrics(self) -> Any:
        """``telemetry.metrics.GatewayMetrics`` when telemetry is on (set by the telemetry set-up), else None."""
        return self.ctx.metrics

    @metrics.setter
    def metrics(self, value: Any) -> None:
        self.ctx.metrics = value

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
        self.leases.ensure_reaper()
        lost, self._lost_at_start = self._lost_at_start, []
        if lost:
            self.recovery.restore_after_restart(lost, _now())
        await self.ctx.refresh_model_info()

    async def stop(self) -> None:
        self.usage.flush()
        self.runs.flush()
        await self.leases.stop()
        self.recovery.stop()

    async def refresh_model_info(self) -> None:
        """Fetch (once) each model's info from its first worker, for ``capabilities``."""
        await self.ctx.refresh_model_info()

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
        self.leases.ensure_reaper()
        s = self.leases.create_session(user, client=client, metadata=metadata, tags=tags, lease_seconds=lease_seconds)
        return s.model_copy(deep=True)

    async def heartbeat(self, user: User, session_id: str) -> SessionInfo:
        """Extend the lease. ``GoneError`` once the session expired or closed."""
        self.leases.ensure_reaper()
        s = self.sessions.get_active(user, session_id)
        self.sessions.touch(s)
        return s.model_copy(deep=True)

    async def get_session(self, user: User, session_id: str) -> SessionInfo:
        """Re-attach: a session still within its lease is extended by this call."""
        self.leases.ensure_reaper()
        s = self.sessions.get(user, session_id)
        self.sessions.touch(s)
        return s.model_copy(deep=True)

    async def request_stop(self, user: User, session_id: str) -> SessionInfo:
        """Ask the session's training loop to stop at its next step boundary: the flag rides on the replies of
        the session's training calls (``FutureRef.stop_requested``) until the client clears it."""
        return self.leases.request_stop(user, session_id).model_copy(deep=True)

    async def clear_stop(self, user: User, session_id: str) -> SessionInfo:
        return self.leases.clear_stop(user, session_id).model_copy(deep=True)

    async def list_sessions(self, user: User) -> list[SessionInfo]:
        return [s.model_copy(deep=True) for s in self.sessions.list(user)]

    async def close_session(self, user: User, session_id: str, reason: str = "closed") -> SessionInfo:
        """Checkpoint (auto) and unload the session's adapters; state → closed."""
        s = self.sessions.get(user, session_id)
        if s.state == "active":
            await self.leases.end_session(s, "closed", reason)
        return s.model_copy(deep=True)

    async def reap(self, now: float | None = None) -> None:
        """One reaper tick: expire lapsed sessions (checkpoint + unload), drop old futures and checkpoints."""
        await self.leases.reap(now)

    # ---- runs --------------------------------------------------------------------------------------------
    async def create_run(
        self, user: User, *, session_id: str, base_model: str, lora: LoraConfig,
        run_id: str | None = None, name: str | None = None, metadata: dict[str, Any] | None = None,
    ) -> FutureRef:
        """Place a new adapter on a worker replica. ``run_id`` given (Tinker: ``{sid}:train:{n}``) makes the
        call idempotent: the same id for the same user returns the existing run's future. Result: RunInfo."""
        self.leases.ensure_reaper()
        return await self.lifecycle.create_run(user, session_id=session_id, base_model=base_model, lora=lora,
                                               run_id=run_id, name=name, metadata=metadata)

    async def resume_run(
        self, user: User, *, session_id: str, checkpoint: str, optimizer: bool = True,
        run_id: str | None = None, metadata: dict[str, Any] | None = None,
    ) -> FutureRef:
        """Create a run from a checkpoint (Tinker create-via-load). Result: RunInfo."""
        self.leases.ensure_reaper()
        return await self.lifecycle.resume_run(user, session_id=session_id, checkpoint=checkpoint,
                                               optimizer=optimizer, run_id=run_id, metadata=metadata)

    async def get_run(self, user: User, run_id: str) -> RunInfo:
        return self.runs.get(user, run_id).model_copy(deep=True)

    async def list_runs(self, user: User, *, limit: int = 100, offset: int = 0) -> tuple[list[RunInfo], int]:
        page, total = self.runs.list(user, limit=limit, offset=offset)
        return [r.model_copy(deep=True) for r in page], total

    async def delete_run(self, user: User, run_id: str) -> RunInfo:
        return await self.lifecycle.delete_run(user, run_id)

    async def get_metrics(self, user: User, run_id: str) -> MetricHistory:
        return self.lifecycle.get_metrics(user, run_id)

    def token_limit(self, base_model: str) -> int:
        """The most tokens one request to ``base_model`` (a served name) may hold."""
        return self.ctx.token_limit(base_model)

    async def model_info(self, base_model: str) -> ModelInfo | None:
        """What ``base_model``'s worker told about it (its vision rules, ...), asked now if not known yet; None
        while the worker cannot answer."""
        if base_model not in self.ctx.model_info:
            await self.ctx.refresh_model_info()
        return self.ctx.model_info.get(base_model)

    # ---- training ----------------------------------------------------------------------------------------
    async def submit(self, user: User, run_id: str, op: Op, *, seq_id: int | None = None) -> FutureRef:
        """Queue a training op on the run's worker. Validation errors raise here (before a future exists)."""
        self.leases.ensure_reaper()
        return await self.training.submit(user, run_id, op, seq_id=seq_id)

    async def skip_seq(self, user: User, run_id: str, seq_id: int | None) -> None:
        """A front door refused a request of ``run_id`` carrying ``seq_id`` before calling :meth:`submit`
        (e.g. a body that failed validation): mark the seq_id consumed so the run's later ops do not wait for
        it. Unknown/foreign runs and bad seq ids are ignored."""
        self.training.skip_seq(user, run_id, seq_id)

    # ---- checkpoints -------------------------------------------------------------------------------------
    async def list_checkpoints(self, user: User, run_id: str | None = None) -> list[CheckpointInfo]:
        return self.saving.list_checkpoints(user, run_id)

    async def get_checkpoint(self, user: User, path: str) -> CheckpointInfo:
        """Resolve a ``tinker://`` path the user may read (own, or published)."""
        return self.checkpoints.readable(user, path)

    async def delete_checkpoint(self, user: User, run_id: str, checkpoint_id: str) -> CheckpointInfo:
        return self.saving.delete_checkpoint(user, run_id, checkpoint_id)

    async def set_checkpoint_ttl(self, user: User, run_id: str, checkpoint_id: str, ttl_seconds: float | None) -> CheckpointInfo:
        return self.saving.set_checkpoint_ttl(user, run_id, checkpoint_id, ttl_seconds)

    async def set_checkpoint_public(self, user: User, run_id: str, checkpoint_id: str, public: bool) -> CheckpointInfo:
        return self.saving.set_checkpoint_public(user, run_id, checkpoint_id, public)

    # ---- sampling ----------------------------------------------------------------------------------------
    async def create_sampler(
        self, user: User, *, session_id: str, sampler_id: str | None = None,
        base_model: str | None = None, checkpoint: str | None = None, run_id: str | None = None,
    ) -> dict[str, Any]:
        """Register a sampler (base model, a checkpoint path, or a run's live weights).
        Returns ``{"sampler_id", "base_model", "model_path"}``."""
        return self.sampling.create_sampler(user, session_id=session_id, sampler_id=sampler_id,
                                            base_model=base_model, checkpoint=checkpoint, run_id=run_id)

    async def get_sampler(self, user: User, sampler_id: str) -> dict[str, Any]:
        return Samplers.public(self.samplers.row(user, sampler_id))

    async def sample(
        self, user: User, op: SampleOp, *, sampler_id: str | None = None, base_model: str | None = None,
        run_id: str | None = None, checkpoint: str | None = None, session_id: str | None = None,
    ) -> FutureRef:
        self.leases.ensure_reaper()
        return self.sampling.sample(user, op, sampler_id=sampler_id, base_model=base_model, run_id=run_id,
                                    checkpoint=checkpoint, session_id=session_id)

    def sample_target(
        self, user: User, op: SampleOp, *, sampler_id: str | None = None, base_model: str | None = None,
        run_id: str | None = None, checkpoint: str | None = None,
    ) -> SampleTarget:
        """Validate a sample request (``op`` gets its defaults) and resolve what it samples with. Another
        user's run or checkpoint is a 404. Used by ``sample`` and the streaming/OpenAI routes."""
        return self.sampling.sample_target(user, op, sampler_id=sampler_id, base_model=base_model, run_id=run_id,
                                           checkpoint=checkpoint)

    # ---- usage -------------------------------------------------------------------------------------------
    def meter(self, user: str, base_model: str, *, trained: int = 0, prefilled: int = 0, sampled: int = 0) -> None:
        """Account tokens to ``user`` (the usage ledger, and the token counters when telemetry is on)."""
        self.ctx.meter(user, base_model, trained=trained, prefilled=prefilled, sampled=sampled)

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
            self.ctx.touch_session(fut.session_id or (run.session_id if run is not None else None))
        return await self.futures.wait(user.name, future_id, timeout)

    def future_run_id(self, user: User, future_id: str) -> str | None:
        return self.futures.run_id_of(user.name, future_id)

    # ---- server ------------------------------------------------------------------------------------------
    def capabilities(self) -> Capabilities:
        return info.capabilities(self.ctx)

    async def status(self) -> ServerStatus:
        return await info.status(self.ctx)
