"""Tinker routes: save_weights, save_weights_for_sampler (named or ephemeral), save_weights_external,
load_weights (create-via-load or into an existing run)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from twinkle.types import InvalidInputError, TwinkleError

from ..export import parse_recipients
from ..ops import LoadOp, SaveOp
from ..service import Service, User
from ._common import (
    TinkerRoute,
    checkpoint_name,
    refused,
    session_of,
    submit_once,
    tag,
    tinker_service,
    tinker_user,
)
from .models import LoadWeightsRequest, SaveWeightsRequest
from .training import check_optimizer_config

__all__ = ["router"]

router = APIRouter(route_class=TinkerRoute, tags=["tinker: weights"])
_svc = Depends(tinker_service)
_who = Depends(tinker_user)

_EPHEMERAL_TTL_S = 86400.0


def _save_op(body: SaveWeightsRequest, route: str) -> tuple[SaveOp, tuple[Any, ...]]:
    if route == "save_weights_for_sampler" and body.path is None:
        n = body.sampling_session_seq_id
        if n is None:
            raise InvalidInputError("an ephemeral sampler save needs sampling_session_seq_id (or give a path)",
                                    field="sampling_session_seq_id")
        sampler_id = f"{session_of(body.model_id)}:sample:{n}"
        op = SaveOp(name=f"ephemeral-s{n}-q{body.seq_id}", kind="sampler", ttl_seconds=_EPHEMERAL_TTL_S,
                    overwrite=True)
        return op, ("eph", sampler_id)
    name = checkpoint_name(body.path, "path")
    kind = {"save_weights": "training", "save_weights_external": "external"}.get(route, "sampler")
    recipients = parse_recipients(body.age_encryption_recipients) if kind == "external" else ()
    return SaveOp(name=name, kind=kind, ttl_seconds=body.ttl_seconds, overwrite=body.overwrite,
                  age_recipients=recipients), ("save",)


async def _save(body: SaveWeightsRequest, route: str, user: User, service: Service) -> dict[str, Any]:
    try:
        op, parts = _save_op(body, route)
    except TwinkleError:
        await refused(service, user, body.model_id, body.seq_id)
        raise

    async def make() -> str:
        ref = await service.submit(user, body.model_id, op, seq_id=body.seq_id)
        return tag(ref.future_id, *parts)

    rid = await submit_once(service, user, body.model_id, body.seq_id, route, make)
    return {"request_id": rid, "model_id": body.model_id}


@router.post("/save_weights")
async def save_weights(body: SaveWeightsRequest, user: User = _who, service: Service = _svc) -> dict[str, Any]:
    """Weights and optimizer state → ``tinker://<run>/weights/<path>``."""
    return await _save(body, "save_weights", user, service)


@router.post("/save_weights_for_sampler")
async def save_weights_for_sampler(body: SaveWeightsRequest, user: User = _who,
                                   service: Service = _svc) -> dict[str, Any]:
    """Weights only → ``tinker://<run>/sampler_weights/<path>``; without a path, an ephemeral sampler."""
    return await _save(body, "save_weights_for_sampler", user, service)


@router.post("/save_weights_external")
async def save_weights_external(body: SaveWeightsRequest, user: User = _who,
                                service: Service = _svc) -> dict[str, Any]:
    """A peft adapter (adapter_config.json + adapter_model.safetensors) under external_weights/<path>, each
    file age-encrypted (<file>.age) when age_encryption_recipients are given."""
    return await _save(body, "save_weights_external", user, service)


@router.post("/load_weights")
async def load_weights(body: LoadWeightsRequest, user: User = _who, service: Service = _svc) -> dict[str, Any]:
    if body.session_id is not None:  # create-via-load
        if body.model_seq_id is None:
            raise InvalidInputError("create-via-load needs model_seq_id", field="model_seq_id")
        check_optimizer_config(body.optimizer_config)
        run_id = f"{body.session_id}:train:{body.model_seq_id}"
        ref = await service.resume_run(user, session_id=body.session_id, checkpoint=body.path,
                                       optimizer=body.optimizer, run_id=run_id,
                                       metadata=dict(body.user_metadata or {}))
        return {"request_id": tag(ref.future_id, "load", run_id), "model_id": run_id}
    model_id = body.model_id
    if model_id is None:
        raise InvalidInputError("load_weights needs model_id (or session_id + model_seq_id)", field="model_id")
    op = LoadOp(checkpoint=body.path, optimizer=body.optimizer)

    async def make() -> str:
        ref = await service.submit(user, model_id, op, seq_id=body.seq_id)
        return tag(ref.future_id, "load", model_id)

    rid = await submit_once(service, user, model_id, body.seq_id, "load_weights", make)
    return {"request_id": rid, "model_id": model_id}
