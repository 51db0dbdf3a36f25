"""FastAPI dependencies shared by the native and the Tinker-compatible routes.

Routes get the gateway's ``Service`` with ``Depends(get_service)`` and the caller with ``Depends(get_user)``
(``X-API-Key: <key>`` or ``Authorization: Bearer <key>``; a missing/unknown/revoked key is a 401). Both are
``async def`` so FastAPI runs them on the event loop (a plain ``def`` dependency costs a threadpool hop per
request); neither blocks (keys are cached after the first SQLite lookup).

The Tinker routes plug in by exposing ``twinkle.server.tinker.create_router() -> fastapi.APIRouter``;
``twinkle.server.app.create_app`` mounts it under ``/api/v1``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

import numpy as np
from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute

from twinkle.types import InvalidInputError, TwinkleError

from .service import Service, User

__all__ = ["CompactJSONRoute", "api_key_from_headers", "api_key_from_request", "field_of", "get_service", "get_user", "loads_compact",
           "validation_error"]


def _compact_tensor(obj: dict[str, Any]) -> dict[str, Any]:
    """``json.loads`` object hook: a tensor (``{"data": [numbers], "dtype": "int64" | "float32", "shape"?}``)
    gets its values as a numpy array the moment its object is parsed, so its list (32 bytes a float, 36 an int
    over 256) is freed before the rest of the body is read. Anything else (bools, text, nested lists, values
    out of range) is left as it came: the models validate it and name the field."""
    data = obj.get("data")
    if type(data) is not list or len(data) < 16 or obj.get("dtype") not in ("int64", "float32") \
            or not obj.keys() <= {"data", "dtype", "shape"}:
        return obj
    if all(type(x) is int for x in data):
        try:
            obj["data"] = np.asarray(data, dtype=np.int64)
        except OverflowError:
            pass
    elif all(type(x) is float or type(x) is int for x in data):
        obj["data"] = np.asarray(data, dtype=np.float64)
    return obj


def loads_compact(raw: bytes | str) -> Any:
    """A request body as ``json.loads`` gives it, with each tensor's values already compact: a large body peaks
    at a few times its size while it is decoded, not ten (``tests/server/test_decode_memory.py``)."""
    return json.loads(raw, object_hook=_compact_tensor)


class _CompactJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = loads_compact(await self.body())
        return self._json




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
    return api_key_from_headers(request.headers)


def api_key_from_headers(headers: Mapping[str, str]) -> str | None:
    """The key a request carries: ``X-API-Key``, else ``Authorization: Bearer``."""
    key = headers.get("x-api-key")
    if key:
        return key.strip()
    auth = headers.get("authorization")
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


def _depends_on(dependant: Any, fn: Any) -> bool:
    return any(d.call is fn or _depends_on(d, fn) for d in dependant.dependencies)


class CompactJSONRoute(APIRoute):
    """A route whose JSON body is parsed with :func:`loads_compact` (what FastAPI's body parameters validate),
    and, where the route needs a key, only after the key is checked: FastAPI reads and parses a body before it
    runs the dependencies, so without this a request with no key could make the gateway decode 64 MB."""

    key_dependency: Callable[..., Any] = staticmethod(get_user)
    """The dependency that checks the key; a route that uses it has the key checked before its body is read."""

    async def check_key(self, request: Request) -> None:
        await get_user(request)

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        key_first = self.body_field is not None and _depends_on(self.dependant, self.key_dependency)

        # only bodies whose tensors are the point: elsewhere a tensor-shaped object in free-form metadata would
        # become an array the models cannot store (a 500 on every later listing of the user's runs)
        tensors = self.path.endswith(("/forward", "/forward_backward"))

        async def compact(request: Request) -> Response:
            if tensors:
                request = _CompactJSONRequest(request.scope, request.receive)
            if key_first:
                await self.check_key(request)  # a 401 before one byte of the body is read
            return await handler(request)

        return compact
