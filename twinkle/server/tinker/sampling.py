"""Tinker routes: create_sampling_session, GET samplers/{id}, asample."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from twinkle.types import InvalidInputError, LimitExceededError, UnsupportedError

from ..ops import SampleOp
from ..service import Service, User
from ._common import TinkerRoute, tag, tinker_service, tinker_user
from .models import AsampleRequest, CreateSamplingSessionRequest

__all__ = ["MAX_TOPK_REPLY_VALUES", "router"]

router = APIRouter(route_class=TinkerRoute, tags=["tinker: sampling"])
_svc = Depends(tinker_service)
_who = Depends(tinker_user)

MAX_TOPK_REPLY_VALUES = 4_000_000
"""Prompt positions × k of one reply's top-k prompt logprobs (8 bytes each: 32 MB), refused up front."""


@router.post("/create_sampling_session")
async def create_sampling_session(body: CreateSamplingSessionRequest, user: User = _who,
                                  service: Service = _svc) -> dict[str, Any]:
    if not body.model_path and not body.base_model:
        raise InvalidInputError("create_sampling_session needs base_model or model_path", field="base_model")
    out = await service.create_sampler(
        user, session_id=body.session_id, sampler_id=f"{body.session_id}:sample:{body.sampling_session_seq_id}",
        base_model=body.base_model, checkpoint=body.model_path,
    )
    return {"type": "create_sampling_session", "sampling_session_id": out["sampler_id"]}


@router.get("/samplers/{sampler_id}")
async def get_sampler(sampler_id: str, user: User = _who, service: Service = _svc) -> dict[str, Any]:
    out = await service.get_sampler(user, sampler_id)
    return {"sampler_id": out["sampler_id"], "base_model": out["base_model"], "model_path": out.get("model_path")}


def _prompt(body: AsampleRequest) -> Any:
    """Token ids; a ``ModelInput`` when the prompt holds images (the gateway expands it)."""
    if any(c.type == "image" for c in body.prompt.chunks):
        from twinkle.model.images import prompt_from_json

        return prompt_from_json(body.prompt.model_dump(mode="json"))
    toks = [t for c in body.prompt.chunks for t in getattr(c, "tokens", [])]
    if not toks:
        raise InvalidInputError("prompt is empty", field="prompt")
    return toks


def _refuse_unsupported(body: AsampleRequest) -> None:
    if body.target_prompt_logprobs is not None:
        raise UnsupportedError("target_prompt_logprobs is not supported", field="target_prompt_logprobs")
    if body.prompt_alt_tokens_k > 0:
        raise UnsupportedError("prompt_alt_tokens_k is not supported", field="prompt_alt_tokens_k")
    if body.topk_sample_logprobs > 0:
        raise UnsupportedError("topk_sample_logprobs is not supported (prompt top-k is)", field="topk_sample_logprobs")


@router.post("/asample")
async def asample(body: AsampleRequest, user: User = _who, service: Service = _svc) -> dict[str, Any]:
    _refuse_unsupported(body)
    prompt = _prompt(body)
    length = len(prompt) if isinstance(prompt, list) else body.prompt.length
    topk, last_n = body.topk_prompt_logprobs, body.prompt_logprobs_last_n
    if topk and length * topk > MAX_TOPK_REPLY_VALUES:  # the reply's size, computed before anything runs
        raise LimitExceededError(
            f"topk_prompt_logprobs {topk} × {length} prompt tokens exceeds {MAX_TOPK_REPLY_VALUES} values",
            field="topk_prompt_logprobs")
    if last_n is not None and not last_n <= max(1, length - 1):
        raise InvalidInputError("prompt_logprobs_last_n must be between 1 and len(prompt)-1",
                                field="prompt_logprobs_last_n")
    op = SampleOp(prompt=prompt, num_samples=body.num_samples, params=body.sampling_params,
                  prompt_logprobs=body.prompt_logprobs or topk > 0, topk_prompt_logprobs=topk)
    if body.sampling_session_id:
        ref = await service.sample(user, op, sampler_id=body.sampling_session_id)
    elif body.model_path:
        ref = await service.sample(user, op, checkpoint=body.model_path, base_model=body.base_model)
    elif body.base_model:
        ref = await service.sample(user, op, base_model=body.base_model)
    else:
        raise InvalidInputError("asample needs sampling_session_id, model_path or base_model",
                                field="sampling_session_id")
    return {
        "request_id": tag(ref.future_id, "smp", "" if last_n is None else last_n, topk,
                          "rec" if body.record_stability_info else ""),
        "sample_sequence_ids": [f"{ref.future_id}-{i}" for i in range(body.num_samples)],
    }
