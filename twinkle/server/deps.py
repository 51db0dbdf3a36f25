"""FastAPI dependencies shared by the native and the Tinker-compatible routes.

Routes get the gateway's ``Service`` with ``Depends(get_service)`` and the caller with ``Depends(get_user)``
(``X-API-Key: <key>`` or ``Authorization: Bearer <key>``; a missing/unknown/revoked key is a 401). Both are
``async def`` so FastAPI runs them on the event loop (a plain ``def`` dependency costs a threadpool hop per
request); neither blocks (keys are cached after the first SQLite lookup).

The Tinker routes plug in by exposing ``twinkle.server.tinker.create_router() -> fastapi.APIRouter``;
``twinkle.server.app.create_app`` mounts it under ``/api/v1``.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError

from twinkle.types import InvalidInputError, TwinkleError

from .service import Service, User

__all__ = ["api_key_from_request", "field_of", "get_service", "get_user", "validation_error"]


def field_of(loc: tuple[Any, ...]) -> str:
    """A pydantic error location as the dotted field name the 4xx body names (``adam_params.beta1``,
    ``data[0].model_input``); ``body``/``query``/``path`` prefixes dropped."""
    parts = [p for p in loc if p not in ("body", "query", "path", "header")]
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else ("." if out else "") + str(p)
    return out or "body"


def validation_error(exc: RequestValidationError) -> TwinkleError:
    """The ``TwinkleError`` (a 400 naming the first bad field) for a request FastAPI could not validate."""
    errs = exc.errors()
    first = errs[0] if errs else {}
    if first.get("type") == "json_invalid":  # its location is a character offset, not a field
        return InvalidInputError(f"request body is not valid JSON: {first.get('msg')}", field="body")
    field = field_of(tuple(first.get("loc", ())))
    inner = (first.get("ctx") or {}).get("error")
    if isinstance(inner, TwinkleError):  # a validator raised one of ours: keep its class and field
        inner.detail.setdefault("field", inner.field or field)
        return inner
    msg = "; ".join(f"{field_of(tuple(e.get('loc', ())))}: {e.get('msg')}" for e in errs[:5])
    return InvalidInputError(f"invalid request: {msg}", field=field, detail={"errors": [
        {"field": field_of(tuple(e.get("loc", ()))), "msg": e.get("msg")} for e in errs[:20]]})


async def get_service(request: Request) -> Service:
    return request.app.state.service


def api_key_from_request(request: Request) -> str | None:
    key = request.headers.get("x-api-key")
    if key:
        return key.strip()
    auth = request.headers.get("authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    return None


async def get_user(request: Request) -> User:
    service: Service = request.app.state.service
    user = service.authenticate(api_key_from_request(request))
    request.state.user = user
    return user
