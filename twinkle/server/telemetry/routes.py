"""Usage routes: ``GET /api/v1/twinkle/usage`` (your own; an admin may ask for a user or everyone) and
``GET /api/v1/twinkle/admin/usage`` (admins: every user). Both take a time window (``since``/``until``:
ISO time, epoch seconds or a duration back from now such as ``24h``)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, Field

from twinkle.types import TwinkleError

from ..deps import get_service, get_user
from ..service import Service, User
from .usage import parse_time

__all__ = ["ForbiddenError", "UsageReport", "UsageRow", "create_usage_router"]


class ForbiddenError(TwinkleError):
    """The caller is known but may not read this (another user's usage)."""

    status = 403
    category = "user"
    code = "forbidden"


class UsageRow(BaseModel):
    user: str
    base_model: str
    tokens_trained: int = Field(description="tokens in forward_backward requests")
    tokens_prefilled: int = Field(description="tokens in forward requests and sampling prompts")
    tokens_sampled: int = Field(description="tokens generated")
    requests: int = Field(description="operations metered")
    checkpoint_bytes: int = Field(description="bytes of checkpoints stored now")
    checkpoints: int = Field(description="checkpoints stored now")


class UsageReport(BaseModel):
    since: float | None = None
    until: float | None = None
    rows: list[UsageRow]


def create_usage_router() -> APIRouter:
    router = APIRouter(prefix="/api/v1/twinkle", tags=["usage"])

    @router.get("/usage", response_model=UsageReport, summary="Usage (tokens, checkpoint storage) of the caller")
    async def usage(
        since: str | None = Query(None, description="ISO time, epoch seconds, or a duration such as 24h"),
        until: str | None = Query(None, description="ISO time, epoch seconds, or a duration such as 1h"),
        user_name: str | None = Query(None, alias="user", description="admins: another user's usage"),
        user: User = Depends(get_user), service: Service = Depends(get_service),
    ) -> Any:
        t0, t1 = parse_time(since, field="since"), parse_time(until, field="until")
        rows = await service.get_usage(user, of_user=user_name, since=t0, until=t1)
        return UsageReport(since=t0, until=t1, rows=[UsageRow(**r) for r in rows])

    @router.get("/admin/usage", response_model=UsageReport, summary="Usage of every user (admins)")
    async def admin_usage(
        since: str | None = Query(None), until: str | None = Query(None),
        user: User = Depends(get_user), service: Service = Depends(get_service),
    ) -> Any:
        t0, t1 = parse_time(since, field="since"), parse_time(until, field="until")
        rows = await service.get_usage(user, all_users=True, since=t0, until=t1)
        return UsageReport(since=t0, until=t1, rows=[UsageRow(**r) for r in rows])

    return router
