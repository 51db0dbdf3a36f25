"""``/openapi.json``, ``/docs`` and ``/redoc`` behind an API key (the schema lists every route and limit; only
``/api/v1/healthz`` is public, see SECURITY.md)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse

from .deps import get_user
from .service import User

__all__ = ["PUBLIC_ROUTES", "docs_router"]

PUBLIC_ROUTES = (("GET", "/api/v1/healthz"),)
"""The only routes answered without a key (Ray Serve's own proxy also answers ``/-/healthz`` and
``/-/routes``, outside this app)."""


def docs_router(app: FastAPI) -> APIRouter:
    r = APIRouter(include_in_schema=False)

    @r.get("/openapi.json")
    async def openapi(user: User = Depends(get_user)) -> Any:
        return JSONResponse(app.openapi())

    @r.get("/docs")
    async def docs(user: User = Depends(get_user)) -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} – API")

    @r.get("/redoc")
    async def redoc(user: User = Depends(get_user)) -> HTMLResponse:
        return get_redoc_html(openapi_url="/openapi.json", title=f"{app.title} – API")

    return r
