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

Implementation notes:

* Workers are duck-typed objects with async ``create_adapter(adapter_id, lora)``, ``remove_adapter(adapter_id)``,
  ``execute(adapter_id, op, seq_id=, path=)``, ``sample(op, adapter_id=, checkpoint_path=)``, ``status()`` and
  ``model_info()`` (``twinkle.server.worker.ModelWorker`` in process, or a Ray Serve handle adaptor). The
  adapter id on a worker is the run id.
* Futures are asyncio tasks in the gateway; ``wait`` awaits an ``asyncio.Event`` (no poll interval). Completed
  results stay in memory and in SQLite for ``persistence.future_ttl_seconds``.
* Sessions are leases: a reaper task (1 s tick) expires sessions whose lease lapsed, checkpoints their runs
  (``auto-<timestamp>``, kind training) and unloads them (run state → ``unloaded``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import heapq
import logging
import re
import secrets
import shutil
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twinkle.data.convert import loss_weight_and_tokens
from twinkle.types import (
    AuthenticationError,
    ForwardBackwardOutput,
    GoneError,
    InternalError,
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
    MetricPoint,
    RunInfo,
    ServerStatus,
    SessionInfo,
    WorkerStatus,
)

from .ops import (
    CreateAdapterOp,
    ForwardBackwardOp,
    LoadOp,
    Op,
    OptimStepOp,
    SampleOp,
    SaveOp,
    SetOptimizerOp,
    SetSchedulerOp,
)

__all__ = ["Service", "User", "validate_checkpoint_name", "validate_user_name"]

log = logging.getLogger("twinkle.server")

_VERSION = "0.1.0"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_USER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_KIND_DIR = {"training": "weights", "sampler": "sampler_weights"}
_DIR_KIND = {v: k for k, v in _KIND_DIR.items()}
_MAX_METRIC_POINTS = 10000
_AUTH_CACHE_S = 2.0
_REAP_MAX_SLEEP_S = 30.0  # the reaper wakes at least this often (a lapsed lease is caught within ~1 s anyway)
_REAP_SLACK_S = 0.5  # wake this long after a deadline, so one tick handles it
_PRUNE_EVERY_S = 60.0  # expired future rows are deleted from SQLite this often


@dataclass(frozen=True)
class User:
    name: str
    key_id: str
    is_admin: bool = False


def validate_checkpoint_name(name: Any, field: str = "name") -> str:
    """A checkpoint name is a single path component: letters, digits, ``. _ -``; no ``/``, ``..`` or control chars."""
    if not isinstance(name, str) or not name:
        raise InvalidInputError("a checkpoint name must be a non-empty string", field=field)
    if "/" in name or "\\" in name or ".." in name or name.startswith("."):
        raise InvalidInputError(
            f"checkpoint name {name!r} must not contain '/', '\\\\' or '..' (the server chooses the directory)",
            field=field,
        )
    if not _NAME_RE.match(name):
        raise InvalidInputError(
            f"checkpoint name {name!r} may use letters, digits, '.', '_' and '-' only (at most 128)", field=field
        )
    return name


def validate_user_name(name: str) -> str:
    if not _USER_RE.match(name or ""):
        raise InvalidInputError(
            f"user name {name!r} may use letters, digits, '.', '_' and '-' only (at most 64)", field="user"
        )
    return name


def _now() -> float:
    return time.time()


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json")
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalar
        return obj.item()
    return obj


def _unwrap(exc: BaseException) -> BaseException:
    """Ray wraps a remote exception; give back the worker's own ``TwinkleError`` when there is one."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, TwinkleError):
        return cause
    if isinstance(exc, TwinkleError) and type(exc).__name__.startswith("RayTaskError"):
        err = type(exc).__mro__[1]
        if issubclass(err, TwinkleError):
            out = err(getattr(exc, "message", str(exc)), detail=getattr(exc, "detail", None))
            return out
    return exc


def _with_mean_loss(metrics: dict[str, Any], weight: float) -> dict[str, Any]:
    """Run metrics carry ``loss`` = per-token mean (``loss:sum`` / loss weight), the number every view shows."""
    total = metrics.get("loss:sum")
    if total is None or weight <= 0 or "loss" in metrics:
        return metrics
    return {"loss": float(total) / weight, **metrics}


def parse_checkpoint_path(path: str, field: str = "checkpoint") -> tuple[str, str, str]:
    """``tinker://<run>/<weights|sampler_weights>/<name>`` → ``(run_id, kind, name)``."""
    if not isinstance(path, str) or not path.startswith("tinker://"):
        raise InvalidInputError(f"{path!r} is not a tinker:// checkpoint path", field=field)
    parts = path[len("tinker://"):].split("/")
    if len(parts) != 3 or parts[1] not in _DIR_KIND or not parts[0]:
        raise InvalidInputError(
            f"{path!r} is not of the form tinker://<run_id>/<weights|sampler_weights>/<name>", field=field
        )
    validate_checkpoint_name(parts[2], field=field)
    return parts[0], _DIR_KIND[parts[1]], parts[2]


@dataclass
class _Future:
    future_id: str
    user: str
    type: str
    run_id: str | None
    event: asyncio.Event = field(default_factory=asyncio.Event)
    state: FutureState | None = None
    done_at: float = 0.0
    task: asyncio.Task[Any] | None = None


@dataclass
class _Ckpt:
    info: CheckpointInfo
    user: str
    dir: str


@dataclass
class _RunExtra:
    replica: int = 0
    ready: asyncio.Future[Any] | None = None
    metrics: list[MetricPoint] = field(default_factory=list)


class Service:
    """The gateway service. ``workers`` maps a served base-model name to its replicas' workers."""

    def __init__(self, config: Any, workers: dict[str, list[Any]], store: Any | None = None):
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
        self._auth_cache: dict[str, tuple[float, User]] = {}
        self._bootstrap: dict[str, User] = {}
        self._sessions: dict[str, SessionInfo] = {}
        self._runs: dict[str, RunInfo] = {}
        self._extra: dict[str, _RunExtra] = {}
        self._ckpts: dict[tuple[str, str, str], _Ckpt] = {}
        self._samplers: dict[str, dict[str, Any]] = {}
        self._futures: dict[str, _Future] = {}
        self._model_info: dict[str, ModelInfo] = {}
        # Indexes, so no call scans every stored session/run/checkpoint as the history grows.
        self._user_sessions: dict[str, list[str]] = {}
        self._user_runs: dict[str, list[str]] = {}
        self._user_ckpts: dict[str, dict[tuple[str, str, str], None]] = {}
        self._active_sessions: set[str] = set()
        self._active_runs: set[str] = set()
        self._session_samplers: dict[str, int] = {}
        self._lease_heap: list[tuple[float, str]] = []  # (lease deadline, session id); stale entries re-pushed
        self._ckpt_expiry: list[tuple[float, tuple[str, str, str]]] = []  # (expires_at, checkpoint key)
        self._done_futures: deque[tuple[float, str]] = deque()  # (done_at, future id), in completion order
        self._next_prune = 0.0
        self._reaper: asyncio.Task[Any] | None = None
        self._kick: asyncio.Event | None = None
        self._lock: asyncio.Lock | None = None
        self._closing = False
        self._load_state()

    # ---- lifecycle ---------------------------------------------------------------------------------------
    def _load_state(self) -> None:
        # Tens of thousands of long-lived rows: without the cyclic GC running over them while they are built
        # (quadratic), then moved out of its way (``gc.freeze``) so later collections do not scan them.
        enabled = gc.isenabled()
        gc.disable()
        try:
            self._load_rows()
        finally:
            if enabled:
                gc.enable()
            gc.freeze()

    def _load_rows(self) -> None:
        for row in self.store.sessions():
            self._add_session(SessionInfo.model_validate(row))
        lost = []
        for row in self.store.runs():
            run = RunInfo.model_validate(row)
            if run.state == "active":  # the workers of the previous server process are gone
                run.state = "lost"
                lost.append(run)
            self._extra[run.run_id] = _RunExtra(replica=int(row.get("_replica", 0) or 0))
            self._add_run(run)
        for run in lost:
            self._save_run(run)
        for row, user, directory in self.store.checkpoints():
            info = CheckpointInfo.model_validate(row)
            self._add_ckpt((info.run_id, info.kind, info.name), _Ckpt(info, user, directory))
        for row in self.store.samplers():
            self._samplers[row["sampler_id"]] = row
            self._count_sampler(row["sampler_id"])

    def _add_session(self, s: SessionInfo) -> None:
        self._sessions[s.session_id] = s
        self._user_sessions.setdefault(s.user, []).append(s.session_id)
        if s.state == "active":
            self._active_sessions.add(s.session_id)
            heapq.heappush(self._lease_heap, (s.last_heartbeat + s.lease_seconds, s.session_id))
            if self._kick is not None:
                self._kick.set()

    def _add_run(self, run: RunInfo) -> None:
        self._runs[run.run_id] = run
        self._user_runs.setdefault(run.user, []).append(run.run_id)
        self._set_run_state(run, run.state)

    def _set_run_state(self, run: RunInfo, state: str) -> None:
        run.state = state  # type: ignore[assignment]
        if state == "active":
            self._active_runs.add(run.run_id)
        else:
            self._active_runs.discard(run.run_id)

    def _add_ckpt(self, key: tuple[str, str, str], ck: _Ckpt) -> None:
        self._ckpts[key] = ck
        self._user_ckpts.setdefault(ck.user, {})[key] = None
        self._track_expiry(key, ck)

    def _track_expiry(self, key: tuple[str, str, str], ck: _Ckpt) -> None:
        if ck.info.expires_at is not None:
            heapq.heappush(self._ckpt_expiry, (ck.info.expires_at, key))
            if self._kick is not None:
                self._kick.set()

    def _count_sampler(self, sampler_id: str) -> None:
        sid, _, n = sampler_id.rpartition(":sample:")
        if n.isdigit():
            self._session_samplers[sid] = max(self._session_samplers.get(sid, 0), int(n) + 1)

    async def start(self) -> None:
        """Start the lease reaper and fetch each model's info (idempotent)."""
        self._ensure_reaper()
        await self._refresh_model_info()

    async def stop(self) -> None:
        self._closing = True
        if self._reaper is not None:
            self._reaper.cancel()
            try:
                await self._reaper
            except (asyncio.CancelledError, Exception):
                pass
            self._reaper = None

    def _ensure_reaper(self) -> None:
        if self._reaper is None or self._reaper.done():
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            self._kick = asyncio.Event()
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
        self._bootstrap[key] = User(name=validate_user_name(user), key_id="bootstrap", is_admin=True)

    def authenticate(self, api_key: str | None) -> User:
        """Raise ``AuthenticationError`` for a missing/unknown/revoked key."""
        if not api_key:
            raise AuthenticationError("missing API key: send X-API-Key or Authorization: Bearer <key>")
        if api_key in self._bootstrap:
            return self._bootstrap[api_key]
        hit = self._auth_cache.get(api_key)
        now = time.monotonic()
        if hit is not None and hit[0] > now:
            return hit[1]
        row = self.store.lookup_key(api_key)
        if row is None:
            self._auth_cache.pop(api_key, None)
            raise AuthenticationError("unknown or revoked API key")
        user = User(name=row["user"], key_id=row["key_id"], is_admin=row["is_admin"])
        if len(self._auth_cache) > 10000:
            self._auth_cache.clear()
        self._auth_cache[api_key] = (now + _AUTH_CACHE_S, user)
        return user

    # ---- sessions ----------------------------------------------------------------------------------------
    def _session(self, user: User, session_id: str, field: str = "session_id") -> SessionInfo:
        s = self._sessions.get(session_id) if isinstance(session_id, str) else None
        if s is None or s.user != user.name:
            raise NotFoundError(f"session {session_id!r} not found", field=field)
        return s

    def _active_session(self, user: User, session_id: str, field: str = "session_id") -> SessionInfo:
        s = self._session(user, session_id, field)
        if s.state != "active":
            raise GoneError(f"session {session_id!r} is {s.state}; create a new session", field=field)
        return s

    def _save_session(self, s: SessionInfo) -> None:
        self.store.put_session(s.model_dump(mode="json"))

    async def create_session(
        self, user: User, *, client: str = "twinkle", metadata: dict[str, Any] | None = None,
        tags: list[str] | None = None, lease_seconds: float | None = None,
    ) -> SessionInfo:
        self._ensure_reaper()
        if client not in ("twinkle", "tinker"):
            raise InvalidInputError(f"unknown client {client!r}", field="client")
        lease = float(lease_seconds) if lease_seconds else self.config.lease_seconds
        if lease <= 0:
            raise InvalidInputError("lease_seconds must be > 0", field="lease_seconds")
        lease = min(lease, self.config.max_lease_seconds)
        md = dict(metadata or {})
        if tags:
            md.setdefault("tags", list(tags))
        now = _now()
        s = SessionInfo(
            session_id="s" + uuid.uuid4().hex[:20], user=user.name, client=client, state="active",  # type: ignore[arg-type]
            created_at=now, last_heartbeat=now, lease_seconds=lease, metadata=md, run_ids=[],
        )
        self._add_session(s)
        self._save_session(s)
        return s.model_copy(deep=True)

    async def heartbeat(self, user: User, session_id: str) -> SessionInfo:
        """Extend the lease. ``GoneError`` once the session expired or closed."""
        self._ensure_reaper()
        s = self._active_session(user, session_id)
        s.last_heartbeat = _now()
        self._save_session(s)
        return s.model_copy(deep=True)

    async def get_session(self, user: User, session_id: str) -> SessionInfo:
        """Re-attach: a session still within its lease is extended by this call."""
        self._ensure_reaper()
        s = self._session(user, session_id)
        if s.state == "active":
            s.last_heartbeat = _now()
            self._save_session(s)
        return s.model_copy(deep=True)

    async def request_stop(self, user: User, session_id: str) -> SessionInfo:
        """Ask the session's training loop to stop at its next step boundary: the flag rides on the replies of
        the session's training calls (``FutureRef.stop_requested``) until the client clears it."""
        s = self._active_session(user, session_id)
        s.stop_requested_at = _now()
        self._save_session(s)
        return s.model_copy(deep=True)

    async def clear_stop(self, user: User, session_id: str) -> SessionInfo:
        s = self._session(user, session_id)
        if s.stop_requested_at is not None:
            s.stop_requested_at = None
            self._save_session(s)
        return s.model_copy(deep=True)

    async def list_sessions(self, user: User) -> list[SessionInfo]:
        return [self._sessions[sid].model_copy(deep=True) for sid in self._user_sessions.get(user.name, ())]

    async def close_session(self, user: User, session_id: str, reason: str = "closed") -> SessionInfo:
        """Checkpoint (auto) and unload the session's adapters; state → closed."""
        s = self._session(user, session_id)
        if s.state == "active":
            await self._end_session(s, "closed", reason)
        return s.model_copy(deep=True)

    async def _end_session(self, s: SessionInfo, state: str, reason: str) -> None:
        s.state = state  # type: ignore[assignment]
        self._active_sessions.discard(s.session_id)
        s.metadata = {**s.metadata, "end_reason": reason}
        self._save_session(s)
        for run_id in list(s.run_ids):
            run = self._runs.get(run_id)
            if run is not None and run.state == "active":
                await self._unload_run(run, checkpoint=True)

    async def _unload_run(self, run: RunInfo, *, checkpoint: bool, new_state: str = "unloaded") -> None:
        extra = self._extra[run.run_id]
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
            log.info("remove_adapter(%s): %s", run.run_id, _unwrap(e))
        self._set_run_state(run, new_state)
        self._save_run(run)

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
        times = [self._next_prune]
        if self._lease_heap:
            times.append(self._lease_heap[0][0] + _REAP_SLACK_S)
        if self._ckpt_expiry:
            times.append(self._ckpt_expiry[0][0] + _REAP_SLACK_S)
        if self._done_futures:
            times.append(self._done_futures[0][0] + self.config.persistence.future_ttl_seconds + _REAP_SLACK_S)
        return min(times)

    async def reap(self, now: float | None = None) -> None:
        """One reaper tick: expire lapsed sessions (checkpoint + unload), drop old futures and checkpoints.
        Work is proportional to what expires, not to the number of stored sessions/runs/checkpoints."""
        now = now or _now()
        lapsed = []
        heap = self._lease_heap
        while heap and heap[0][0] < now:
            _, sid = heapq.heappop(heap)
            s = self._sessions.get(sid)
            if s is None or s.state != "active" or sid not in self._active_sessions:
                continue
            deadline = s.last_heartbeat + s.lease_seconds
            if now - s.last_heartbeat > s.lease_seconds:
                lapsed.append(s)
            else:  # heart-beaten since: look again at its new deadline
                heapq.heappush(heap, (deadline, sid))
        for s in lapsed:
            log.info("session %s of %s: lease lapsed, unloading its adapters", s.session_id, s.user)
            await self._end_session(s, "expired", "lease expired")
        ttl_cut = now - self.config.persistence.future_ttl_seconds
        done = self._done_futures
        while done and done[0][0] < ttl_cut:
            _, fid = done.popleft()
            fut = self._futures.get(fid)
            if fut is not None and fut.state is not None and fut.done_at < ttl_cut:
                del self._futures[fid]
        if now >= self._next_prune:
            self.store.prune_futures(now)
            self._next_prune = now + _PRUNE_EVERY_S
        expiry = self._ckpt_expiry
        while expiry and expiry[0][0] < now:
            _, key = heapq.heappop(expiry)
            ck = self._ckpts.get(key)
            if ck is not None and ck.info.expires_at is not None and ck.info.expires_at < now:
                self._drop_checkpoint(key)

    # ---- runs --------------------------------------------------------------------------------------------
    def _worker(self, base_model: str, replica: int) -> Any:
        reps = self.workers[base_model]
        return reps[replica % len(reps)]

    def _model_cfg(self, base_model: str, field: str = "base_model") -> Any:
        m = self.config.model(base_model) if isinstance(base_model, str) else None
        if m is None:
            names = [x.served_name for x in self.config.models]
            raise InvalidInputError(f"base model {base_model!r} is not served here (served: {names})", field=field)
        return m

    def _run(self, user: User, run_id: str, field: str = "run_id") -> RunInfo:
        run = self._runs.get(run_id) if isinstance(run_id, str) else None
        if run is None or run.user != user.name or run.state == "deleted":
            raise NotFoundError(f"run {run_id!r} not found", field=field)
        return run

    def _active_run(self, user: User, run_id: str) -> RunInfo:
        run = self._run(user, run_id)
        if run.state == "lost":
            raise StateLostError(
                f"run {run_id!r} lost its adapter (server restart or worker failure); "
                f"resume it from a checkpoint (last: {run.last_checkpoint})", field="run_id",
            )
        if run.state != "active":
            raise InvalidInputError(
                f"run {run_id!r} is {run.state}; resume it from a checkpoint (last: {run.last_checkpoint})",
                field="run_id",
            )
        return run

    def _save_run(self, run: RunInfo) -> None:
        row = run.model_dump(mode="json")
        row["_replica"] = self._extra[run.run_id].replica
        self.store.put_run(row)

    def _check_capacity(self, user: User, m: Any, lora: LoraConfig) -> int:
        if lora.rank > m.max_lora_rank:
            raise LimitExceededError(
                f"LoRA rank {lora.rank} exceeds this model's max_lora_rank {m.max_lora_rank}", field="lora.rank"
            )
        active = [self._runs[rid] for rid in self._active_runs]
        mine = sum(1 for r in active if r.user == user.name)
        if mine >= self.config.limits.max_adapters_per_user:
            raise LimitExceededError(
                f"user {user.name!r} already holds {mine} active runs (limit "
                f"{self.config.limits.max_adapters_per_user}); delete or close one first", field="lora",
            )
        counts = [0] * m.replicas
        for r in active:
            if r.base_model == m.served_name:
                counts[self._extra[r.run_id].replica % m.replicas] += 1
        replica = min(range(m.replicas), key=lambda i: counts[i])
        if counts[replica] >= m.max_adapters:
            raise LimitExceededError(
                f"model {m.served_name!r} is full ({m.max_adapters} adapters per replica x {m.replicas}); "
                "retry after other sessions close", field="base_model",
            )
        return replica

    def _next_run_id(self, s: SessionInfo) -> str:
        n = 0
        prefix = f"{s.session_id}:train:"
        for rid in s.run_ids:
            if rid.startswith(prefix):
                tail = rid[len(prefix):]
                if tail.isdigit():
                    n = max(n, int(tail) + 1)
        return f"{prefix}{n}"

    def _claim_run_id(self, user: User, s: SessionInfo, run_id: str | None) -> tuple[str, RunInfo | None]:
        if run_id is None:
            return self._next_run_id(s), None
        if not isinstance(run_id, str) or not run_id.startswith(f"{s.session_id}:train:"):
            raise InvalidInputError(f"run id {run_id!r} must be {s.session_id}:train:<n>", field="run_id")
        existing = self._runs.get(run_id)
        if existing is not None:
            if existing.user != user.name:
                raise NotFoundError(f"run {run_id!r} not found", field="run_id")
            return run_id, existing
        return run_id, None

    def _new_run(
        self, user: User, s: SessionInfo, run_id: str, base_model: str, lora: LoraConfig, replica: int,
        name: str | None, metadata: dict[str, Any] | None,
    ) -> RunInfo:
        now = _now()
        run = RunInfo(
            run_id=run_id, session_id=s.session_id, user=user.name, base_model=base_model, lora=lora, name=name,
            state="active", step=0, created_at=now, last_request_time=now, metadata=dict(metadata or {}),
        )
        self._extra[run_id] = _RunExtra(replica=replica)
        self._add_run(run)
        s.run_ids.append(run_id)
        s.last_heartbeat = now
        self._save_session(s)
        self._save_run(run)
        return run

    def _completed(self, user: User, typ: str, run_id: str | None, result: Any) -> FutureRef:
        fut = _Future(future_id="f" + uuid.uuid4().hex, user=user.name, type=typ, run_id=run_id)
        self._futures[fut.future_id] = fut
        self._finish(fut, result, None)
        return FutureRef(future_id=fut.future_id, run_id=run_id)

    async def create_run(
        self, user: User, *, session_id: str, base_model: str, lora: LoraConfig,
        run_id: str | None = None, name: str | None = None, metadata: dict[str, Any] | None = None,
    ) -> FutureRef:
        """Place a new adapter on a worker replica. ``run_id`` given (Tinker: ``{sid}:train:{n}``) makes the
        call idempotent: the same id for the same user returns the existing run's future. Result: RunInfo."""
        self._ensure_reaper()
        s = self._active_session(user, session_id)
        m = self._model_cfg(base_model)
        rid, existing = self._claim_run_id(user, s, run_id)
        if existing is not None:
            return await self._existing_run_future(user, existing)
        replica = self._check_capacity(user, m, lora)
        run = self._new_run(user, s, rid, m.served_name, lora, replica, name, metadata)
        worker = self._worker(m.served_name, replica)

        async def _go() -> RunInfo:
            await worker.create_adapter(rid, lora)
            return run.model_copy(deep=True)

        return self._spawn(user, "create_run", rid, _go(), ready_for=rid)

    async def _existing_run_future(self, user: User, run: RunInfo) -> FutureRef:
        extra = self._extra[run.run_id]
        if extra.ready is not None and not extra.ready.done():
            async def _wait() -> RunInfo:
                await asyncio.shield(extra.ready)  # type: ignore[arg-type]
                return run.model_copy(deep=True)
            return self._spawn(user, "create_run", run.run_id, _wait())
        return self._completed(user, "create_run", run.run_id, run.model_copy(deep=True))

    async def get_run(self, user: User, run_id: str) -> RunInfo:
        return self._run(user, run_id).model_copy(deep=True)

    async def list_runs(self, user: User, *, limit: int = 100, offset: int = 0) -> tuple[list[RunInfo], int]:
        if limit < 0 or offset < 0:
            raise InvalidInputError("limit and offset must be >= 0", field="limit" if limit < 0 else "offset")
        mine = sorted(
            (r for r in (self._runs[rid] for rid in self._user_runs.get(user.name, ())) if r.state != "deleted"),
            key=lambda r: r.created_at, reverse=True,
        )
        return [r.model_copy(deep=True) for r in mine[offset:offset + limit]], len(mine)

    async def delete_run(self, user: User, run_id: str) -> RunInfo:
        run = self._run(user, run_id)
        if run.state == "active":
            await self._unload_run(run, checkpoint=False, new_state="deleted")
        else:
            self._set_run_state(run, "deleted")
            self._save_run(run)
        return run.model_copy(deep=True)

    async def get_metrics(self, user: User, run_id: str) -> MetricHistory:
        run = self._run(user, run_id)
        return MetricHistory(run_id=run.run_id, points=list(self._extra[run.run_id].metrics))

    def _record_metrics(self, run: RunInfo, kind: str, metrics: dict[str, Any] | None) -> None:
        clean = {}
        for k, v in (metrics or {}).items():
            try:
                clean[str(k)] = float(v)
            except (TypeError, ValueError):
                continue
        run.last_request_time = _now()
        if clean:
            run.last_metrics = {**run.last_metrics, **clean}
            pts = self._extra[run.run_id].metrics
            pts.append(MetricPoint(step=run.step, time=run.last_request_time, kind=kind, metrics=clean))
            if len(pts) > _MAX_METRIC_POINTS:
                del pts[: len(pts) - _MAX_METRIC_POINTS]
        self._save_run(run)

    def _check_tokens(self, m: Any, n: int, field: str) -> None:
        limit = min(m.max_tokens_per_request, self.config.limits.max_tokens_per_request)
        if n > limit:
            raise LimitExceededError(f"{n} tokens in one request exceed the limit of {limit}", field=field)

    async def submit(self, user: User, run_id: str, op: Op, *, seq_id: int | None = None) -> FutureRef:
        """Queue a training op on the run's worker. Validation errors raise here (before a future exists)."""
        self._ensure_reaper()
        run = self._active_run(user, run_id)
        if seq_id is not None and (isinstance(seq_id, bool) or not isinstance(seq_id, int) or seq_id < 0):
            raise InvalidInputError("seq_id must be a non-negative integer", field="seq_id")
        extra = self._extra[run.run_id]
        worker = self._worker(run.base_model, extra.replica)
        sess = self._sessions.get(run.session_id)
        if sess is not None and sess.state == "active":
            sess.last_heartbeat = _now()  # training traffic keeps the lease alive too
        replay = seq_id is not None and run.last_seq_id is not None and seq_id <= run.last_seq_id
        if seq_id is not None and not replay:
            run.last_seq_id = seq_id
        try:
            typ, go = self._prepare(user, run, worker, op, seq_id, replay=replay)
        except TwinkleError:
            # refused here: tell the worker the seq_id is consumed, so the run's next ops do not wait for it
            self._skip_on_worker(worker, run.run_id, seq_id)
            raise
        ref = self._spawn(user, typ, run.run_id, go, after=extra.ready)
        if sess is not None and sess.stop_requested_at is not None:
            ref.stop_requested = True
        return ref

    async def skip_seq(self, user: User, run_id: str, seq_id: int | None) -> None:
        """A front door refused a request of ``run_id`` carrying ``seq_id`` before calling :meth:`submit`
        (e.g. a body that failed validation): mark the seq_id consumed so the run's later ops do not wait for
        it. Unknown/foreign runs and bad seq ids are ignored."""
        if seq_id is None or isinstance(seq_id, bool) or not isinstance(seq_id, int) or seq_id < 0:
            return
        run = self._runs.get(run_id) if isinstance(run_id, str) else None
        if run is None or run.user != user.name or run.state != "active":
            return
        if seq_id > (run.last_seq_id or 0):
            run.last_seq_id = seq_id
        self._skip_on_worker(self._worker(run.base_model, self._extra[run.run_id].replica), run.run_id, seq_id)

    def _skip_on_worker(self, worker: Any, run_id: str, seq_id: int | None) -> None:
        skip = getattr(worker, "skip", None)
        if seq_id is None or skip is None:
            return

        async def _go() -> None:
            try:
                await skip(run_id, seq_id)
            except Exception as e:  # the worker lost the adapter: nothing waits for the seq_id then
                log.info("skip(%s, %s): %s", run_id, seq_id, _unwrap(e))

        asyncio.get_running_loop().create_task(_go()).add_done_callback(_swallow)

    def _prepare(
        self, user: User, run: RunInfo, worker: Any, op: Op, seq_id: int | None, *, replay: bool = False,
    ) -> tuple[str, Any]:
        """Validate ``op`` for ``run``; returns ``(future type, coroutine that executes it)``. ``replay``: the
        seq_id was seen before (a client retry), so checks of state the first execution changed are left to the
        worker, which answers a repeated seq_id from its first execution."""
        m = self._model_cfg(run.base_model)
        if isinstance(op, ForwardBackwardOp):
            if not op.data:
                raise InvalidInputError("data must hold at least one datum", field="data")
            self._check_tokens(m, sum(d.model_input.length for d in op.data), "data")
            typ = "forward" if op.forward_only else "forward_backward"
            weight = loss_weight_and_tokens(op.data)[0]

            async def _go() -> Any:
                out = await worker.execute(run.run_id, op, seq_id=seq_id)
                if not isinstance(out, ForwardBackwardOutput):
                    out = ForwardBackwardOutput.model_validate(out)
                if not op.forward_only:
                    self._record_metrics(run, typ, _with_mean_loss(out.metrics, weight))
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
                self._record_metrics(run, typ, out.metrics)
                return out
        elif isinstance(op, SaveOp):
            typ = "save"
            key = self._ckpt_key(run, op)
            if key in self._ckpts and not op.overwrite and not replay:
                raise InvalidInputError(
                    f"checkpoint {op.name!r} of run {run.run_id!r} already exists (pass overwrite=true)", field="name"
                )

            async def _go() -> Any:
                return await self._do_save(run, worker, op, seq_id)
        elif isinstance(op, LoadOp):
            typ = "load"
            ck = self._resolve_checkpoint(user, op.checkpoint, run=run)

            async def _go() -> Any:
                await worker.execute(run.run_id, op, seq_id=seq_id, path=ck.dir)
                if op.optimizer:
                    run.step = ck.info.step
                self._record_metrics(run, "load", {})
                return {"run_id": run.run_id, "path": ck.info.path, "model_id": run.run_id, "step": run.step}
        elif isinstance(op, (SetOptimizerOp, SetSchedulerOp)):
            typ = op.type

            async def _go() -> Any:
                out = await worker.execute(run.run_id, op, seq_id=seq_id)
                return _jsonable(out) if out is not None else {"run_id": run.run_id}
        else:
            raise InvalidInputError(f"unknown operation {getattr(op, 'type', op)!r}", field="type")
        return typ, _go()

    # ---- checkpoints -------------------------------------------------------------------------------------
    def _ckpt_key(self, run: RunInfo, op: SaveOp) -> tuple[str, str, str]:
        validate_checkpoint_name(op.name, "name")
        if op.kind not in _KIND_DIR:
            raise InvalidInputError(f"kind must be 'training' or 'sampler', not {op.kind!r}", field="kind")
        if op.ttl_seconds is not None and op.ttl_seconds <= 0:
            raise InvalidInputError("ttl_seconds must be > 0", field="ttl_seconds")
        return (run.run_id, op.kind, op.name)

    def _ckpt_dir(self, run: RunInfo, kind: str, name: str) -> Path:
        d = (self.checkpoint_root / run.user / run.run_id / kind / name).resolve()
        if self.checkpoint_root not in d.parents:
            raise InvalidInputError(f"checkpoint name {name!r} escapes the checkpoint root", field="name")
        return d

    async def _do_save(self, run: RunInfo, worker: Any, op: SaveOp, seq_id: int | None) -> CheckpointInfo:
        key = self._ckpt_key(run, op)
        d = self._ckpt_dir(run, op.kind, op.name)
        if not op.overwrite and key not in self._ckpts and d.exists():
            # a directory no checkpoint record points at (left by an old process): replacing it loses nothing
            op = dataclasses.replace(op, overwrite=True)
        # The worker writes into a temporary sibling and renames it into place (replacing the old checkpoint
        # only once the new one is complete), so a failed save never loses an existing checkpoint.
        out = await worker.execute(run.run_id, op, seq_id=seq_id, path=str(d))
        size = out.get("size_bytes") if isinstance(out, dict) else None
        if size is None and d.exists():
            size = sum(p.stat().st_size for p in d.rglob("*") if p.is_file())
        now = _now()
        info = CheckpointInfo(
            checkpoint_id=f"{_KIND_DIR[op.kind]}/{op.name}", run_id=run.run_id, name=op.name, kind=op.kind,  # type: ignore[arg-type]
            path=f"tinker://{run.run_id}/{_KIND_DIR[op.kind]}/{op.name}", created_at=now, step=run.step,
            size_bytes=size, expires_at=(now + op.ttl_seconds) if op.ttl_seconds else None,
        )
        self._add_ckpt(key, _Ckpt(info, run.user, str(d)))
        self.store.put_checkpoint(info.model_dump(mode="json"), run.user, str(d))
        if op.kind == "training":
            run.last_checkpoint = info.path
        self._record_metrics(run, "save", {})
        return info.model_copy()

    def _resolve_checkpoint(self, user: User, ref: str, run: RunInfo | None = None, field: str = "checkpoint") -> _Ckpt:
        """A ``tinker://`` path (own or public) or, with ``run``, a bare name of that run's checkpoints."""
        if isinstance(ref, str) and not ref.startswith("tinker://") and run is not None:
            validate_checkpoint_name(ref, field)
            for kind in ("training", "sampler"):
                ck = self._ckpts.get((run.run_id, kind, ref))
                if ck is not None:
                    return ck
            raise NotFoundError(f"checkpoint {ref!r} of run {run.run_id!r} not found", field=field)
        run_id, kind, name = parse_checkpoint_path(ref, field)
        ck = self._ckpts.get((run_id, kind, name))
        if ck is None or (ck.user != user.name and not ck.info.public):
            raise NotFoundError(f"checkpoint {ref!r} not found", field=field)
        if not Path(ck.dir).exists():
            raise NotFoundError(f"checkpoint {ref!r} has no files on disk any more", field=field)
        return ck

    async def resume_run(
        self, user: User, *, session_id: str, checkpoint: str, optimizer: bool = True,
        run_id: str | None = None, metadata: dict[str, Any] | None = None,
    ) -> FutureRef:
        """Create a run from a checkpoint (Tinker create-via-load). Result: RunInfo."""
        self._ensure_reaper()
        s = self._active_session(user, session_id)
        ck = self._resolve_checkpoint(user, checkpoint)
        src = self._runs.get(ck.info.run_id)
        lora, base_model = self._checkpoint_model(ck, src)
        m = self._model_cfg(base_model, field="checkpoint")
        rid, existing = self._claim_run_id(user, s, run_id)
        if existing is not None:
            return await self._existing_run_future(user, existing)
        replica = self._check_capacity(user, m, lora)
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
            self._save_run(run)
            return run.model_copy(deep=True)

        return self._spawn(user, "create_run", rid, _go(), ready_for=rid)

    def _checkpoint_model(self, ck: _Ckpt, src: RunInfo | None) -> tuple[LoraConfig, str]:
        if src is not None:
            return src.lora.model_copy(), src.base_model
        import json

        meta = Path(ck.dir) / "twinkle_checkpoint.json"
        try:
            data = json.loads(meta.read_text())
            return LoraConfig.model_validate(data.get("lora") or {}), str(data["base_model"])
        except Exception:
            raise NotFoundError(f"checkpoint {ck.info.path!r} has no readable metadata", field="checkpoint") from None

    async def list_checkpoints(self, user: User, run_id: str | None = None) -> list[CheckpointInfo]:
        if run_id is not None:
            self._run(user, run_id)
        out = [
            c.info.model_copy() for c in (self._ckpts[k] for k in self._user_ckpts.get(user.name, ()))
            if run_id is None or c.info.run_id == run_id
        ]
        return sorted(out, key=lambda c: c.created_at)

    async def get_checkpoint(self, user: User, path: str) -> CheckpointInfo:
        """Resolve a ``tinker://`` path the user may read (own, or published)."""
        run_id, kind, name = parse_checkpoint_path(path, "path")
        ck = self._ckpts.get((run_id, kind, name))
        if ck is None or (ck.user != user.name and not ck.info.public):
            raise NotFoundError(f"checkpoint {path!r} not found", field="path")
        return ck.info.model_copy()

    def _own_ckpt(self, user: User, run_id: str, checkpoint_id: str) -> tuple[tuple[str, str, str], _Ckpt]:
        if not isinstance(checkpoint_id, str) or checkpoint_id.count("/") != 1:
            raise InvalidInputError(
                f"checkpoint id {checkpoint_id!r} must be weights/<name> or sampler_weights/<name>",
                field="checkpoint_id",
            )
        kdir, name = checkpoint_id.split("/")
        kind = _DIR_KIND.get(kdir, kdir if kdir in _KIND_DIR else None)
        if kind is None:
            raise InvalidInputError(f"unknown checkpoint kind {kdir!r}", field="checkpoint_id")
        validate_checkpoint_name(name, "checkpoint_id")
        key = (run_id, kind, name)
        ck = self._ckpts.get(key)
        if ck is None or ck.user != user.name:
            raise NotFoundError(f"checkpoint {checkpoint_id!r} of run {run_id!r} not found", field="checkpoint_id")
        return key, ck

    def _drop_checkpoint(self, key: tuple[str, str, str]) -> _Ckpt | None:
        ck = self._ckpts.pop(key, None)
        if ck is None:
            return None
        self._user_ckpts.get(ck.user, {}).pop(key, None)
        self.store.delete_checkpoint(*key)
        d = Path(ck.dir)
        if self.checkpoint_root in d.parents:
            shutil.rmtree(d, ignore_errors=True)
        return ck

    async def delete_checkpoint(self, user: User, run_id: str, checkpoint_id: str) -> CheckpointInfo:
        key, ck = self._own_ckpt(user, run_id, checkpoint_id)
        self._drop_checkpoint(key)
        return ck.info.model_copy()

    async def set_checkpoint_ttl(self, user: User, run_id: str, checkpoint_id: str, ttl_seconds: float | None) -> CheckpointInfo:
        key, ck = self._own_ckpt(user, run_id, checkpoint_id)
        if ttl_seconds is not None and ttl_seconds <= 0:
            raise InvalidInputError("ttl_seconds must be > 0 (or null for no expiry)", field="ttl_seconds")
        ck.info.expires_at = (_now() + ttl_seconds) if ttl_seconds else None
        self._track_expiry(key, ck)
        self.store.put_checkpoint(ck.info.model_dump(mode="json"), ck.user, ck.dir)
        return ck.info.model_copy()

    async def set_checkpoint_public(self, user: User, run_id: str, checkpoint_id: str, public: bool) -> CheckpointInfo:
        _, ck = self._own_ckpt(user, run_id, checkpoint_id)
        ck.info.public = bool(public)
        self.store.put_checkpoint(ck.info.model_dump(mode="json"), ck.user, ck.dir)
        return ck.info.model_copy()

    # ---- sampling ----------------------------------------------------------------------------------------
    async def create_sampler(
        self, user: User, *, session_id: str, sampler_id: str | None = None,
        base_model: str | None = None, checkpoint: str | None = None, run_id: str | None = None,
    ) -> dict[str, Any]:
        """Register a sampler (base model, a checkpoint path, or a run's live weights).
        Returns ``{"sampler_id", "base_model", "model_path"}``."""
        s = self._active_session(user, session_id)
        if sampler_id is not None:
            if not isinstance(sampler_id, str) or not sampler_id.startswith(f"{s.session_id}:sample:"):
                raise InvalidInputError(f"sampler id must be {s.session_id}:sample:<n>", field="sampler_id")
            old = self._samplers.get(sampler_id)
            if old is not None:
                if old["user"] != user.name:
                    raise NotFoundError(f"sampler {sampler_id!r} not found", field="sampler_id")
                return {k: old[k] for k in ("sampler_id", "base_model", "model_path")}
        else:
            n = self._session_samplers.get(s.session_id, 0)
            sampler_id = f"{s.session_id}:sample:{n}"
            while sampler_id in self._samplers:
                n += 1
                sampler_id = f"{s.session_id}:sample:{n}"
        model_path = None
        if checkpoint is not None:
            ck = self._resolve_checkpoint(user, checkpoint)
            src = self._runs.get(ck.info.run_id)
            _, bm = self._checkpoint_model(ck, src)
            if base_model is not None and self._model_cfg(base_model).served_name != bm:
                raise InvalidInputError(f"checkpoint {checkpoint!r} belongs to base model {bm!r}", field="base_model")
            base_model, model_path = bm, ck.info.path
        elif run_id is not None:
            run = self._active_run(user, run_id)
            base_model = run.base_model
        elif base_model is None:
            raise InvalidInputError("give base_model, checkpoint or run_id", field="base_model")
        m = self._model_cfg(base_model)  # type: ignore[arg-type]
        row = {
            "sampler_id": sampler_id, "user": user.name, "session_id": s.session_id, "base_model": m.served_name,
            "model_path": model_path, "run_id": run_id, "created_at": _now(),
        }
        self._samplers[sampler_id] = row
        self._count_sampler(sampler_id)
        self.store.put_sampler(row)
        return {k: row[k] for k in ("sampler_id", "base_model", "model_path")}

    async def get_sampler(self, user: User, sampler_id: str) -> dict[str, Any]:
        row = self._samplers.get(sampler_id) if isinstance(sampler_id, str) else None
        if row is None or row["user"] != user.name:
            raise NotFoundError(f"sampler {sampler_id!r} not found", field="sampler_id")
        return {k: row[k] for k in ("sampler_id", "base_model", "model_path")}

    async def sample(
        self, user: User, op: SampleOp, *, sampler_id: str | None = None, base_model: str | None = None,
        run_id: str | None = None, checkpoint: str | None = None,
    ) -> FutureRef:
        self._ensure_reaper()
        if sampler_id is not None:
            row = self._samplers.get(sampler_id) if isinstance(sampler_id, str) else None
            if row is None or row["user"] != user.name:
                raise NotFoundError(f"sampler {sampler_id!r} not found", field="sampler_id")
            base_model, run_id, checkpoint = row["base_model"], row.get("run_id"), row.get("model_path")
        adapter_id: str | None = None
        ck_dir: str | None = None
        replica: int | None = None
        after = None
        if run_id is not None:
            run = self._active_run(user, run_id)
            base_model, adapter_id = run.base_model, run.run_id
            replica = self._extra[run.run_id].replica
            after = self._extra[run.run_id].ready
        elif checkpoint is not None:
            ck = self._resolve_checkpoint(user, checkpoint)
            _, bm = self._checkpoint_model(ck, self._runs.get(ck.info.run_id))
            base_model, ck_dir = bm, ck.dir
        if base_model is None:
            raise InvalidInputError("give sampler_id, base_model, run_id or checkpoint", field="base_model")
        m = self._model_cfg(base_model)
        if not op.prompt:
            raise InvalidInputError("prompt must hold at least one token", field="prompt")
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
            replica = self._least_loaded_replica(m.served_name)
        worker = self._worker(m.served_name, replica)

        async def _go() -> Any:
            out = await worker.sample(op, adapter_id=adapter_id, checkpoint_path=ck_dir)
            return out if isinstance(out, SampleResponse) else SampleResponse.model_validate(out)

        return self._spawn(user, "sample", run_id, _go(), after=after)

    def _least_loaded_replica(self, base_model: str) -> int:
        n = len(self.workers[base_model])
        if n == 1:
            return 0
        counts = [0] * n
        for r in (self._runs[rid] for rid in self._active_runs):
            if r.base_model == base_model:
                counts[self._extra[r.run_id].replica % n] += 1
        return min(range(n), key=lambda i: counts[i])

    # ---- futures -----------------------------------------------------------------------------------------
    def _spawn(
        self, user: User, typ: str, run_id: str | None, coro: Any, *, after: asyncio.Future[Any] | None = None,
        ready_for: str | None = None,
    ) -> FutureRef:
        fut = _Future(future_id="f" + uuid.uuid4().hex, user=user.name, type=typ, run_id=run_id)
        self._futures[fut.future_id] = fut

        async def _runner() -> Any:
            try:
                if after is not None and not after.done():
                    await asyncio.shield(after)
                result = await coro
            except BaseException as exc:
                coro.close()
                err = _unwrap(exc)
                if isinstance(err, asyncio.CancelledError):
                    err = InternalError("the request was cancelled (server shutting down)")
                if not isinstance(err, TwinkleError):
                    rid = uuid.uuid4().hex[:12]
                    log.error("request %s (%s on %s) failed [request id %s]", fut.future_id, typ, run_id, rid,
                              exc_info=(type(err), err, err.__traceback__))
                    err = InternalError(f"internal error (request id {rid})", detail={"request_id": rid})
                self._finish(fut, None, err)
                raise err from None
            self._finish(fut, result, None)
            return result

        task = asyncio.get_running_loop().create_task(_runner())
        fut.task = task
        if ready_for is not None:
            self._extra[ready_for].ready = task
            task.add_done_callback(lambda t: self._on_ready(ready_for, t))
        else:
            task.add_done_callback(_swallow)
        return FutureRef(future_id=fut.future_id, run_id=run_id)

    def _on_ready(self, run_id: str, task: asyncio.Task[Any]) -> None:
        _swallow(task)
        if task.cancelled() or task.exception() is not None:
            run = self._runs.get(run_id)
            if run is not None and run.state == "active":
                self._set_run_state(run, "lost")
                self._save_run(run)

    def _finish(self, fut: _Future, result: Any, err: TwinkleError | None) -> None:
        fut.done_at = _now()
        self._done_futures.append((fut.done_at, fut.future_id))
        if err is None:
            fut.state = FutureState(future_id=fut.future_id, status="complete", type=fut.type, result=result)
        else:
            body = err.to_dict()
            body["status"] = err.status
            fut.state = FutureState(future_id=fut.future_id, status="failed", type=fut.type, error=body)
        fut.event.set()
        # Persist after the waiters have answered (a long-poll woken by ``event.set`` runs first): the row only
        # serves reads after a gateway restart, and serializing a result + an SQLite write is not free.
        try:
            asyncio.get_running_loop().call_soon(self._persist_future, fut, result)
        except RuntimeError:  # no running loop (synchronous use)
            self._persist_future(fut, result)

    def _persist_future(self, fut: _Future, result: Any) -> None:
        assert fut.state is not None
        try:
            row = {
                "future_id": fut.future_id, "status": fut.state.status, "type": fut.type,
                "result": _jsonable(result), "error": fut.state.error, "run_id": fut.run_id,
            }
            self.store.put_future(fut.future_id, fut.user, fut.done_at + self.config.persistence.future_ttl_seconds, row)
        except Exception:
            log.exception("could not persist the result of future %s", fut.future_id)

    async def wait(self, user: User, future_id: str, timeout: float = 30.0) -> FutureState:
        """Long-poll: returns as soon as the future completes, or ``status=pending`` after ``timeout``."""
        fut = self._futures.get(future_id) if isinstance(future_id, str) else None
        if fut is None:
            row = self.store.get_future(future_id) if isinstance(future_id, str) else None
            if row is None or row[0] != user.name:
                raise NotFoundError(f"future {future_id!r} not found (or expired)", field="future_id")
            d = row[1]
            return FutureState(future_id=future_id, status=d["status"], type=d.get("type"),
                               result=d.get("result"), error=d.get("error"))
        if fut.user != user.name:
            raise NotFoundError(f"future {future_id!r} not found (or expired)", field="future_id")
        if fut.state is None and timeout > 0:
            try:
                await asyncio.wait_for(fut.event.wait(), timeout)
            except asyncio.TimeoutError:
                pass
        if fut.state is not None:
            return fut.state
        return FutureState(future_id=future_id, status="pending", type=fut.type)

    def future_run_id(self, user: User, future_id: str) -> str | None:
        fut = self._futures.get(future_id)
        return fut.run_id if fut is not None and fut.user == user.name else None

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
            ))
        return Capabilities(version=_VERSION, base_models=models)

    async def status(self) -> ServerStatus:
        await self._refresh_model_info()
        workers: list[WorkerStatus] = []
        for m in self.config.models:
            for i, w in enumerate(self.workers[m.served_name]):
                try:
                    st = await w.status()
                except Exception as e:
                    log.warning("status of %s[%d] failed: %s", m.served_name, i, _unwrap(e))
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
            sessions_active=len(self._active_sessions),
            runs_active=len(self._active_runs),
            workers=workers,
        )


def _swallow(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()


# CreateAdapterOp is part of the worker op vocabulary; re-exported for workers that dispatch on it.
_ = CreateAdapterOp
