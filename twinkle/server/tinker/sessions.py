"""Tinker routes: client config, sessions, heartbeat, telemetry, capabilities, health."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query

from ..service import Service, User
from ._common import TinkerRoute, max_request_bytes, tinker_service, tinker_user
from .client_limits import client_limits
from .models import (
    ClientConfigRequest,
    CreateSessionRequest,
    FinishSessionRequest,
    SessionHeartbeatRequest,
    TelemetryRequest,
)

__all__ = ["CLIENT_CONFIG", "DYNAMIC_CONFIG", "health_router", "router"]

CLIENT_CONFIG: dict[str, Any] = {
    "pjwt_auth_enabled": False,
    "credential_default_source": "api_key",
    "parallel_fwdbwd_chunks": False,
    "proto_compress_fwdbwd": False,
    "sample_use_retrieve_futures": False,
    "sample_join_sampling_session": False,
    "custom_loss_server_side": False,
}
DYNAMIC_CONFIG: dict[str, Any] = {"refresh_interval_sec": 300, "sample_cancel_enabled": False,
                                  "sample_cancel_max_batch_size": 64}

router = APIRouter(route_class=TinkerRoute, tags=["tinker: sessions"])
_svc = Depends(tinker_service)
_who = Depends(tinker_user)


@router.post("/client/config")
async def client_config(body: ClientConfigRequest | None = None, user: User = _who,
                        service: Service = _svc) -> dict[str, Any]:
    """The SDK's first call: feature flags (proto results, no JWT, no parallel chunks) and the request sizes
    the SDK splits forward_backward by."""
    caps = [m.max_tokens_per_request for m in service.capabilities().base_models]
    return {**CLIENT_CONFIG, **client_limits(caps, max_request_bytes(service))}


@router.post("/client/dynamic_config")
async def client_dynamic_config(body: ClientConfigRequest | None = None, user: User = _who) -> dict[str, Any]:
    return dict(DYNAMIC_CONFIG)


health_router = APIRouter(route_class=TinkerRoute, tags=["tinker: sessions"])
"""``GET healthz`` alone: the gateway serves its own, so ``create_router`` leaves this out."""


@health_router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Public: no key needed."""
    return {"status": "ok"}


@router.get("/get_server_capabilities")
async def get_server_capabilities(user: User = _who, service: Service = _svc) -> dict[str, Any]:
    caps = service.capabilities()
    return {"supported_models": [
        {"model_name": m.name, "max_context_length": m.max_length, "trainable": True, "sampleable": True}
        for m in caps.base_models
    ]}


@router.post("/create_session")
async def create_session(body: CreateSessionRequest, user: User = _who, service: Service = _svc) -> dict[str, Any]:
    meta: dict[str, Any] = dict(body.user_metadata or {})
    for k in ("project_id", "display_name", "sdk_version"):
        value = getattr(body, k)
        if value is not None:
            meta.setdefault(k, value)
    info = await service.create_session(user, client="tinker", metadata=meta, tags=list(body.tags))
    return {"type": "create_session", "session_id": info.session_id}


@router.post("/session_heartbeat")
async def session_heartbeat(body: SessionHeartbeatRequest, user: User = _who, service: Service = _svc) -> dict[str, Any]:
    await service.heartbeat(user, body.session_id)
    return {"type": "session_heartbeat"}


@router.post("/sessions/{session_id}/finish")
async def finish_session(session_id: str, body: FinishSessionRequest | None = None, user: User = _who,
                         service: Service = _svc) -> dict[str, Any]:
    reason = body.reason if body is not None else None
    text = reason if isinstance(reason, str) else (reason.type if reason is not None else "finished")
    await service.close_session(user, session_id, reason=text or "finished")
    return {}


@router.post("/telemetry")
async def telemetry(body: TelemetryRequest | None = None, user: User = _who) -> dict[str, Any]:
    return {"status": "accepted"}  # accepted and dropped: we collect nothing


@router.get("/sessions")
async def list_sessions(limit: int = Query(1000, ge=0, le=100000), offset: int = Query(0, ge=0),
                        user: User = _who, service: Service = _svc) -> dict[str, Any]:
    sessions = await service.list_sessions(user)
    return {"sessions": [s.session_id for s in sessions][offset : offset + limit]}


@router.get("/sessions/{session_id}")
async def get_session(session_id: str, user: User = _who, service: Service = _svc) -> dict[str, Any]:
    s = await service.get_session(user, session_id)
    meta = {k: str(v) for k, v in (s.metadata or {}).items() if k not in ("display_name",)}
    return {
        "training_run_ids": list(s.run_ids),
        "sampler_ids": [],
        "user_metadata": meta or None,
        "display_name": (s.metadata or {}).get("display_name"),
    }
