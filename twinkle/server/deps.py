"""FastAPI dependencies shared by the native and the Tinker-compatible routes.

Routes get the gateway's ``Service`` with ``Depends(get_service)`` and the caller with ``Depends(get_user)``
(``X-API-Key: <key>`` or ``Authorization: Bearer <key>``; a missing/unknown/revoked key is a 401). Both are
``async def`` so FastAPI runs them on the event loop (a plain ``def`` dependency costs a threadpool hop per
request); neither blocks (keys are cached after the first SQLite lookup).

The Tinker routes plug in by exposing ``twinkle.server.tinker.create_router() -> fastapi.APIRouter``;
``twinkle.server.app.create_app`` mounts it under ``/api/v1``.
"""

from __future__ import annotations

from fastapi import Request

from .service import Service, User

__all__ = ["api_key_from_request", "get_service", "get_user"]


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
