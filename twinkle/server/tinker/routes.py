"""Tinker-compatible HTTP routes: the unmodified ``tinker`` 0.38 SDK talks to these.

Mount on the gateway app next to the native routes::

    from twinkle.server.tinker import tinker_router
    app.include_router(tinker_router(lambda: service), prefix="/api/v1")

``service_getter`` is called on every request and returns the gateway's ``Service``; the routes use only its
public methods, so Tinker sessions, runs and checkpoints are the same objects the native API sees.

Wire rules (see ``docs/tinker-compat.md``):

- auth is ``X-API-Key`` (``Authorization: Bearer`` also accepted);
- every future-returning route answers ``{"request_id", "model_id"?, "sample_sequence_ids"?}``; the request id
  is the service future id plus a tag saying how to shape the result, so retrieving a future needs no table;
  the routes do keep per-process state (the ``seq_id`` dedup table, the ephemeral sampler ids already
  registered, the samples recorded for ``stable_reinforce``, the URL signers), held by the one gateway
  replica;
- ``retrieve_future`` long-polls up to ``RETRIEVE_HOLD_S`` and answers ``try_again`` when the work is still
  running, a protobuf body for ForwardBackward/Forward/Sample results, JSON otherwise, and
  ``{"error", "category"}`` (lower case) for a failed future;
- user errors are 4xx with ``{"error", "category", "code", "detail"}`` (never 402, never 409/429/5xx,
  which the SDK retries for minutes); a route or feature we do not serve is a 400 naming it.
"""

from __future__ import annotations

import logging
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from functools import wraps
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import ValidationError

from twinkle.types import (
    AdamParams,
    InvalidInputError,
    LoraConfig,
    NotFoundError,
    SamplingParams,
    TwinkleError,
    UnsupportedError,
)
from twinkle.types.api import CheckpointInfo, RunInfo
from twinkle.types.params import check_ttl_seconds

from ..export import UrlSigner, parse_recipients
from ..ops import ForwardBackwardOp, LoadOp, OptimStepOp, SampleOp, SaveOp
from ..service import Service, User
from ..stability import StabilityStore
from . import codec
from .client_limits import client_limits

__all__ = ["RETRIEVE_HOLD_S", "create_router", "tinker_router"]

log = logging.getLogger("twinkle.server.tinker")

EXTERNAL_URL_TTL_S = 3600.0
"""How long a signed external-weights download URL stays valid."""

RETRIEVE_HOLD_S = 25.0
"""How long ``retrieve_future`` holds a poll open (the SDK's own timeout is 45 s)."""

PROTO = "application/x-protobuf"
_SEP = "|"
_DEDUP_MAX = 20000
_CLIENT_CONFIG = {
    "pjwt_auth_enabled": False,
    "credential_default_source": "api_key",
    "parallel_fwdbwd_chunks": False,
    "proto_compress_fwdbwd": False,
    "sample_use_retrieve_futures": False,
    "sample_join_sampling_session": False,
    "custom_loss_server_side": False,
}
_DYNAMIC_CONFIG = {"refresh_interval_sec": 300, "sample_cancel_enabled": False, "sample_cancel_max_batch_size": 64}
_UNSUPPORTED_POST = [
    "auth/token",
    "create_custom_loss",
    "copy_weights",
    "join_sampling_session",
    "retrieve_futures",
    "cancel_future",
    "unload_model",
    "sessions/search",
    "audit",
    "billing/usage/events",
    "billing/usage/checkpoints/current",
]
_UNSUPPORTED_GET = ["auth/apikey/me", "sessions/{sid}/trace_export", "audit", "whoami"]


# ---- helpers -------------------------------------------------------------------------------------------------


def _error(err: TwinkleError) -> JSONResponse:
    status = 400 if err.status in (402, 409) else err.status
    headers = {}
    retry_after = getattr(err, "retry_after", None)
    if status == 429 and retry_after:
        headers["retry-after-ms"] = str(int(float(retry_after) * 1000))
    return JSONResponse(err.to_dict(), status_code=status, headers=headers)


def _guard(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Turn Twinkle errors (and malformed bodies) into JSON 4xx answers; log anything else as a 500."""

    @wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(*args, **kwargs)
        except TwinkleError as e:
            return _error(e)
        except ValidationError as e:
            first: dict[str, Any] = dict(e.errors()[0]) if e.errors() else {}
            loc = ".".join(str(p) for p in first.get("loc", ())) or None
            return _error(InvalidInputError(f"invalid request: {first.get('msg', e)}", field=loc))
        except Exception:  # a server bug: log it, never leak a traceback
            rid = uuid.uuid4().hex[:12]
            log.exception("tinker route %s failed (error id %s)", fn.__name__, rid)
            return JSONResponse(
                {"error": f"internal server error (id {rid})", "category": "server", "code": "internal_error",
                 "detail": {"error_id": rid}},
                status_code=500,
            )

    return wrapper


async def _json(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw:
        return {}
    import json

    try:
        body = json.loads(raw)
    except ValueError as e:
        raise InvalidInputError(f"request body is not valid JSON: {e}", field="body") from None
    if not isinstance(body, dict):
        raise InvalidInputError("request body must be a JSON object", field="body")
    return body


def _api_key(request: Request) -> str | None:
    key = request.headers.get("x-api-key")
    if key:
        return key
    auth = request.headers.get("authorization") or ""
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return None


def _get(obj: Any, name: str, default: Any = None) -> Any:
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


def _require(body: dict[str, Any], name: str, kind: type | tuple[type, ...] = str) -> Any:
    value = body.get(name)
    if value is None:
        raise InvalidInputError(f"missing required field {name!r}", field=name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise InvalidInputError(f"field {name!r} has the wrong type", field=name)
    return value


def _checkpoint_name(value: Any, field: str) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidInputError(f"{field} must be a non-empty name", field=field)
    if "/" in value or _SEP in value:
        raise InvalidInputError(f"{field} {value!r} must not contain '/' or '|'", field=field)
    return value


def _session_of(run_id: str) -> str:
    return run_id.split(":train:", 1)[0] if ":train:" in run_id else run_id.split(":", 1)[0]


def _tag(future_id: str, *parts: Any) -> str:
    return _SEP.join([future_id, *(str(p) for p in parts)])


def _sampling_params(raw: Any) -> SamplingParams:
    if raw is None:
        return SamplingParams()
    if not isinstance(raw, dict):
        raise InvalidInputError("sampling_params must be an object", field="sampling_params")
    try:
        return SamplingParams.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first.get("loc", ()))
        raise InvalidInputError(f"sampling_params.{loc}: {first.get('msg')}", field=f"sampling_params.{loc}") from None


def _prompt_tokens(raw: Any) -> Any:
    """Token ids; a ``ModelInput`` when the prompt holds images (the gateway expands it)."""
    if not isinstance(raw, dict) or not isinstance(raw.get("chunks"), list):
        raise InvalidInputError("prompt must be a ModelInput {chunks}", field="prompt")
    if any(isinstance(c, dict) and c.get("type") == "image" for c in raw["chunks"]):
        from twinkle.model.images import prompt_from_json

        return prompt_from_json(raw)
    toks: list[int] = []
    for i, chunk in enumerate(raw["chunks"]):
        kind = chunk.get("type", "encoded_text") if isinstance(chunk, dict) else None
        if kind != "encoded_text":
            raise UnsupportedError(
                f"prompt chunk type {kind!r} is not supported for sampling (only encoded_text)",
                field=f"prompt.chunks[{i}].type",
            )
        for t in chunk.get("tokens") or []:
            if not isinstance(t, int) or isinstance(t, bool):
                raise InvalidInputError("prompt tokens must be integers", field=f"prompt.chunks[{i}].tokens")
            toks.append(t)
    if not toks:
        raise InvalidInputError("prompt is empty", field="prompt")
    return toks


def _adam_params(body: dict[str, Any]) -> AdamParams:
    raw = body.get("adam_params") or body.get("optim_params") or body.get("optimizer_params")
    if raw is None:
        raise InvalidInputError("optim_step needs adam_params", field="adam_params")
    if not isinstance(raw, dict):
        raise InvalidInputError("adam_params must be an object", field="adam_params")
    kind = raw.get("type")
    if kind not in (None, "adam", "adamw"):
        raise UnsupportedError(f"optimizer {kind!r} is not supported (only AdamW)", field="optimizer_params.type")
    fields = {k: v for k, v in raw.items() if k != "type"}
    try:
        return AdamParams.model_validate(fields)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first.get("loc", ()))
        raise InvalidInputError(f"adam_params.{loc}: {first.get('msg')}", field=f"adam_params.{loc}") from None


def _check_optimizer_config(cfg: Any) -> None:
    if cfg is None:
        return
    kind = cfg.get("type") if isinstance(cfg, dict) else None
    if kind not in ("adamw", "adam"):
        raise UnsupportedError(f"optimizer_config {kind!r} is not supported (only adamw)", field="optimizer_config.type")


# ---- router ---------------------------------------------------------------------------------------------------


def tinker_router(service_getter: Callable[[], Service] | None = None) -> APIRouter:
    """The Tinker routes, to be mounted with ``prefix="/api/v1"``. ``service_getter()`` returns the Service;
    without one, each request uses ``request.app.state.service`` (the gateway's convention)."""

    router = APIRouter(tags=["tinker"])
    # (run_id, seq_id, route) -> request id: a resubmitted seq_id (SDK holder retry) gets the same future.
    dedup: OrderedDict[tuple[str, int, str], str] = OrderedDict()
    # ephemeral sampler ids already registered after their save completed
    ephemeral_done: set[str] = set()
    # stable_reinforce: samples recorded with record_stability_info, read back by forward_backward
    stability = StabilityStore()
    signers: dict[str, UrlSigner] = {}

    def url_signer(service: Service) -> UrlSigner:
        root = service.checkpoints.root
        if str(root) not in signers:
            signers[str(root)] = UrlSigner.for_root(root)
        return signers[str(root)]

    def svc(request: Request) -> Service:
        if service_getter is not None:
            return service_getter()
        return request.app.state.service

    def auth(request: Request) -> User:
        return svc(request).authenticate(_api_key(request))

    async def refused(request: Request, user: User, run_id: str, seq_id: Any) -> None:
        """A request refused here (before ``Service.submit``) still consumed its seq_id: tell the service so
        the run's later requests do not wait for it (best effort; ``skip_seq`` is optional)."""
        skip = getattr(svc(request), "skip_seq", None)
        if skip is None or not isinstance(seq_id, int):
            return
        try:
            await skip(user, run_id, seq_id)
        except Exception:
            log.info("skip_seq(%s, %s) failed", run_id, seq_id, exc_info=True)

    async def submit_once(user: User, run_id: str, seq_id: int | None, route: str, make: Callable[[], Awaitable[str]]) -> str:
        if seq_id is None:
            return await make()
        key = (run_id, int(seq_id), route)
        hit = dedup.get(key)
        if hit is not None:
            return hit
        rid = await make()
        dedup[key] = rid
        while len(dedup) > _DEDUP_MAX:
            dedup.popitem(last=False)
        return rid

    # ---- config, sessions, telemetry ----------------------------------------------------------------------

    @router.post("/client/config")
    @_guard
    async def client_config(request: Request) -> Any:
        service = svc(request)
        caps = [m.max_tokens_per_request for m in service.capabilities().base_models]
        limits = getattr(getattr(service, "config", None), "limits", None)
        return {**_CLIENT_CONFIG, **client_limits(caps, getattr(limits, "max_request_bytes", 64 * 2**20))}

    @router.post("/client/dynamic_config")
    @_guard
    async def client_dynamic_config(request: Request) -> Any:
        return dict(_DYNAMIC_CONFIG)

    @router.get("/healthz")
    @_guard
    async def healthz() -> Any:
        return {"status": "ok"}

    @router.get("/get_server_capabilities")
    @_guard
    async def get_server_capabilities(request: Request) -> Any:
        caps = svc(request).capabilities()
        return {
            "supported_models": [
                {"model_name": m.name, "max_context_length": m.max_length, "trainable": True, "sampleable": True}
                for m in caps.base_models
            ]
        }

    @router.post("/create_session")
    @_guard
    async def create_session(request: Request) -> Any:
        user = auth(request)
        body = await _json(request)
        meta: dict[str, Any] = dict(body.get("user_metadata") or {})
        for k in ("project_id", "display_name", "sdk_version"):
            if body.get(k) is not None:
                meta.setdefault(k, body[k])
        tags = body.get("tags") or []
        info = await svc(request).create_session(user, client="tinker", metadata=meta, tags=[str(t) for t in tags])
        return {"type": "create_session", "session_id": info.session_id}

    @router.post("/session_heartbeat")
    @_guard
    async def session_heartbeat(request: Request) -> Any:
        user = auth(request)
        body = await _json(request)
        await svc(request).heartbeat(user, _require(body, "session_id"))
        return {"type": "session_heartbeat"}

    @router.post("/sessions/{session_id}/finish")
    @_guard
    async def finish_session(session_id: str, request: Request) -> Any:
        user = auth(request)
        body = await _json(request)
        reason = body.get("reason")
        text = reason.get("type") if isinstance(reason, dict) else (reason or "finished")
        await svc(request).close_session(user, session_id, reason=str(text or "finished"))
        return {}

    @router.post("/telemetry")
    @_guard
    async def telemetry(request: Request) -> Any:
        return {"status": "accepted"}  # accepted and dropped: we collect nothing

    @router.get("/sessions")
    @_guard
    async def list_sessions(request: Request) -> Any:
        user = auth(request)
        sessions = await svc(request).list_sessions(user)
        q = request.query_params
        offset, limit = int(q.get("offset", 0)), int(q.get("limit", 1000))
        return {"sessions": [s.session_id for s in sessions][offset : offset + limit]}

    @router.get("/sessions/{session_id}")
    @_guard
    async def get_session(session_id: str, request: Request) -> Any:
        user = auth(request)
        s = await svc(request).get_session(user, session_id)
        meta = {k: str(v) for k, v in (s.metadata or {}).items() if k not in ("display_name",)}
        return {
            "training_run_ids": list(s.run_ids),
            "sampler_ids": [],
            "user_metadata": meta or None,
            "display_name": (s.metadata or {}).get("display_name"),
        }

    # ---- models -------------------------------------------------------------------------------------------

    @router.post("/create_model")
    @_guard
    async def create_model(request: Request) -> Any:
        user = auth(request)
        body = await _json(request)
        session_id = _require(body, "session_id")
        model_seq_id = _require(body, "model_seq_id", int)
        base_model = _require(body, "base_model")
        _check_optimizer_config(body.get("optimizer_config"))
        raw_lora = body.get("lora_config") or {}
        if not isinstance(raw_lora, dict):
            raise InvalidInputError("lora_config must be an object", field="lora_config")
        lora = LoraConfig.model_validate(
            {k: raw_lora[k] for k in ("rank", "seed", "train_attn", "train_mlp", "train_unembed") if k in raw_lora}
        )
        if not (lora.train_attn or lora.train_mlp or lora.train_unembed):
            raise InvalidInputError("at least one of train_attn/train_mlp/train_unembed must be true", field="lora_config")
        run_id = f"{session_id}:train:{model_seq_id}"
        ref = await svc(request).create_run(
            user, session_id=session_id, base_model=base_model, lora=lora, run_id=run_id,
            metadata=dict(body.get("user_metadata") or {}),
        )
        return {"request_id": _tag(ref.future_id, "create", run_id), "model_id": run_id}

    @router.post("/get_info")
    @_guard
    async def get_info(request: Request) -> Any:
        user = auth(request)
        body = await _json(request)
        run = await svc(request).get_run(user, _require(body, "model_id"))
        tokenizer_id, arch = _tokenizer_for(svc(request), run.base_model)
        return {
            "type": "get_info",
            "model_id": run.run_id,
            "model_data": {"arch": arch, "model_name": run.base_model, "tokenizer_id": tokenizer_id},
            "optimizer_config": {"type": "adamw"},
            "is_lora": True,
            "lora_rank": run.lora.rank,
            "model_name": run.base_model,
        }

    def _tokenizer_for(service: Service, base_model: str) -> tuple[str, str | None]:
        try:
            caps = service.capabilities()
        except Exception:
            return base_model, None
        for m in caps.base_models:
            if m.name == base_model:
                tok = m.tokenizer_id or base_model
                # The SDK rewrites a name with exactly two '/' when it guesses a tokenizer; keep paths safe.
                if tok.startswith("/") and tok.count("/") == 2:
                    tok = tok + "/"
                return tok, m.backend
        return base_model, None

    # ---- training -----------------------------------------------------------------------------------------

    @router.post("/forward_backward")
    @_guard
    async def forward_backward(request: Request) -> Any:
        user = auth(request)
        ctype = (request.headers.get("content-type") or "").lower()
        if "json" in ctype:
            req = codec.decode_forward_backward_json(await _json(request))
        else:
            req = codec.decode_forward_backward(await request.body(), request.headers.get("content-encoding"))
        if not req.data:
            await refused(request, user, req.model_id, req.seq_id)
            raise InvalidInputError("forward_backward needs at least one datum", field="data")
        try:  # the loss registry refuses an unknown loss or a bad config here; the seq_id is consumed all the same
            if req.loss_fn == "stable_reinforce" and not req.forward_only:
                req.data = stability.apply(user.name, req.data, req.target_spans or [None] * len(req.data))
            op = ForwardBackwardOp(
                data=req.data, loss_fn=req.loss_fn, loss_fn_config=req.loss_fn_config, forward_only=req.forward_only
            )
        except TwinkleError:
            await refused(request, user, req.model_id, req.seq_id)
            raise
        tag = "fwd" if req.forward_only else "fb"

        async def make() -> str:
            ref = await svc(request).submit(user, req.model_id, op, seq_id=req.seq_id)
            return _tag(ref.future_id, tag)

        rid = await submit_once(user, req.model_id, req.seq_id, "forward_backward", make)
        return {"request_id": rid, "model_id": req.model_id}

    @router.post("/forward")
    @_guard
    async def forward_json(request: Request) -> Any:
        """Old SDKs (≤0.24) used a JSON ``/forward``; 0.38 sends forward_backward with forward_only."""
        user = auth(request)
        req = codec.decode_forward_backward_json(await _json(request), forward_only=True)
        try:
            op = ForwardBackwardOp(data=req.data, loss_fn=req.loss_fn, loss_fn_config=req.loss_fn_config, forward_only=True)
        except TwinkleError:
            await refused(request, user, req.model_id, req.seq_id)
            raise

        async def make() -> str:
            ref = await svc(request).submit(user, req.model_id, op, seq_id=req.seq_id)
            return _tag(ref.future_id, "fwd")

        rid = await submit_once(user, req.model_id, req.seq_id, "forward", make)
        return {"request_id": rid, "model_id": req.model_id}

    @router.post("/optim_step")
    @_guard
    async def optim_step(request: Request) -> Any:
        user = auth(request)
        body = await _json(request)
        model_id = _require(body, "model_id")
        seq_id = body.get("seq_id")
        try:
            op = OptimStepOp(adam_params=_adam_params(body))
        except TwinkleError:
            await refused(request, user, model_id, seq_id)
            raise

        async def make() -> str:
            ref = await svc(request).submit(user, model_id, op, seq_id=seq_id)
            return _tag(ref.future_id, "opt")

        return {"request_id": await submit_once(user, model_id, seq_id, "optim_step", make), "model_id": model_id}

    async def _save(request: Request, route: str) -> Any:
        user = auth(request)
        body = await _json(request)
        model_id = _require(body, "model_id")
        seq_id = body.get("seq_id")
        ttl = body.get("ttl_seconds")
        try:
            op, tag_parts = _save_op(body, route, model_id, seq_id, ttl)
        except TwinkleError:
            await refused(request, user, model_id, seq_id)
            raise

        async def make() -> str:
            ref = await svc(request).submit(user, model_id, op, seq_id=seq_id)
            return _tag(ref.future_id, *tag_parts)

        return {"request_id": await submit_once(user, model_id, seq_id, route, make), "model_id": model_id}

    def _save_op(body: dict[str, Any], route: str, model_id: str, seq_id: Any, ttl: Any) -> tuple[SaveOp, tuple[Any, ...]]:
        if ttl is not None and (not isinstance(ttl, (int, float)) or isinstance(ttl, bool) or ttl <= 0):
            raise InvalidInputError("ttl_seconds must be a positive number", field="ttl_seconds")
        if route == "save_weights_for_sampler" and body.get("path") is None:
            n = _require(body, "sampling_session_seq_id", int)
            sampler_id = f"{_session_of(model_id)}:sample:{n}"
            op = SaveOp(name=f"ephemeral-s{n}-q{seq_id}", kind="sampler", ttl_seconds=86400.0, overwrite=True)
            tag_parts: tuple[Any, ...] = ("eph", sampler_id)
        else:
            name = _checkpoint_name(body.get("path"), "path")
            kind = {"save_weights": "training", "save_weights_external": "external"}.get(route, "sampler")
            recipients = parse_recipients(body.get("age_encryption_recipients")) if kind == "external" else ()
            op = SaveOp(name=name, kind=kind, ttl_seconds=float(ttl) if ttl else None,
                        overwrite=bool(body.get("overwrite", False)), age_recipients=recipients)
            tag_parts = ("save",)
        return op, tag_parts

    @router.post("/save_weights")
    @_guard
    async def save_weights(request: Request) -> Any:
        return await _save(request, "save_weights")

    @router.post("/save_weights_for_sampler")
    @_guard
    async def save_weights_for_sampler(request: Request) -> Any:
        return await _save(request, "save_weights_for_sampler")

    @router.post("/save_weights_external")
    @_guard
    async def save_weights_external(request: Request) -> Any:
        # a peft adapter (adapter_config.json + adapter_model.safetensors) under external_weights/<name>, each
        # file age-encrypted (<file>.age) when age_encryption_recipients are given
        return await _save(request, "save_weights_external")

    @router.post("/load_weights")
    @_guard
    async def load_weights(request: Request) -> Any:
        user = auth(request)
        body = await _json(request)
        path = _require(body, "path")
        optimizer = bool(body.get("optimizer", False))
        if body.get("session_id") is not None:  # create-via-load
            session_id = _require(body, "session_id")
            model_seq_id = _require(body, "model_seq_id", int)
            _check_optimizer_config(body.get("optimizer_config"))
            run_id = f"{session_id}:train:{model_seq_id}"
            ref = await svc(request).resume_run(
                user, session_id=session_id, checkpoint=path, optimizer=optimizer, run_id=run_id,
                metadata=dict(body.get("user_metadata") or {}),
            )
            return {"request_id": _tag(ref.future_id, "load", run_id), "model_id": run_id}
        model_id = _require(body, "model_id")
        seq_id = body.get("seq_id")
        op = LoadOp(checkpoint=path, optimizer=optimizer)

        async def make() -> str:
            ref = await svc(request).submit(user, model_id, op, seq_id=seq_id)
            return _tag(ref.future_id, "load", model_id)

        return {"request_id": await submit_once(user, model_id, seq_id, "load_weights", make), "model_id": model_id}

    # ---- sampling -----------------------------------------------------------------------------------------

    @router.post("/create_sampling_session")
    @_guard
    async def create_sampling_session(request: Request) -> Any:
        user = auth(request)
        body = await _json(request)
        session_id = _require(body, "session_id")
        n = _require(body, "sampling_session_seq_id", int)
        model_path, base_model = body.get("model_path"), body.get("base_model")
        if not model_path and not base_model:
            raise InvalidInputError("create_sampling_session needs base_model or model_path", field="base_model")
        out = await svc(request).create_sampler(
            user, session_id=session_id, sampler_id=f"{session_id}:sample:{n}",
            base_model=base_model, checkpoint=model_path,
        )
        return {"type": "create_sampling_session", "sampling_session_id": out["sampler_id"]}

    @router.get("/samplers/{sampler_id}")
    @_guard
    async def get_sampler(sampler_id: str, request: Request) -> Any:
        user = auth(request)
        out = await svc(request).get_sampler(user, sampler_id)
        return {"sampler_id": out["sampler_id"], "base_model": out["base_model"], "model_path": out.get("model_path")}

    @router.post("/asample")
    @_guard
    async def asample(request: Request) -> Any:
        user = auth(request)
        body = await _json(request)
        if body.get("target_prompt_logprobs") is not None:
            raise UnsupportedError("target_prompt_logprobs is not supported", field="target_prompt_logprobs")
        if int(body.get("prompt_alt_tokens_k") or 0) > 0:
            raise UnsupportedError("prompt_alt_tokens_k is not supported", field="prompt_alt_tokens_k")
        record = body.get("record_stability_info")
        if record is not None and not isinstance(record, bool):
            raise InvalidInputError("record_stability_info must be a boolean", field="record_stability_info")
        if int(body.get("topk_sample_logprobs") or 0) > 0:
            raise UnsupportedError("topk_sample_logprobs is not supported (prompt top-k is)",
                                   field="topk_sample_logprobs")
        num_samples = body.get("num_samples", 1)
        if not isinstance(num_samples, int) or num_samples < 1:
            raise InvalidInputError("num_samples must be a positive integer", field="num_samples")
        prompt = _prompt_tokens(body.get("prompt"))
        topk = int(body.get("topk_prompt_logprobs") or 0)
        last_n = body.get("prompt_logprobs_last_n")
        want_prompt = bool(body.get("prompt_logprobs")) or topk > 0
        if last_n is not None:
            if not isinstance(last_n, int) or not 1 <= last_n <= max(1, len(prompt) - 1):
                raise InvalidInputError("prompt_logprobs_last_n must be between 1 and len(prompt)-1",
                                        field="prompt_logprobs_last_n")
        op = SampleOp(
            prompt=prompt, num_samples=num_samples, params=_sampling_params(body.get("sampling_params")),
            prompt_logprobs=want_prompt, topk_prompt_logprobs=topk,
        )
        sid = body.get("sampling_session_id")
        if sid:
            ref = await svc(request).sample(user, op, sampler_id=sid)
        elif body.get("model_path"):
            ref = await svc(request).sample(user, op, checkpoint=body["model_path"], base_model=body.get("base_model"))
        elif body.get("base_model"):
            ref = await svc(request).sample(user, op, base_model=body["base_model"])
        else:
            raise InvalidInputError("asample needs sampling_session_id, model_path or base_model",
                                    field="sampling_session_id")
        rid = _tag(ref.future_id, "smp", "" if last_n is None else last_n, topk, "rec" if record else "")
        return {
            "request_id": rid,
            "sample_sequence_ids": [f"{ref.future_id}-{i}" for i in range(num_samples)],
        }

    # ---- futures ------------------------------------------------------------------------------------------

    @router.post("/retrieve_future")
    @_guard
    async def retrieve_future(request: Request) -> Any:
        user = auth(request)
        body = await _json(request)
        rid = _require(body, "request_id")
        parts = rid.split(_SEP)
        future_id, tag, extra = parts[0], (parts[1] if len(parts) > 1 else ""), parts[2:]
        state = await svc(request).wait(user, future_id, timeout=RETRIEVE_HOLD_S)
        if state.status == "pending":
            return {"type": "try_again", "request_id": rid, "queue_state": "active"}
        if state.status == "failed":
            err = state.error or {}
            category = str(err.get("category") or "unknown").lower()
            if category not in ("user", "server", "unknown"):
                category = "unknown"
            return {"error": str(err.get("error") or err.get("message") or "request failed"), "category": category}
        if tag == "smp" and len(extra) > 2 and extra[2] == "rec":
            stability.record(user.name, future_id, state.result)
        return await _shape_result(svc(request), user, tag, extra, state.result)

    async def _shape_result(service: Service, user: User, tag: str, extra: list[str], result: Any) -> Any:
        if tag in ("fb", "fwd"):
            return Response(codec.encode_forward_backward_output(result), media_type=PROTO)
        if tag == "smp":
            last_n = int(extra[0]) if extra and extra[0] else None
            k = int(extra[1]) if len(extra) > 1 and extra[1] else 0
            return Response(codec.encode_sample_response(result, prompt_logprobs_last_n=last_n, topk_prompt_k=k),
                            media_type=PROTO)
        if tag == "opt":
            metrics = _get(result, "metrics")
            return {"type": "optim_step", "metrics": codec.normalize_metrics(metrics) if metrics else None}
        if tag == "create":
            return {"type": "create_model", "model_id": _get(result, "run_id") or (extra[0] if extra else None)}
        if tag == "load":
            model_id = _get(result, "run_id") or (extra[0] if extra else None)
            path = _get(result, "path") if isinstance(result, (CheckpointInfo, dict)) else None
            return {"type": "load_weights", "model_id": model_id, "path": path}
        if tag == "save":
            return {"path": _get(result, "path")}
        if tag == "eph":
            sampler_id = extra[0]
            if sampler_id not in ephemeral_done:
                await service.create_sampler(
                    user, session_id=sampler_id.split(":", 1)[0], sampler_id=sampler_id,
                    checkpoint=_get(result, "path"),
                )
                ephemeral_done.add(sampler_id)
            return {"type": "save_weights_for_sampler", "path": None, "sampling_session_id": sampler_id}
        if isinstance(result, (RunInfo, CheckpointInfo)):
            return result.model_dump(mode="json")
        return result if isinstance(result, dict) else {"result": result}

    # ---- REST: training runs, checkpoints, weights info ----------------------------------------------------

    async def _latest(service: Service, user: User, run_id: str) -> tuple[CheckpointInfo | None, CheckpointInfo | None]:
        cks = await service.list_checkpoints(user, run_id)
        train = [c for c in cks if c.kind == "training"]
        samp = [c for c in cks if c.kind == "sampler" and not c.name.startswith("ephemeral-")]
        key = lambda c: c.created_at  # noqa: E731
        return (max(train, key=key) if train else None, max(samp, key=key) if samp else None)

    @router.get("/training_runs")
    @_guard
    async def list_training_runs(request: Request) -> Any:
        user = auth(request)
        q = request.query_params
        limit, offset = int(q.get("limit", 20)), int(q.get("offset", 0))
        runs, total = await svc(request).list_runs(user, limit=limit, offset=offset)
        return {
            "training_runs": [codec.run_to_json(r) for r in runs],
            "cursor": {"offset": offset, "limit": limit, "total_count": total},
        }

    @router.get("/training_runs/{run_id}")
    @_guard
    async def get_training_run(run_id: str, request: Request) -> Any:
        user = auth(request)
        run = await svc(request).get_run(user, run_id)
        last, last_s = await _latest(svc(request), user, run_id)
        return codec.run_to_json(run, last_checkpoint=last, last_sampler=last_s)

    @router.get("/training_runs/{run_id}/checkpoints")
    @_guard
    async def list_checkpoints(run_id: str, request: Request) -> Any:
        user = auth(request)
        await svc(request).get_run(user, run_id)  # 404 for an unknown / foreign run
        cks = await svc(request).list_checkpoints(user, run_id)
        return {"checkpoints": [codec.checkpoint_to_json(c) for c in cks]}

    @router.get("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}/external_weights_urls")
    @_guard
    async def external_weights_urls(run_id: str, checkpoint_id: str, request: Request) -> Any:
        user = auth(request)
        service = svc(request)
        if not checkpoint_id.startswith("external_weights/"):
            raise InvalidInputError("only external_weights/<name> checkpoints have download URLs",
                                    field="checkpoint_id")
        await service.get_run(user, run_id)  # 404 for an unknown / foreign run
        ck = next((c for c in await service.list_checkpoints(user, run_id) if c.checkpoint_id == checkpoint_id),
                  None)
        if ck is None:
            raise NotFoundError(f"checkpoint {checkpoint_id!r} of run {run_id!r} not found", field="checkpoint_id")
        directory = service.checkpoints.directory_of(ck)
        signer = url_signer(service)
        base = str(request.base_url).rstrip("/")
        urls, expires = {}, 0.0
        for f in sorted(p for p in directory.rglob("*") if p.is_file()):
            rel = f.relative_to(directory).as_posix()
            token, expires = signer.sign({"u": user.name, "p": ck.path, "f": rel}, EXTERNAL_URL_TTL_S)
            urls[rel] = f"{base}/api/v1/external_weights_files/{token}"
        return {"urls": urls, "expires": codec._iso(expires or None)}

    @router.get("/external_weights_files/{token}")
    @_guard
    async def external_weights_file(token: str, request: Request) -> Any:
        """A file of an external weights export, by a signed URL (no API key: the URL is the credential)."""
        service = svc(request)
        claims = url_signer(service).verify(token)
        directory = service.checkpoints.readable_dir(str(claims.get("u")), str(claims.get("p")))
        f = (directory / str(claims.get("f"))).resolve()
        if directory not in f.parents or not f.is_file():
            raise NotFoundError("download link not found", field="token")
        return FileResponse(f, media_type="application/octet-stream", filename=f.name)

    @router.post("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}/publish")
    @_guard
    async def publish(run_id: str, checkpoint_id: str, request: Request) -> Any:
        user = auth(request)
        await svc(request).set_checkpoint_public(user, run_id, checkpoint_id, True)
        return {}

    @router.delete("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}/publish")
    @_guard
    async def unpublish(run_id: str, checkpoint_id: str, request: Request) -> Any:
        user = auth(request)
        await svc(request).set_checkpoint_public(user, run_id, checkpoint_id, False)
        return {}

    @router.put("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}/ttl")
    @_guard
    async def set_ttl(run_id: str, checkpoint_id: str, request: Request) -> Any:
        user = auth(request)
        body = await _json(request)
        ttl = body.get("ttl_seconds")
        await svc(request).set_checkpoint_ttl(user, run_id, checkpoint_id, check_ttl_seconds(ttl))
        return {}

    @router.delete("/training_runs/{run_id}/checkpoints/{checkpoint_id:path}")
    @_guard
    async def delete_checkpoint(run_id: str, checkpoint_id: str, request: Request) -> Any:
        user = auth(request)
        await svc(request).delete_checkpoint(user, run_id, checkpoint_id)
        return {}

    @router.get("/checkpoints")
    @_guard
    async def list_user_checkpoints(request: Request) -> Any:
        user = auth(request)
        q = request.query_params
        limit, offset = int(q.get("limit", 100)), int(q.get("offset", 0))
        cks = sorted(await svc(request).list_checkpoints(user), key=lambda c: c.created_at, reverse=True)
        page = cks[offset : offset + limit]
        return {
            "checkpoints": [codec.checkpoint_to_json(c) for c in page],
            "cursor": {"offset": offset, "limit": limit, "total_count": len(cks)},
        }

    @router.post("/weights_info")
    @_guard
    async def weights_info(request: Request) -> Any:
        user = auth(request)
        body = await _json(request)
        path = _require(body, "tinker_path")
        ck = await svc(request).get_checkpoint(user, path)
        try:
            run = await svc(request).get_run(user, ck.run_id)
        except NotFoundError:
            raise NotFoundError(f"training run of {path} is not visible", field="tinker_path") from None
        return {
            "base_model": run.base_model,
            "optimizer_config": {"type": "adamw"},
            "is_lora": True,
            "lora_rank": run.lora.rank,
            "train_unembed": run.lora.train_unembed,
            "train_mlp": run.lora.train_mlp,
            "train_attn": run.lora.train_attn,
        }

    # ---- routes we answer with a clear "unsupported" -----------------------------------------------------

    def _unsupported(route: str) -> Callable[..., Awaitable[Any]]:
        @_guard
        async def handler(request: Request) -> Any:
            raise UnsupportedError(f"Tinker route '{route}' is not supported by this Twinkle server", field="route")

        handler.__name__ = "unsupported_" + route.replace("/", "_").replace("{", "").replace("}", "")
        return handler

    for route in _UNSUPPORTED_POST:
        router.add_api_route("/" + route, _unsupported(route), methods=["POST"], include_in_schema=False)
    for route in _UNSUPPORTED_GET:
        router.add_api_route("/" + route, _unsupported(route), methods=["GET"], include_in_schema=False)
    router.add_api_route("/sessions/{sid}/project", _unsupported("sessions/{sid}/project"), methods=["PUT"],
                         include_in_schema=False)

    return router


def create_router() -> APIRouter:
    """What ``twinkle.server.app.create_app`` mounts under ``/api/v1`` (service from ``app.state.service``)."""
    return tinker_router()
