"""Tokenizer routes at the server root, in vLLM's shapes: ``GET /tokenizer_info``, ``POST /tokenize``,
``POST /detokenize`` (see ``docs/openai-compat.md``). Evaluation harnesses (lm-evaluation-harness's
``local-completions`` with ``tokenizer_backend=remote``) tokenize with them, so a model whose tokenizer is not on
any hub (the builtin models, a private checkpoint) needs nothing on the client. ``model`` names what the OpenAI
routes take (a base model, a run, a saved adapter: the tokenizer is the base model's) and may be left out when
the server hosts one model. Same API key and limits as everywhere."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, ConfigDict, Field, model_validator

from twinkle.types import InvalidInputError, LimitExceededError
from twinkle.types.params import Integer

from .deps import CompactJSONRoute, get_service, get_user
from .routes_openai import ChatMessage, resolve_model, scoped_model, template_messages
from .service import Service, User

__all__ = ["create_tokens_router"]


class TokenizeBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool = True  # as vLLM: the tokenizer's own (BOS...) for a prompt; harnesses send false
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeBody:
        if (self.prompt is None) == (self.messages is None):
            raise InvalidInputError("give prompt or messages (one of them)", field="prompt")
        return self


class DetokenizeBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[Integer]


def _model(service: Service, model: str | None) -> str:
    """``model``, or the one model the server hosts."""
    if model:
        return model
    names = [m.served_name for m in service.config.models]
    if len(names) == 1:
        return names[0]
    raise InvalidInputError(f"this server hosts {len(names)} models: name one ({', '.join(names)})", field="model")


def create_tokens_router() -> APIRouter:
    r = APIRouter(tags=["openai"], route_class=CompactJSONRoute)
    who = Depends(get_user)
    svc = Depends(get_service)

    @r.get("/tokenizer_info")
    async def tokenizer_info(model: str | None = Query(None, max_length=512), user: User = who,
                             service: Service = svc) -> dict[str, Any]:
        name = _model(service, model)
        return {"model": name, **await (await resolve_model(service, user, name)).worker.tokenizer_info()}

    @r.post("/tokenize")
    async def tokenize(body: TokenizeBody, user: User = who, service: Service = svc) -> dict[str, Any]:
        name = _model(service, body.model)
        images: list[Any] = []
        if body.messages is not None:
            messages, chars = template_messages(body.messages, images)
            if images:
                raise InvalidInputError("tokenize takes text messages only", field=images[0][0])
        else:
            chars = len(body.prompt or "")
        m = await resolve_model(service, user, name, chars)
        if body.messages is not None:
            ids = await m.worker.tokenize(messages=messages, add_generation_prompt=body.add_generation_prompt)
        else:
            ids = await m.worker.tokenize(text=body.prompt, add_special_tokens=body.add_special_tokens)
        return {"count": len(ids), "max_model_len": service.token_limit(m.base_model), "tokens": ids}

    @r.post("/detokenize")
    async def detokenize(body: DetokenizeBody, user: User = who, service: Service = svc) -> dict[str, Any]:
        name = _model(service, body.model)
        m = await resolve_model(service, user, name)
        limit = service.token_limit(m.base_model)
        if len(body.tokens) > limit:
            raise LimitExceededError(f"{len(body.tokens)} tokens exceed the limit of {limit}", field="tokens")
        info = await service.model_info(m.base_model)
        vocab = info.vocab_size if info is not None else None
        bad = next((t for t in body.tokens if t < 0 or (vocab is not None and t >= vocab)), None)
        if bad is not None:
            raise InvalidInputError(f"token id {bad} is outside the vocabulary (0..{vocab})", field="tokens")
        pieces, _ = await m.worker.token_texts(list(body.tokens), [])
        return {"prompt": "".join(pieces)}

    # under a model's prefix (``/models/{model}/tokenize``...): the harness's requests name no model
    @r.get("/models/{scope:path}/tokenizer_info")
    async def scoped_tokenizer_info(scope: str, user: User = who, service: Service = svc) -> dict[str, Any]:
        return await tokenizer_info(scope, user, service)

    @r.post("/models/{scope:path}/tokenize")
    async def scoped_tokenize(scope: str, body: TokenizeBody, user: User = who,
                              service: Service = svc) -> dict[str, Any]:
        body.model = scoped_model(scope, body.model)
        return await tokenize(body, user, service)

    @r.post("/models/{scope:path}/detokenize")
    async def scoped_detokenize(scope: str, body: DetokenizeBody, user: User = who,
                                service: Service = svc) -> dict[str, Any]:
        body.model = scoped_model(scope, body.model)
        return await detokenize(body, user, service)

    return r

