"""The native HTTP API (``/api/v1/twinkle/...``; see ``docs/native-api.md``). Thin: parse → Service → reply."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query

from twinkle.model.images import prompt_arg
from twinkle.types.api import (
    Capabilities,
    CheckpointInfo,
    CheckpointList,
    CreateRunRequest,
    CreateSessionRequest,
    EmptyRequest,
    ForwardRequest,
    FutureRef,
    FutureState,
    LoadCheckpointRequest,
    MetricHistory,
    OptimStepRequest,
    ResumeRunRequest,
    RunInfo,
    RunList,
    SampleRequest,
    SaveCheckpointRequest,
    ServerStatus,
    SessionInfo,
    SessionList,
    SetLRSchedulerRequest,
    SetOptimizerRequest,
)

from .deps import CompactJSONRoute, get_service, get_user
from .ops import ForwardBackwardOp, LoadOp, OptimStepOp, SampleOp, SaveOp, SetOptimizerOp, SetSchedulerOp
from .service import Service, User

__all__ = ["create_native_router", "health_router"]

_MAX_WAIT_S = 60.0


def _native_tokenizer_ids(service: Service) -> Capabilities:
    """Capabilities with a ``tokenizer_id`` a remote client can load: a builtin model's tokenizer is rebuilt
    on the client from its ``builtin://`` id (deterministic), not read from the server's cache path. (The
    Tinker routes keep their own answer.)"""
    caps = service.capabilities()
    for m in caps.base_models:
        cfg = service.config.model(m.name)
        if cfg is not None and cfg.model_id.startswith("builtin://"):
            m.tokenizer_id = cfg.model_id
    return caps


async def _settle(service: Service, user: User, ref: FutureRef, wait: float) -> FutureRef:
    """``?wait=S`` on a future-returning route: answer with the finished state inside the reply when the
    result exists within ``S`` seconds, so a blocking client needs one round trip instead of submit + poll."""
    if wait > 0:
        state = await service.wait(user, ref.future_id, timeout=min(wait, _MAX_WAIT_S))
        if state.status != "pending":
            ref = ref.model_copy(update={"state": state})
    return ref


def _own_view(status: ServerStatus, own: set[str]) -> ServerStatus:
    """``status`` with every other user's run ids replaced by a count (``other_adapters``)."""

    def redact(batch: dict[str, Any] | None) -> dict[str, Any] | None:
        if not batch:
            return batch
        ids = list(batch.get("adapters") or [])
        mine = [a for a in ids if a in own]
        return {**batch, "adapters": mine, "other_adapters": len(ids) - len(mine)}

    for w in status.workers:
        w.last_batch = redact(w.last_batch)
        w.recent_batches = [b for b in (redact(b) for b in w.recent_batches) if b is not None]
    return status


def health_router() -> APIRouter:
    r = APIRouter()

    @r.get("/api/v1/healthz", tags=["server"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return r


def create_native_router() -> APIRouter:
    r = APIRouter(prefix="/api/v1/twinkle", tags=["twinkle"], route_class=CompactJSONRoute)
    svc = Depends(get_service)
    who = Depends(get_user)
    wait_q = Query(0.0, ge=0.0, description="hold the reply up to this many seconds for the result (FutureRef.state)")

    # ---- server ------------------------------------------------------------------------------------------
    @r.get("/capabilities", response_model=Capabilities)
    async def capabilities(user: User = who, service: Service = svc) -> Capabilities:
        await service.refresh_model_info()
        return _native_tokenizer_ids(service)

    @r.get("/status", response_model=ServerStatus)
    async def status(user: User = who, service: Service = svc) -> ServerStatus:
        """Server and worker counters. Batch records name only the caller's own runs (an admin sees all)."""
        status = await service.status()
        if getattr(user, "is_admin", False):
            return status
        runs, _ = await service.list_runs(user, limit=1 << 30)
        return _own_view(status, {r.run_id for r in runs})

    # ---- sessions ----------------------------------------------------------------------------------------
    @r.post("/sessions", response_model=SessionInfo)
    async def create_session(body: CreateSessionRequest, user: User = who, service: Service = svc) -> SessionInfo:
        return await service.create_session(
            user, client="twinkle", metadata=body.metadata, tags=body.tags, lease_seconds=body.lease_seconds
        )

    @r.get("/sessions", response_model=SessionList)
    async def list_sessions(user: User = who, service: Service = svc) -> SessionList:
        return SessionList(sessions=await service.list_sessions(user))

    @r.get("/sessions/{session_id}", response_model=SessionInfo)
    async def get_session(session_id: str, user: User = who, service: Service = svc) -> SessionInfo:
        return await service.get_session(user, session_id)

    @r.post("/sessions/{session_id}/heartbeat", response_model=SessionInfo)
    async def heartbeat(session_id: str, body: EmptyRequest | None = None, user: User = who,
                        service: Service = svc) -> SessionInfo:
        return await service.heartbeat(user, session_id)

    @r.post("/sessions/{session_id}/close", response_model=SessionInfo)
    async def close_session(session_id: str, body: EmptyRequest | None = None, user: User = who,
                            service: Service = svc) -> SessionInfo:
        return await service.close_session(user, session_id)

    @r.post("/sessions/{session_id}/stop", response_model=SessionInfo)
    async def stop_session(session_id: str, body: EmptyRequest | None = None, user: User = who,
                           service: Service = svc) -> SessionInfo:
        return await service.request_stop(user, session_id)

    @r.delete("/sessions/{session_id}/stop", response_model=SessionInfo)
    async def clear_stop(session_id: str, user: User = who, service: Service = svc) -> SessionInfo:
        return await service.clear_stop(user, session_id)

    # ---- runs --------------------------------------------------------------------------------------------
    @r.post("/runs", response_model=FutureRef)
    async def create_run(body: CreateRunRequest, wait: float = wait_q, user: User = who, service: Service = svc) -> FutureRef:
        ref = await service.create_run(
            user, session_id=body.session_id, base_model=body.base_model, lora=body.lora, name=body.name,
            metadata=body.metadata,
        )
        return await _settle(service, user, ref, wait)

    @r.post("/runs/resume", response_model=FutureRef)
    async def resume_run(body: ResumeRunRequest, wait: float = wait_q, user: User = who, service: Service = svc) -> FutureRef:
        ref = await service.resume_run(
            user, session_id=body.session_id, checkpoint=body.checkpoint, optimizer=body.optimizer
        )
        return await _settle(service, user, ref, wait)

    @r.get("/runs", response_model=RunList)
    async def list_runs(
        limit: int = Query(100, ge=0, le=1000), offset: int = Query(0, ge=0), user: User = who,
        service: Service = svc,
    ) -> RunList:
        runs, total = await service.list_runs(user, limit=limit, offset=offset)
        return RunList(runs=runs, total=total)

    @r.get("/runs/{run_id}", response_model=RunInfo)
    async def get_run(run_id: str, user: User = who, service: Service = svc) -> RunInfo:
        return await service.get_run(user, run_id)

    @r.delete("/runs/{run_id}", response_model=RunInfo)
    async def delete_run(run_id: str, user: User = who, service: Service = svc) -> RunInfo:
        return await service.delete_run(user, run_id)

    @r.post("/runs/{run_id}/stop", response_model=SessionInfo)
    async def stop_run(run_id: str, body: EmptyRequest | None = None, user: User = who,
                       service: Service = svc) -> SessionInfo:
        run = await service.get_run(user, run_id)
        return await service.request_stop(user, run.session_id)

    @r.get("/runs/{run_id}/metrics", response_model=MetricHistory)
    async def metrics(run_id: str, user: User = who, service: Service = svc) -> MetricHistory:
        return await service.get_metrics(user, run_id)

    @r.post("/runs/{run_id}/optimizer", response_model=FutureRef)
    async def set_optimizer(run_id: str, body: SetOptimizerRequest, wait: float = wait_q, user: User = who, service: Service = svc) -> FutureRef:
        ref = await service.submit(user, run_id, SetOptimizerOp(optimizer=body.optimizer))
        return await _settle(service, user, ref, wait)

    @r.post("/runs/{run_id}/lr_scheduler", response_model=FutureRef)
    async def set_lr_scheduler(
        run_id: str, body: SetLRSchedulerRequest, wait: float = wait_q, user: User = who, service: Service = svc
    ) -> FutureRef:
        ref = await service.submit(user, run_id, SetSchedulerOp(scheduler=body.scheduler))
        return await _settle(service, user, ref, wait)

    @r.post("/runs/{run_id}/forward", response_model=FutureRef)
    async def forward(run_id: str, body: ForwardRequest, wait: float = wait_q, user: User = who, service: Service = svc) -> FutureRef:
        op = ForwardBackwardOp(data=body.data, loss_fn=body.loss_fn, loss_fn_config=body.loss_fn_config,
                               forward_only=True)
        ref = await service.submit(user, run_id, op, seq_id=body.seq_id)
        return await _settle(service, user, ref, wait)

    @r.post("/runs/{run_id}/forward_backward", response_model=FutureRef)
    async def forward_backward(run_id: str, body: ForwardRequest, wait: float = wait_q, user: User = who, service: Service = svc) -> FutureRef:
        op = ForwardBackwardOp(data=body.data, loss_fn=body.loss_fn, loss_fn_config=body.loss_fn_config)
        ref = await service.submit(user, run_id, op, seq_id=body.seq_id)
        return await _settle(service, user, ref, wait)

    @r.post("/runs/{run_id}/optim_step", response_model=FutureRef)
    async def optim_step(run_id: str, body: OptimStepRequest, wait: float = wait_q, user: User = who, service: Service = svc) -> FutureRef:
        ref = await service.submit(user, run_id, OptimStepOp(adam_params=body.adam_params), seq_id=body.seq_id)
        return await _settle(service, user, ref, wait)

    @r.post("/runs/{run_id}/checkpoints", response_model=FutureRef)
    async def save(run_id: str, body: SaveCheckpointRequest, wait: float = wait_q, user: User = who, service: Service = svc) -> FutureRef:
        op = SaveOp(name=body.name, kind=body.kind, ttl_seconds=body.ttl_seconds, overwrite=body.overwrite)
        ref = await service.submit(user, run_id, op, seq_id=body.seq_id)
        return await _settle(service, user, ref, wait)

    @r.get("/runs/{run_id}/checkpoints", response_model=CheckpointList)
    async def run_checkpoints(run_id: str, user: User = who, service: Service = svc) -> CheckpointList:
        return CheckpointList(checkpoints=await service.list_checkpoints(user, run_id))

    @r.delete("/runs/{run_id}/checkpoints/{kind}/{name}", response_model=CheckpointInfo)
    async def delete_checkpoint(
        run_id: str, kind: str, name: str, user: User = who, service: Service = svc
    ) -> CheckpointInfo:
        return await service.delete_checkpoint(user, run_id, f"{kind}/{name}")

    @r.post("/runs/{run_id}/load", response_model=FutureRef)
    async def load(run_id: str, body: LoadCheckpointRequest, wait: float = wait_q, user: User = who, service: Service = svc) -> FutureRef:
        op = LoadOp(checkpoint=body.checkpoint, optimizer=body.optimizer)
        ref = await service.submit(user, run_id, op, seq_id=body.seq_id)
        return await _settle(service, user, ref, wait)

    @r.get("/checkpoints", response_model=CheckpointList)
    async def all_checkpoints(user: User = who, service: Service = svc) -> CheckpointList:
        return CheckpointList(checkpoints=await service.list_checkpoints(user))

    # ---- sampling ----------------------------------------------------------------------------------------
    @r.post("/sample", response_model=FutureRef)
    async def sample(body: SampleRequest, wait: float = wait_q, user: User = who, service: Service = svc) -> FutureRef:
        op = SampleOp(
            prompt=prompt_arg(body.prompt), num_samples=body.num_samples, params=body.sampling_params,
            prompt_logprobs=body.prompt_logprobs, topk_prompt_logprobs=body.topk_prompt_logprobs,
        )
        ref = await service.sample(
            user, op, base_model=body.base_model, run_id=body.run_id, checkpoint=body.checkpoint,
            session_id=body.session_id,
        )
        return await _settle(service, user, ref, wait)

    # ---- futures -----------------------------------------------------------------------------------------
    @r.get("/futures/{future_id}", response_model=FutureState)
    async def get_future(
        future_id: str, timeout: float = Query(30.0, ge=0.0), user: User = who, service: Service = svc
    ) -> FutureState:
        return await service.wait(user, future_id, timeout=min(timeout, _MAX_WAIT_S))

    return r
