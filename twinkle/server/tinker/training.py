"""Tinker routes: create_model, get_info, forward_backward (protobuf or JSON), forward, optim_step."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import ValidationError

from twinkle.types import AdamParams, InvalidInputError, TwinkleError, UnsupportedError

from ..deps import api_key_from_request, field_of, loads_compact
from ..ops import ForwardBackwardOp, OptimStepOp
from ..service import Service, User
from . import codec
from ._common import (
    PROTO,
    TinkerRoute,
    max_request_bytes,
    max_tokens_any_model,
    refused,
    state_of,
    submit_once,
    tag,
    tinker_service,
    tinker_user,
)
from .models import (
    CreateModelRequest,
    ForwardBackwardBody,
    ForwardBackwardJSON,
    GetInfoRequest,
    OptimizerConfigBody,
    OptimStepRequest,
)

__all__ = ["check_optimizer_config", "router"]

router = APIRouter(route_class=TinkerRoute, tags=["tinker: training"])
_svc = Depends(tinker_service)
_who = Depends(tinker_user)

_FB_BODY = {
    "requestBody": {
        "required": True,
        "description": "a tinker_public ForwardBackwardRequest (protobuf, zstd when Content-Encoding: zstd), "
                       "or the JSON form",
        "content": {
            PROTO: {"schema": {"type": "string", "format": "binary"}},
            "application/json": {"schema": {"$ref": "#/components/schemas/ForwardBackwardJSON"}},
        },
    }
}


def check_optimizer_config(cfg: OptimizerConfigBody | None) -> None:
    if cfg is not None and cfg.type not in ("adamw", "adam"):
        raise UnsupportedError(f"optimizer_config {cfg.type!r} is not supported (only adamw)",
                               field="optimizer_config.type")


@router.post("/create_model")
async def create_model(body: CreateModelRequest, user: User = _who, service: Service = _svc) -> dict[str, Any]:
    check_optimizer_config(body.optimizer_config)
    lora = body.lora_config
    if not (lora.train_attn or lora.train_mlp or lora.train_unembed):
        raise InvalidInputError("at least one of train_attn/train_mlp/train_unembed must be true", field="lora_config")
    run_id = f"{body.session_id}:train:{body.model_seq_id}"
    ref = await service.create_run(user, session_id=body.session_id, base_model=body.base_model, lora=lora,
                                   run_id=run_id, metadata=dict(body.user_metadata or {}))
    return {"request_id": tag(ref.future_id, "create", run_id), "model_id": run_id}


def _tokenizer_for(service: Service, base_model: str) -> tuple[str, str | None]:
    for m in service.capabilities().base_models:
        if m.name == base_model:
            tok = m.tokenizer_id or base_model
            # The SDK rewrites a name with exactly two '/' when it guesses a tokenizer; keep paths safe.
            if tok.startswith("/") and tok.count("/") == 2:
                tok = tok + "/"
            return tok, m.backend
    return base_model, None


@router.post("/get_info")
async def get_info(body: GetInfoRequest, user: User = _who, service: Service = _svc) -> dict[str, Any]:
    run = await service.get_run(user, body.model_id)
    tokenizer_id, arch = _tokenizer_for(service, run.base_model)
    return {
        "type": "get_info",
        "model_id": run.run_id,
        "model_data": {"arch": arch, "model_name": run.base_model, "tokenizer_id": tokenizer_id},
        "optimizer_config": {"type": "adamw"},
        "is_lora": True,
        "lora_rank": run.lora.rank,
        "model_name": run.base_model,
    }


def _json_body(raw: bytes) -> ForwardBackwardBody:
    try:
        # not model_validate_json: pydantic's JSON parser holds the whole document in a tree of its own first
        return ForwardBackwardJSON.model_validate(loads_compact(raw or b"{}")).to_body()
    except RecursionError:
        raise InvalidInputError("forward_backward body is nested too deeply", field="body") from None
    except ValueError as e:
        if not isinstance(e, ValidationError):
            raise InvalidInputError(f"forward_backward body is not valid JSON: {e}", field="body") from None
        first: Any = e.errors()[0] if e.errors() else {}
        field = field_of(tuple(first.get("loc", ())))
        raise InvalidInputError(f"invalid request: {field}: {first.get('msg')}", field=field) from None


async def _submit_fb(request: Request, user: User, service: Service, req: ForwardBackwardBody, route: str) -> Any:
    if not req.data:
        await refused(service, user, req.model_id, req.seq_id)
        raise InvalidInputError("forward_backward needs at least one datum", field="data")
    try:  # the loss registry refuses an unknown loss or a bad config here; the seq_id is consumed all the same
        if req.loss_fn == "stable_reinforce" and not req.forward_only:
            req.data = state_of(service).stability.apply(user.name, req.data,
                                                         req.target_spans or [None] * len(req.data))
        op = ForwardBackwardOp(data=req.data, loss_fn=req.loss_fn, loss_fn_config=req.loss_fn_config,
                               forward_only=req.forward_only)
    except TwinkleError:
        await refused(service, user, req.model_id, req.seq_id)
        raise
    kind = "fwd" if req.forward_only else "fb"

    async def make() -> str:
        ref = await service.submit(user, req.model_id, op, seq_id=req.seq_id)
        return tag(ref.future_id, kind)

    rid = await submit_once(service, user, req.model_id, req.seq_id, route, make)
    return {"request_id": rid, "model_id": req.model_id}


@router.post("/forward_backward", openapi_extra=_FB_BODY)
async def forward_backward(request: Request, user: User = _who, service: Service = _svc) -> dict[str, Any]:
    """Protobuf (what the 0.38 SDK sends) or JSON; both become a ``ForwardBackwardBody``."""
    ctype = (request.headers.get("content-type") or "").lower()
    raw = await request.body()
    max_bytes = max_request_bytes(service)
    encoding = request.headers.get("content-encoding")
    if "json" in ctype:
        req = _json_body(raw)
    else:
        budget = getattr(request.app.state, "body_budget", None)
        # a compressed body may inflate to max_request_bytes, whatever its own size: reserve that first
        held = budget.hold(api_key_from_request(request) or "", max_bytes) if encoding and budget else nullcontext()
        async with held:
            req = codec.decode_forward_backward(raw, encoding, max_bytes=max_bytes,
                                                max_tokens=max_tokens_any_model(service))
    return await _submit_fb(request, user, service, req, "forward_backward")


@router.post("/forward")
async def forward(body: ForwardBackwardJSON, request: Request, user: User = _who,
                  service: Service = _svc) -> dict[str, Any]:
    """Old SDKs (≤0.24) used a JSON ``/forward``; 0.38 sends forward_backward with forward_only."""
    req = body.to_body(forward_only=True)
    req.forward_only = True
    return await _submit_fb(request, user, service, req, "forward")


@router.post("/optim_step")
async def optim_step(body: OptimStepRequest, user: User = _who, service: Service = _svc) -> dict[str, Any]:
    params = body.params()
    try:
        if params is None:
            raise InvalidInputError("optim_step needs adam_params", field="adam_params")
        if params.type not in (None, "adam", "adamw"):
            raise UnsupportedError(f"optimizer {params.type!r} is not supported (only AdamW)",
                                   field="optimizer_params.type")
        op = OptimStepOp(adam_params=AdamParams.model_validate(params.model_dump(exclude={"type"})))
    except TwinkleError:
        await refused(service, user, body.model_id, body.seq_id)
        raise

    async def make() -> str:
        ref = await service.submit(user, body.model_id, op, seq_id=body.seq_id)
        return tag(ref.future_id, "opt")

    rid = await submit_once(service, user, body.model_id, body.seq_id, "optim_step", make)
    return {"request_id": rid, "model_id": body.model_id}
