"""The gateway's service layer: everything the HTTP routes (native and Tinker) call.

Routes stay thin: parse → ``Service`` → serialise. The service owns auth, sessions/leases, runs, futures,
checkpoints and talks to model workers (Ray Serve deployment handles, or in-process workers in unit tests).
Both the native routes (``twinkle.server.routes_native``) and the Tinker routes (``twinkle.server.tinker``)
use ONLY the methods below, so the two front doors share sessions, runs and checkpoints.

Ids: a session id is an opaque string without ``/`` or ``:``; a run id (= Tinker model id) is
``{session_id}:train:{n}``; a sampler id is ``{session_id}:sample:{n}``; a checkpoint path is
``tinker://{run_id}/{weights|sampler_weights}/{name}``.

Future results are Python objects (``ForwardBackwardOutput``, ``OptimStepResponse``, ``CheckpointInfo``,
``RunInfo``, ``SampleResponse``, ``dict``); each front door serialises them (JSON or protobuf).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twinkle.types import LoraConfig
from twinkle.types.api import (
    Capabilities,
    CheckpointInfo,
    FutureRef,
    FutureState,
    RunInfo,
    ServerStatus,
    SessionInfo,
)

from .ops import Op, SampleOp


@dataclass(frozen=True)
class User:
    name: str
    key_id: str
    is_admin: bool = False


class Service:
    """Interface (implemented in this module by the server work; signatures are the contract)."""

    # ---- auth --------------------------------------------------------------------------------------------
    def authenticate(self, api_key: str | None) -> User:
        """Raise ``AuthenticationError`` for a missing/unknown/revoked key."""
        raise NotImplementedError

    # ---- sessions ----------------------------------------------------------------------------------------
    async def create_session(
        self, user: User, *, client: str = "twinkle", metadata: dict[str, Any] | None = None,
        tags: list[str] | None = None, lease_seconds: float | None = None,
    ) -> SessionInfo:
        raise NotImplementedError

    async def heartbeat(self, user: User, session_id: str) -> SessionInfo:
        """Extend the lease. ``GoneError`` once the session expired or closed."""
        raise NotImplementedError

    async def get_session(self, user: User, session_id: str) -> SessionInfo:
        raise NotImplementedError

    async def list_sessions(self, user: User) -> list[SessionInfo]:
        raise NotImplementedError

    async def close_session(self, user: User, session_id: str, reason: str = "closed") -> SessionInfo:
        """Checkpoint (auto) and unload the session's adapters; state → closed."""
        raise NotImplementedError

    # ---- runs --------------------------------------------------------------------------------------------
    async def create_run(
        self, user: User, *, session_id: str, base_model: str, lora: LoraConfig,
        run_id: str | None = None, name: str | None = None, metadata: dict[str, Any] | None = None,
    ) -> FutureRef:
        """Place a new adapter on a worker replica. ``run_id`` given (Tinker: ``{sid}:train:{n}``) makes the
        call idempotent: the same id for the same user returns the existing run's future. Result: RunInfo."""
        raise NotImplementedError

    async def get_run(self, user: User, run_id: str) -> RunInfo:
        raise NotImplementedError

    async def list_runs(self, user: User, *, limit: int = 100, offset: int = 0) -> tuple[list[RunInfo], int]:
        raise NotImplementedError

    async def delete_run(self, user: User, run_id: str) -> RunInfo:
        raise NotImplementedError

    async def submit(self, user: User, run_id: str, op: Op, *, seq_id: int | None = None) -> FutureRef:
        """Queue a training op on the run's worker. Validation errors raise here (before a future exists)."""
        raise NotImplementedError

    async def resume_run(
        self, user: User, *, session_id: str, checkpoint: str, optimizer: bool = True,
        run_id: str | None = None, metadata: dict[str, Any] | None = None,
    ) -> FutureRef:
        """Create a run from a checkpoint (Tinker create-via-load). Result: RunInfo."""
        raise NotImplementedError

    # ---- sampling ----------------------------------------------------------------------------------------
    async def create_sampler(
        self, user: User, *, session_id: str, sampler_id: str | None = None,
        base_model: str | None = None, checkpoint: str | None = None, run_id: str | None = None,
    ) -> dict[str, Any]:
        """Register a sampler (base model, a checkpoint path, or a run's live weights).
        Returns ``{"sampler_id", "base_model", "model_path"}``."""
        raise NotImplementedError

    async def get_sampler(self, user: User, sampler_id: str) -> dict[str, Any]:
        raise NotImplementedError

    async def sample(
        self, user: User, op: SampleOp, *, sampler_id: str | None = None, base_model: str | None = None,
        run_id: str | None = None, checkpoint: str | None = None,
    ) -> FutureRef:
        raise NotImplementedError

    # ---- futures -----------------------------------------------------------------------------------------
    async def wait(self, user: User, future_id: str, timeout: float = 30.0) -> FutureState:
        """Long-poll: returns as soon as the future completes, or ``status=pending`` after ``timeout``."""
        raise NotImplementedError

    # ---- checkpoints -------------------------------------------------------------------------------------
    async def list_checkpoints(self, user: User, run_id: str | None = None) -> list[CheckpointInfo]:
        raise NotImplementedError

    async def get_checkpoint(self, user: User, path: str) -> CheckpointInfo:
        """Resolve a ``tinker://`` path the user may read (own, or published)."""
        raise NotImplementedError

    async def delete_checkpoint(self, user: User, run_id: str, checkpoint_id: str) -> CheckpointInfo:
        raise NotImplementedError

    async def set_checkpoint_ttl(self, user: User, run_id: str, checkpoint_id: str, ttl_seconds: float | None) -> CheckpointInfo:
        raise NotImplementedError

    async def set_checkpoint_public(self, user: User, run_id: str, checkpoint_id: str, public: bool) -> CheckpointInfo:
        raise NotImplementedError

    # ---- server ------------------------------------------------------------------------------------------
    def capabilities(self) -> Capabilities:
        raise NotImplementedError

    async def status(self) -> ServerStatus:
        raise NotImplementedError
