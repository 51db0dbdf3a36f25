"""Tinker route: retrieve_future (long-poll; protobuf for ForwardBackward/Forward/Sample results)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import Response

from twinkle.types import InvalidInputError
from twinkle.types.api import CheckpointInfo, RunInfo
from twinkle.types.params import MAX_TOPK_LOGPROBS

from ..service import Service, User
from . import codec
from ._common import PROTO, SEP, TinkerRoute, state_of, tinker_service, tinker_user
from .models import RetrieveFutureRequest

__all__ = ["RETRIEVE_HOLD_S", "router"]

RETRIEVE_HOLD_S = 25.0
"""How long ``retrieve_future`` holds a poll open (the SDK's own timeout is 45 s)."""

router = APIRouter(route_class=TinkerRoute, tags=["tinker: futures"])
_svc = Depends(tinker_service)
_who = Depends(tinker_user)


def _get(obj: Any, name: str, default: Any = None) -> Any:
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


def _int_part(parts: list[str], i: int, lo: int, hi: int) -> int | None:
    """A number a request id carries (the client can edit it: parsed and bounded like any input)."""
    if len(parts) <= i or parts[i] == "":
        return None
    text = parts[i]
    if not text.isdigit() or not lo <= int(text) <= hi:
        raise InvalidInputError("request_id is malformed", field="request_id")
    return int(text)


@router.post("/retrieve_future")
async def retrieve_future(body: RetrieveFutureRequest, user: User = _who, service: Service = _svc) -> Any:
    rid = body.request_id
    parts = rid.split(SEP)
    future_id, kind, extra = parts[0], (parts[1] if len(parts) > 1 else ""), parts[2:]
    state = await service.wait(user, future_id, timeout=RETRIEVE_HOLD_S)
    if state.status == "pending":
        return {"type": "try_again", "request_id": rid, "queue_state": "active"}
    if state.status == "failed":
        err = state.error or {}
        category = str(err.get("category") or "unknown").lower()
        if category not in ("user", "server", "unknown"):
            category = "unknown"
        return {"error": str(err.get("error") or err.get("message") or "request failed"), "category": category}
    if kind == "smp" and len(extra) > 2 and extra[2] == "rec":
        state_of(service).stability.record(user.name, future_id, state.result)
    return await _shape_result(service, user, kind, extra, state.result)


async def _shape_result(service: Service, user: User, kind: str, extra: list[str], result: Any) -> Any:
    if kind in ("fb", "fwd"):
        return Response(codec.encode_forward_backward_output(result), media_type=PROTO)
    if kind == "smp":
        last_n = _int_part(extra, 0, 1, 1 << 40)
        k = _int_part(extra, 1, 0, MAX_TOPK_LOGPROBS) or 0
        return Response(codec.encode_sample_response(result, prompt_logprobs_last_n=last_n, topk_prompt_k=k),
                        media_type=PROTO)
    if kind == "opt":
        metrics = _get(result, "metrics")
        return {"type": "optim_step", "metrics": codec.normalize_metrics(metrics) if metrics else None}
    if kind == "create":
        return {"type": "create_model", "model_id": _get(result, "run_id") or (extra[0] if extra else None)}
    if kind == "load":
        model_id = _get(result, "run_id") or (extra[0] if extra else None)
        path = _get(result, "path") if isinstance(result, (CheckpointInfo, dict)) else None
        return {"type": "load_weights", "model_id": model_id, "path": path}
    if kind == "save":
        return {"path": _get(result, "path")}
    if kind == "eph":
        if not extra:
            raise InvalidInputError("request_id is malformed", field="request_id")
        sampler_id = extra[0]
        done = state_of(service).ephemeral_done
        if sampler_id not in done:
            await service.create_sampler(user, session_id=sampler_id.split(":", 1)[0], sampler_id=sampler_id,
                                         checkpoint=_get(result, "path"))
            done.add(sampler_id)
        return {"type": "save_weights_for_sampler", "path": None, "sampling_session_id": sampler_id}
    if isinstance(result, (RunInfo, CheckpointInfo)):
        return result.model_dump(mode="json")
    return result if isinstance(result, dict) else {"result": result}
