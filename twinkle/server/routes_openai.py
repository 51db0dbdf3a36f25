"""OpenAI-compatible endpoint: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions`` (see
``docs/openai-compat.md``).

``model`` names a base model (its served name), a live training run of the caller (its run id) or a saved
adapter (a ``tinker://<run>/sampler_weights/<name>`` path, or ``<run id>/<checkpoint name>``). Auth is the same
API key (``Authorization: Bearer``); another user's run or checkpoint is a 404 like everywhere else. The chat
template comes from the model's tokenizer (on the worker). ``stream: true`` answers with server-sent events
in OpenAI's chunk format, ending with ``data: [DONE]``.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, cast

from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from twinkle.types import (
    CapacityError,
    EncodedTextChunk,
    ImageChunk,
    InvalidInputError,
    LimitExceededError,
    ModelInput,
    NotFoundError,
    SampleResponse,
    SamplingParams,
    TwinkleError,
    UnsupportedError,
)
from twinkle.types.params import (
    DEFAULT_MAX_TOKENS,
    MAX_NUM_SAMPLES,
    MAX_TOKENS,
    MAX_TOPK_LOGPROBS,
    Integer,
    Number,
    Seed,
    StopTexts,
    TopK,
)

from .deps import CompactJSONRoute, get_service, get_user
from .ops import SampleOp
from .routes_stream import merged_polls, open_stream
from .service import Service, User

__all__ = ["ChatMessage", "Resolved", "create_openai_router", "resolve_model", "scoped_model", "target_of",
           "template_messages"]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class _Body(BaseModel):
    """The sampling fields OpenAI clients send, with the same number types (finite, not bool, in range) as
    ``SamplingParams``, so every bad number is a 400 naming the OpenAI field before anything runs. Fields that
    would change the answer and are not implemented (penalties, ``logit_bias``) are refused by name when set,
    never silently ignored; others (``user``, ``metadata``...) are ignored."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str
    max_tokens: Integer | None = Field(None, ge=1, le=MAX_TOKENS)
    temperature: Number = Field(1.0, ge=0.0, le=10.0)
    top_p: Number = Field(1.0, gt=0.0, le=1.0)
    n: Integer = Field(1, ge=1, le=MAX_NUM_SAMPLES)
    stop: StopTexts | None = None
    seed: Seed | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    top_k: TopK = -1  # an extension (as vLLM's)
    frequency_penalty: Number = Field(0.0, ge=-2.0, le=2.0)
    presence_penalty: Number = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, Number] | None = None

    @model_validator(mode="after")
    def _refuse_unsupported(self) -> _Body:
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name):
                raise UnsupportedError(f"{name} is not supported: leave it 0", field=name)
        if self.logit_bias:
            raise UnsupportedError("logit_bias is not supported", field="logit_bias")
        if self.stream_options is not None and not self.stream:
            raise InvalidInputError("stream_options is only allowed with stream: true", field="stream_options")
        return self

    def wants_logprobs(self) -> bool:
        return False

    def alternatives(self) -> int:
        """How many most likely tokens to list at each returned position."""
        return 0


class CompletionBody(_Body):
    prompt: str | list[Integer] | list[str] | list[list[Integer]]  # one prompt, or a batch of them
    max_tokens: Integer | None = Field(None, ge=0, le=MAX_TOKENS)  # 0: score the prompt only (with echo)
    logprobs: Integer | None = Field(None, ge=0, le=5)
    echo: bool = False

    def wants_logprobs(self) -> bool:
        return self.logprobs is not None

    def alternatives(self) -> int:
        return self.logprobs or 0


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = ""


class ChatBody(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Integer | None = Field(None, ge=1, le=MAX_TOKENS)
    logprobs: bool | None = None
    top_logprobs: Integer | None = Field(None, ge=0, le=MAX_TOPK_LOGPROBS)

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> ChatBody:
        if self.top_logprobs and not self.logprobs:  # as OpenAI: the alternatives come inside `logprobs`
            raise InvalidInputError("top_logprobs needs logprobs: true", field="top_logprobs")
        return self

    def wants_logprobs(self) -> bool:
        return bool(self.logprobs)

    def alternatives(self) -> int:
        return (self.top_logprobs or 0) if self.logprobs else 0


_IMAGE_TYPES = {"image/png": "png", "image/jpeg": "jpeg", "image/jpg": "jpeg"}


def _image_part(part: dict[str, Any], field: str) -> ImageChunk:
    """An ``image_url`` content part as an image chunk (checked like any image when the prompt is expanded):
    only ``data:`` URLs, the server fetches nothing."""
    raw = part.get("image_url")
    url = raw.get("url") if isinstance(raw, dict) else raw
    if not isinstance(url, str) or not url.startswith("data:"):
        raise InvalidInputError("an image must be a data: URL (data:image/png;base64,...); the server fetches "
                                "nothing", field=field)
    head, comma, data = url[5:].partition(",")
    mime, _, encoding = head.partition(";")
    if not comma or encoding.lower() != "base64":
        raise InvalidInputError("an image data: URL must be base64 (data:image/png;base64,...)", field=field)
    fmt = _IMAGE_TYPES.get(mime.strip().lower())
    if fmt is None:
        raise InvalidInputError(f"image type {mime!r} is not supported: image/png or image/jpeg", field=field)
    return ImageChunk(data=data, format=fmt)


def _content(m: ChatMessage, i: int, images: list[tuple[str, ImageChunk]]) -> str | list[dict[str, str]]:
    """A message's content for the chat template: its text or, when it holds images, its text and image parts
    (each image appended to ``images`` with the field that names its part, in order)."""
    if m.content is None:
        return ""
    if isinstance(m.content, str):
        return m.content
    parts: list[dict[str, str]] = []
    for j, p in enumerate(m.content):
        kind = p.get("type")
        if kind == "text":
            parts.append({"type": "text", "text": str(p.get("text", ""))})
        elif kind == "image_url":
            where = f"messages.{i}.content.{j}.image_url"
            images.append((where, _image_part(p, where)))
            parts.append({"type": "image"})
        else:
            raise InvalidInputError(f"content part type {kind!r} is not supported: text or image_url",
                                    field=f"messages.{i}.content.{j}.type")
    if len(parts) == sum(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


def _text_of(content: str | list[dict[str, str]]) -> str:
    return content if isinstance(content, str) else "".join(p.get("text", "") for p in content)


def template_messages(messages: list[ChatMessage], images: list[tuple[str, ImageChunk]]
                      ) -> tuple[list[dict[str, Any]], int]:
    """OpenAI chat messages as the chat template takes them (images appended to ``images``), and about how many
    characters the rendered prompt has at least (to refuse a text too long before tokenizing it)."""
    # "developer" is OpenAI's newer name for "system", which chat templates know
    out = [{"role": "system" if m.role == "developer" else m.role, "content": _content(m, i, images)}
           for i, m in enumerate(messages)]
    return out, sum(len(_text_of(m["content"])) + len(m["role"]) + 8 for m in out)  # 8: a template's least


_CHUNK_FIELD = re.compile(r"^prompt\.chunks\[(\d+)\]")


def _name_image_part(e: TwinkleError, prompt: ModelInput, images: list[tuple[str, ImageChunk]]) -> None:
    """``e`` naming the image's content part (``messages.i.content.j.image_url``) rather than the chunk of the
    prompt the route built (``prompt.chunks[k].data``)."""
    m = _CHUNK_FIELD.match(str(e.field or ""))
    if m is None:
        return
    k = int(m.group(1))
    nth = sum(isinstance(c, ImageChunk) for c in prompt.chunks[:k + 1]) - 1
    if 0 <= nth < len(images) and isinstance(prompt.chunks[k], ImageChunk):
        e.field = images[nth][0]
        e.detail["field"] = e.field


def _with_images(pad: int, model: str, ids: list[int], images: list[ImageChunk]) -> ModelInput:
    """The templated prompt ``ids`` as text and image chunks: each image placeholder (``pad``) the chat template
    wrote (one per image part, between the vision markers) becomes that image, expanded later like a native one."""
    at = [k for k, t in enumerate(ids) if t == pad]
    if len(at) != len(images):
        raise UnsupportedError(f"the chat template of {model!r} placed {len(at)} image(s) for {len(images)} image "
                               "part(s): send this prompt through the native API", field="messages")
    chunks: list[EncodedTextChunk | ImageChunk] = []
    start = 0
    for k, image in zip(at, images, strict=True):
        if k > start:
            chunks.append(EncodedTextChunk(tokens=ids[start:k]))
        chunks.append(image)
        start = k + 1
    if start < len(ids):
        chunks.append(EncodedTextChunk(tokens=ids[start:]))
    return ModelInput(chunks=chunks)


async def target_of(service: Service, user: User, model: str) -> dict[str, Any]:
    """The sample target ``model`` names (see the module docstring)."""
    if service.config.model(model) is not None:
        return {"base_model": model}
    if model.startswith("tinker://"):
        return {"checkpoint": model}
    if "/" in model:
        run_id, _, name = model.partition("/")
        for ck in await service.list_checkpoints(user):  # also those of a run deleted since
            if ck.run_id == run_id and ck.name == name and ck.kind == "sampler":
                return {"checkpoint": ck.path}
        raise NotFoundError(f"model {model!r} not found", field="model")
    try:
        run = await service.get_run(user, model)  # looked up directly: any of the user's runs, however many
    except NotFoundError:
        raise NotFoundError(f"model {model!r} not found", field="model") from None
    if run.state != "active":
        raise NotFoundError(f"run {model!r} is {run.state}: sample from one of its saved sampler checkpoints "
                            f"('{model}/<name>')", field="model")
    return {"run_id": model}


def _params(body: _Body, max_tokens: int | None) -> SamplingParams:
    stop: Any = body.stop
    if isinstance(stop, str):
        stop = [stop]
    if not stop:
        stop = None  # EOS only: to OpenAI an empty list means no stop strings, never "ignore EOS" as natively
    return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                          seed=body.seed, stop=stop)


MAX_TOP_VALUES = 200_000
"""The most (position, alternative) pairs one reply may list (each is ~60 bytes of JSON: ~12 MB at most)."""

MAX_CHARS_PER_TOKEN = 64
"""A text longer than (token limit × this) cannot fit: real vocabularies average a few characters per token,
so this refuses only texts that are far over the limit, before the worker spends seconds tokenizing them."""

_OPENAI_FIELD = {"num_samples": "n", "sampling_params.max_tokens": "max_tokens", "prompt": "prompt"}


def _openai_field(e: TwinkleError, chat: bool) -> TwinkleError:
    """``e`` naming the field as the OpenAI client sent it."""
    field = _OPENAI_FIELD.get(str(e.field or ""))
    if e.field == "topk_logprobs":
        field = "top_logprobs" if chat else "logprobs"
    if field is not None:
        e.field = field
        e.detail["field"] = field
    return e


def _response(res: Any) -> SampleResponse:
    return res if isinstance(res, SampleResponse) else SampleResponse.model_validate(res)


def _finish(reason: str) -> str:
    return "stop" if reason == "stop" else "length"


def _chunk(cid: str, obj: str, model: str, created: int, choices: list[dict[str, Any]],
           usage: dict[str, int] | None = None) -> bytes:
    data: dict[str, Any] = {"id": cid, "object": obj, "created": created, "model": model, "choices": choices}
    if usage is not None:
        data["usage"] = usage
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


@dataclass
class _Tok:
    offset: int  # where its text starts in the choice's text
    text: str  # the text it added (empty for part of a character, or a special token)
    logprob: float | None  # None: the prompt's first token (echo), which nothing predicts
    top: list[tuple[str, float]]  # the most likely tokens there, as (text, logprob), likeliest first


class _ChoiceText:
    """One choice's text as its tokens arrive: cut at the first stop string (which is not returned), and,
    while streaming, holding back a tail that may still turn into one, so a stop string that spans several
    tokens never reaches the client in part (``"\n"`` sent, then ``"\n"`` completing a ``"\n\n"`` stop).
    Each piece costs one ``find`` per stop string over its last (longest stop + piece) characters."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.longest = max((len(s) for s in self.stops), default=0)
        self.text = ""
        self.sent = 0  # characters of `text` handed out
        self.stopped = False
        self.tokens: list[_Tok] = []
        self.given = 0  # tokens handed out

    def add(self, piece: str, logprob: float | None = None, top: list[list[Any]] | None = None) -> None:
        """One token: the text it added, its logprob and the most likely ``[token, text, logprob]`` there."""
        if self.stopped:
            return
        if logprob is not None:
            self.tokens.append(_Tok(len(self.text), piece, logprob, [(str(t), float(lp)) for _, t, lp in top or []]))
        if not piece:
            return
        start = max(0, len(self.text) - self.longest + 1)  # a new stop must end inside the new piece
        self.text += piece
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.stopped = True

    def take(self, final: bool = False) -> str:
        """The text not handed out yet: all of it once ``final`` or stopped, else all but the last (longest stop
        - 1) characters, which a later token may still complete into a stop string."""
        upto = len(self.text) if final or self.stopped else max(self.sent, len(self.text) - max(self.longest - 1, 0))
        piece = self.text[self.sent:upto]
        self.sent = upto
        return piece

    def take_tokens(self) -> list[_Tok]:
        """The tokens not handed out yet whose text :meth:`take` handed out (all of it: one whose text is partly
        held back waits): the text of a stop string (or an EOS token, which adds none) leaves its tokens out, as
        it leaves its text, and the token that a stop string starts inside keeps only its text before the stop,
        so the tokens' texts add up to the returned text."""
        end = self.given
        while end < len(self.tokens):
            t = self.tokens[end]
            if t.offset >= self.sent or (t.offset + len(t.text) > self.sent and not self.stopped):
                break
            end += 1
        out, self.given = self.tokens[self.given:end], end
        if self.stopped and out and out[-1].offset + len(out[-1].text) > len(self.text):
            last = out[-1]
            out[-1] = _Tok(last.offset, last.text[:len(self.text) - last.offset], last.logprob, last.top)
        return out


def _first_of_each(pairs: list[tuple[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for text, lp in pairs:
        out.setdefault(text, lp)
    return out


def _logprobs(chat: bool, toks: list[_Tok], top: bool) -> dict[str, Any]:
    """OpenAI's ``logprobs`` object of one choice (or one chunk of it) for ``toks``; ``top``: list the most likely
    tokens at each position (completions: a text -> logprob map, the likelier one where two tokens read alike)."""
    if chat:
        return {"content": [{"token": t.text, "logprob": t.logprob, "bytes": list(t.text.encode()),
                             "top_logprobs": [{"token": a, "logprob": lp, "bytes": list(a.encode())} for a, lp in t.top]}
                            for t in toks]}
    return {"tokens": [t.text for t in toks], "token_logprobs": [t.logprob for t in toks],
            "top_logprobs": [None if t.logprob is None else _first_of_each(t.top) for t in toks] if top else None,
            "text_offset": [t.offset for t in toks]}


def scoped_model(scope: str, model: str | None) -> str:
    """The model a request under ``/models/{scope}/...`` is for: the URL's, which a body may repeat but not
    contradict."""
    if model and model != scope:
        raise InvalidInputError(f"the body names model {model!r} but the URL is for {scope!r}", field="model")
    return scope


class Resolved(NamedTuple):
    """What a ``model`` name resolves to, once a request."""

    target: dict[str, Any]  # the sample target (``open_stream``'s keywords)
    worker: Any  # the worker that tokenizes for it
    base_model: str  # its served base model


async def resolve_model(service: Service, user: User, model: str, text_chars: int = 0) -> Resolved:
    """``model`` resolved (a 404 as for sampling), refusing a text of ``text_chars`` too long to fit the model's
    token limit before it is tokenized (tokenizing megabytes costs the worker seconds per request)."""
    target = await target_of(service, user, model)
    probe = SampleOp(prompt=[0], params=SamplingParams(max_tokens=1))
    t = service.sample_target(user, probe, **target)
    limit = service.token_limit(t.base_model)
    if text_chars > limit * MAX_CHARS_PER_TOKEN:
        raise LimitExceededError(f"the prompt's {text_chars} characters cannot fit the limit of {limit} tokens",
                                 field="prompt")
    return Resolved(target, t.worker, t.base_model)


def create_openai_router() -> APIRouter:
    r = APIRouter(tags=["openai"], route_class=CompactJSONRoute)
    who = Depends(get_user)
    svc = Depends(get_service)

    @r.get("/v1/models")
    async def models(user: User = who, service: Service = svc) -> dict[str, Any]:
        now = int(time.time())
        data = [{"id": m.name, "object": "model", "created": now, "owned_by": "twinkle"}
                for m in service.capabilities().base_models]
        runs, _ = await service.list_runs(user, limit=1000)
        data += [{"id": run.run_id, "object": "model", "created": now, "owned_by": user.name,
                  "root": run.base_model} for run in runs if run.state == "active"]
        data += [{"id": ck.path, "object": "model", "created": int(ck.created_at), "owned_by": user.name}
                 for ck in await service.list_checkpoints(user) if ck.kind == "sampler"]
        return {"object": "list", "data": data}

    @r.get("/v1/models/{model_id:path}")
    async def model(model_id: str, user: User = who, service: Service = svc) -> dict[str, Any]:
        """One model by any name ``model`` takes (``client.models.retrieve``); 404 as for sampling."""
        m = await resolve_model(service, user, model_id)
        owner = "twinkle" if "base_model" in m.target else user.name
        return {"id": model_id, "object": "model", "created": int(time.time()), "owned_by": owner,
                "root": m.base_model}

    async def _run(service: Service, user: User, body: _Body, m: Resolved, prompts: list[list[int] | ModelInput],
                   obj: str, chat: bool) -> Any:
        """Sample each of ``prompts`` (token ids, or chunks with images) ``body.n`` times with ``m`` as ``body``
        asks: the reply, or its stream. Choice ``p * n + j`` is prompt ``p``'s ``j``-th sample, as OpenAI numbers
        them."""
        n = body.n
        if len(prompts) * n > MAX_NUM_SAMPLES:
            raise LimitExceededError(f"{len(prompts)} prompts × n = {n} is over {MAX_NUM_SAMPLES} choices: send fewer",
                                     field="prompt" if len(prompts) > 1 else "n")
        max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens
        k = body.alternatives()
        if k and k * len(prompts) * n * (max_tokens or DEFAULT_MAX_TOKENS) > MAX_TOP_VALUES:  # bounded first
            raise LimitExceededError(f"{k} most likely tokens × {len(prompts) * n} choices × "
                                     f"{max_tokens or DEFAULT_MAX_TOKENS} tokens exceeds {MAX_TOP_VALUES} values: "
                                     "ask for fewer", field="top_logprobs" if chat else "logprobs")
        echo = getattr(body, "echo", False)
        if echo and body.stream:
            raise UnsupportedError("echo with stream: true is not supported: ask without streaming", field="echo")
        scored = echo and body.wants_logprobs()  # the prompt's own logprobs come back too
        ops = [SampleOp(prompt=cast(list[int], p),  # chunks with images: the gateway expands them
                        num_samples=n, params=_params(body, max_tokens), topk_logprobs=k,
                        prompt_logprobs=scored, topk_prompt_logprobs=k if scored else 0) for p in prompts]
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        streams: list[AsyncGenerator[dict[str, Any], None]] = []
        try:
            for op in ops:
                streams.append(await open_stream(service, user, op, **m.target))
        except BaseException as e:  # refused, or the caller went away: the prompts already started are dropped
            for st in streams:
                await st.aclose()
            if isinstance(e, TwinkleError):
                raise _openai_field(e, chat) from None
            raise
        cid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())

        want_lp, top = body.wants_logprobs(), body.alternatives() > 0

        def choice(i: int, text: str, reason: str | None, toks: list[_Tok]) -> dict[str, Any]:
            lp = _logprobs(chat, toks, top) if want_lp else None
            if chat:
                return {"index": i, "delta": {"content": text} if text else {}, "finish_reason": reason, "logprobs": lp}
            return {"index": i, "text": text, "finish_reason": reason, "logprobs": lp}

        def usage(results: list[SampleResponse]) -> dict[str, int]:
            prompt = sum(len(op.prompt) for op in ops)  # images expanded into their tokens by now
            completion = sum(len(s.tokens) for res in results for s in res.sequences)
            return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

        texts = [_ChoiceText(stops) for _ in range(len(ops) * n)]
        if body.stream:
            with_usage = body.stream_options is not None and body.stream_options.include_usage

            async def gen() -> AsyncIterator[bytes]:
                results: list[SampleResponse] = []
                async with aclosing(merged_polls(streams)) as polls:
                    try:
                        if chat:
                            yield _chunk(cid, obj, body.model, created,
                                         [{"index": i, "delta": {"role": "assistant", "content": ""},
                                           "finish_reason": None} for i in range(n)])
                        async for pi, p in polls:
                            for ev in p["events"]:
                                idx = pi * n + ev["index"]
                                ct = texts[idx]
                                ct.add(ev["text"], ev.get("logprob"), ev.get("top"))
                                piece = ct.take()
                                if piece:
                                    yield _chunk(cid, obj, body.model, created, [choice(idx, piece, None, ct.take_tokens())])
                            if p["done"]:
                                res = _response(p["result"])
                                results.append(res)
                                for idx in range(pi * n, pi * n + n):  # a held tail that never became a stop string
                                    ct = texts[idx]
                                    piece, toks = ct.take(final=True), ct.take_tokens()
                                    if piece or toks:  # toks alone: the token a stop string started inside
                                        yield _chunk(cid, obj, body.model, created, [choice(idx, piece, None, toks)])
                                yield _chunk(cid, obj, body.model, created, [
                                    choice(pi * n + j, "", _finish(s.stop_reason), []) for j, s in enumerate(res.sequences)])
                        if with_usage:  # as OpenAI: one more chunk, no choices, the whole request's usage
                            yield _chunk(cid, obj, body.model, created, [], usage(results))
                    except Exception as e:  # noqa: BLE001 - headers are sent: report inside the stream
                        err = e if isinstance(e, TwinkleError) else None
                        payload = {"error": {"message": str(err) if err else "sampling failed on the server",
                                             "type": getattr(err, "code", "internal")}}
                        yield f"data: {json.dumps(payload)}\n\n".encode()
                # closed by now, also when the client disconnected mid-stream: unfinished requests are dropped
                yield b"data: [DONE]\n\n"

            return StreamingResponse(gen(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

        results: dict[int, SampleResponse] = {}
        try:
            async with aclosing(merged_polls(streams)) as polls:
                async for pi, p in polls:
                    for ev in p["events"]:
                        texts[pi * n + ev["index"]].add(ev["text"], ev.get("logprob"), ev.get("top"))
                    if p["done"]:
                        results[pi] = _response(p["result"])
        except TwinkleError as e:
            raise _openai_field(e, chat) from None
        choices = []
        for pi, op in enumerate(ops):
            res = results[pi]
            head, head_toks = await _echo(m.worker, op.prompt, res, scored) if echo else ("", [])
            for j, s in enumerate(res.sequences):
                ct = texts[pi * n + j]
                text = head + ct.take(final=True)
                toks = head_toks + [_Tok(t.offset + len(head), t.text, t.logprob, t.top) for t in ct.take_tokens()]
                lp = _logprobs(chat, toks, top) if want_lp else None
                if chat:
                    choices.append({"index": pi * n + j, "message": {"role": "assistant", "content": text},
                                    "finish_reason": _finish(s.stop_reason), "logprobs": lp})
                else:
                    choices.append({"index": pi * n + j, "text": text, "finish_reason": _finish(s.stop_reason),
                                    "logprobs": lp})
        return {"id": cid, "object": obj, "created": created, "model": body.model, "choices": choices,
                "usage": usage([results[pi] for pi in range(len(ops))])}

    async def _echo(worker: Any, ids: list[int], res: SampleResponse, scored: bool) -> tuple[str, list[_Tok]]:
        """The prompt's text (as its tokens decode) and, ``scored``, its tokens with their logprobs and the most
        likely tokens at each position (``echo``: what evaluation harnesses score a text with)."""
        top_ids = res.topk_prompt_logprobs or []
        singles = sorted({t for row in top_ids if row for t, _ in row})
        texts, single_texts = await worker.token_texts(ids, singles)
        named = dict(zip(singles, single_texts, strict=True))
        head = "".join(texts)
        if not scored:
            return head, []
        lps = list(res.prompt_logprobs or [None] * len(ids))
        toks, offset = [], 0
        for i, piece in enumerate(texts):
            row = top_ids[i] if i < len(top_ids) else None
            toks.append(_Tok(offset, piece, lps[i] if i < len(lps) else None,
                             [(named[t], lp) for t, lp in row or []]))
            offset += len(piece)
        return head, toks

    @r.post("/v1/completions")
    async def completions(body: CompletionBody, user: User = who, service: Service = svc) -> Any:
        raw = body.prompt
        one = isinstance(raw, str) or not raw or not isinstance(raw[0], (str, list))
        listed: list[Any] = [raw] if one else list(raw)  # one prompt, or a batch (as evaluation harnesses send)
        if len(listed) > MAX_NUM_SAMPLES:
            raise LimitExceededError(f"{len(listed)} prompts is over {MAX_NUM_SAMPLES}: send fewer", field="prompt")
        # resolved once for the batch; each text is checked against the token limit before it is tokenized
        m = await resolve_model(service, user, body.model, max((len(p) for p in listed if isinstance(p, str)),
                                                               default=0))
        prompts: list[list[int] | ModelInput] = []
        for i, p in enumerate(listed):
            ids = await m.worker.tokenize(text=p) if isinstance(p, str) else [int(t) for t in p]
            if not ids:
                where = "prompt" if one else f"prompt.{i}"
                raise InvalidInputError(f"{where} is empty", field=where)
            prompts.append(ids)
        return await _run(service, user, body, m, prompts, "text_completion", chat=False)

    @r.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, user: User = who, service: Service = svc) -> Any:
        images: list[tuple[str, ImageChunk]] = []  # (the field naming its content part, the image)
        messages, chars = template_messages(body.messages, images)
        m = await resolve_model(service, user, body.model, chars)
        obj = "chat.completion.chunk" if body.stream else "chat.completion"
        if not images:
            return await _run(service, user, body, m, [await m.worker.tokenize(messages=messages)], obj, chat=True)
        info = await service.model_info(m.base_model)
        if info is None:
            raise CapacityError(f"model {body.model!r} has not published its model info yet: retry images later",
                                retry_after=5.0, field="messages")
        if info.vision is None:
            raise InvalidInputError(f"model {body.model!r} is text-only; it does not accept images", field="messages")
        ids = await m.worker.tokenize(messages=messages)
        prompt = _with_images(info.vision.image_token_id, body.model, ids, [im for _, im in images])
        try:
            return await _run(service, user, body, m, [prompt], obj, chat=True)
        except TwinkleError as e:
            _name_image_part(e, prompt, images)
            raise

    # The same routes under a model's own prefix, for clients that derive every URL from one base URL and name
    # no model in some requests (lm-evaluation-harness's tokenizer requests: docs/openai-compat.md).
    @r.post("/models/{scope:path}/v1/completions")
    async def scoped_completions(scope: str, body: CompletionBody, user: User = who, service: Service = svc) -> Any:
        body.model = scoped_model(scope, body.model)
        return await completions(body, user, service)

    @r.post("/models/{scope:path}/v1/chat/completions")
    async def scoped_chat(scope: str, body: ChatBody, user: User = who, service: Service = svc) -> Any:
        body.model = scoped_model(scope, body.model)
        return await chat_completions(body, user, service)

    return r
