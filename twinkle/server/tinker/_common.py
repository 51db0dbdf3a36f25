"""What every Tinker router shares: the route class that turns errors into the SDK's 4xx shape, the service
and caller dependencies, per-service state (seq_id dedup, ephemeral samplers) and request-id tags."""

from __future__ import annotations

import logging
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from twinkle.types import InvalidInputError, TwinkleError

from ..deps import CompactJSONRoute, api_key_from_request, validation_error
from ..service import Service, User

__all__ = [
    "PROTO",
    "SEP",
    "TinkerRoute",
    "TinkerState",
    "error_response",
    "max_request_bytes",
    "max_tokens_any_model",
    "refused",
    "state_of",
    "submit_once",
    "tag",
    "tinker_service",
    "tinker_user",
]

log = logging.getLogger("twinkle.server.tinker")

PROTO = "application/x-protobuf"
SEP = "|"
_DEDUP_MAX = 20000
_SERVICE_ATTR = "tinker_service"


def error_response(err: TwinkleError) -> JSONResponse:
    """``{error, category, code, detail}``; never 402/409 (the SDK loops or retries on them)."""
    status = 400 if err.status in (402, 409) else err.status
    headers = {}
    retry_after = getattr(err, "retry_after", None)
    if status == 429 and retry_after:
        headers["retry-after-ms"] = str(int(float(retry_after) * 1000))
    return JSONResponse(err.to_dict(), status_code=status, headers=headers)


class TinkerRoute(CompactJSONRoute):
    """A route whose errors answer in the Tinker SDK's shape on any app (the gateway or a bare test app):
    Twinkle errors and body/query validation failures are 4xx naming the field; anything else is a logged
    500 with an error id and no traceback. A training request refused for its body still consumed its
    ``seq_id``: the run's later requests are told not to wait for it."""

    @property
    def key_dependency(self) -> Callable[..., Any]:  # type: ignore[override]
        return tinker_user

    async def check_key(self, request: Request) -> None:
        if getattr(request.state, _SERVICE_ATTR, None) is None and hasattr(request.app.state, "service"):
            await tinker_user(request, request.app.state.service)
        # else a router bound to its own service (tinker_router(getter)): its dependencies check the key

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        name = self.name

        async def guarded(request: Request) -> Response:
            try:
                return await handler(request)
            except TwinkleError as e:
                log.info("tinker %s refused: %s", name, e)
                return error_response(e)
            except StarletteHTTPException as e:
                if e.status_code != 400:  # 404/405 and the like: the app's handler answers them
                    raise
                return error_response(InvalidInputError(f"invalid request body: {e.detail}", field="body"))
            except RequestValidationError as e:
                body = getattr(e, "body", None)
                if isinstance(body, dict):
                    await _skip_from_body(request, body)
                err = validation_error(e)
                log.info("tinker %s refused: %s", name, err)
                return error_response(err)
            except Exception:  # a server bug: log it once, never leak a traceback
                rid = uuid.uuid4().hex[:12]
                log.exception("tinker route %s failed (error id %s)", name, rid)
                return JSONResponse(
                    {"error": f"internal server error (id {rid})", "category": "server", "code": "internal_error",
                     "detail": {"error_id": rid}},
                    status_code=500,
                )

        return guarded


async def tinker_service(request: Request) -> Service:
    """The gateway's ``Service`` (``tinker_router(getter)`` binds another one per router)."""
    bound = getattr(request.state, _SERVICE_ATTR, None)
    return bound if bound is not None else request.app.state.service


def bind_service(getter: Callable[[], Service]) -> Callable[[Request], Awaitable[None]]:
    async def _bind(request: Request) -> None:
        setattr(request.state, _SERVICE_ATTR, getter())

    return _bind


async def tinker_user(request: Request, service: Service = Depends(tinker_service)) -> User:
    """The caller (``X-API-Key``, or ``Authorization: Bearer``); a missing or unknown key is a 401."""
    user = service.authenticate(api_key_from_request(request))
    request.state.user = user
    return user


class TinkerState:
    """Per-service state of the Tinker front door (one gateway replica; see docs/tinker-compat.md). ``dedup``: (user, run, seq_id, route) → request id, so a
    resubmitted seq_id (the SDK's holder retry) gets the same future; the user is part of the key, so
    another user's run id never hits it (ownership before dedup). ``ephemeral_done``: ephemeral sampler ids
    already registered after their save completed."""

    def __init__(self) -> None:
        from ..stability import StabilityStore

        self.dedup: OrderedDict[tuple[str, str, int, str], str] = OrderedDict()
        self.ephemeral_done: set[str] = set()
        # stable_reinforce: samples recorded with record_stability_info, read back by forward_backward
        self.stability = StabilityStore()
        self.signers: dict[str, Any] = {}

    def url_signer(self, service: Service) -> Any:
        """The signer of external-weights download URLs for this service's checkpoint root."""
        from ..export import UrlSigner

        root = service.checkpoints.root
        if str(root) not in self.signers:
            self.signers[str(root)] = UrlSigner.for_root(root)
        return self.signers[str(root)]


_STATES: weakref.WeakKeyDictionary[Any, TinkerState] = weakref.WeakKeyDictionary()


def state_of(service: Service) -> TinkerState:
    st = _STATES.get(service)
    if st is None:
        st = _STATES[service] = TinkerState()
    return st


async def submit_once(service: Service, user: User, run_id: str, seq_id: int | None, route: str,
                      make: Callable[[], Awaitable[str]]) -> str:
    if seq_id is None:
        return await make()
    dedup = state_of(service).dedup
    key = (user.name, run_id, int(seq_id), route)
    hit = dedup.get(key)
    if hit is not None:
        return hit
    rid = await make()
    dedup[key] = rid
    while len(dedup) > _DEDUP_MAX:
        dedup.popitem(last=False)
    return rid


async def refused(service: Service, user: User, run_id: str, seq_id: Any) -> None:
    """A request refused before ``Service.submit`` still consumed its seq_id: tell the service so the run's
    later requests do not wait for it (best effort)."""
    skip = getattr(service, "skip_seq", None)
    if skip is None or not isinstance(seq_id, int) or isinstance(seq_id, bool):
        return
    try:
        await skip(user, run_id, seq_id)
    except Exception:
        log.info("skip_seq(%s, %s) failed", run_id, seq_id, exc_info=True)


async def _skip_from_body(request: Request, body: dict[str, Any]) -> None:
    user = getattr(request.state, "user", None)
    model_id = body.get("model_id")
    if user is None or not isinstance(model_id, str):
        return
    await refused(await tinker_service(request), user, model_id, body.get("seq_id"))


def max_request_bytes(service: Service) -> int:
    """The configured ``limits.max_request_bytes`` (the config schema's default for a service without one)."""
    config = getattr(service, "config", None)
    if config is not None:
        return int(config.limits.max_request_bytes)
    from ..config import LimitsConfig

    return int(LimitsConfig().max_request_bytes)


def max_tokens_any_model(service: Service) -> int | None:
    """The most tokens any served model takes in one request (None for a service without a config)."""
    config = getattr(service, "config", None)
    if config is None or not config.models:
        return None
    return max(min(m.max_tokens_per_request, config.limits.max_tokens_per_request) for m in config.models)


def tag(future_id: str, *parts: Any) -> str:
    """A request id: the service future id plus how to shape its result (no state a replica would miss)."""
    return SEP.join([future_id, *(str(p) for p in parts)])


def checkpoint_name(value: str | None, field: str) -> str:
    if not value:
        raise InvalidInputError(f"{field} must be a non-empty name", field=field)
    if "/" in value or SEP in value:
        raise InvalidInputError(f"{field} {value!r} must not contain '/' or '|'", field=field)
    return value


def session_of(run_id: str) -> str:
    return run_id.split(":train:", 1)[0] if ":train:" in run_id else run_id.split(":", 1)[0]
