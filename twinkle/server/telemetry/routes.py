"""Usage routes: ``GET /api/v1/twinkle/usage`` (your own; an admin may ask for a user or everyone) and
``GET /api/v1/twinkle/admin/usage`` (admins: every user). Both take a time window (``since``/``until``:
ISO time, epoch seconds or a duration back from now such as ``24h``)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, Field

from twinkle.types import ForbiddenError

from ..deps import get_service, get_user
from ..service import Service, User
from .usage import parse_time

__all__ = ["ForbiddenError", "ServerLoad", "UsageReport", "UsageRow", "create_usage_router"]


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


class ReplicaLoad(BaseModel):
    base_model: str
    replica: int
    queue_depth: int
    adapters: int


class ServerLoad(BaseModel):
    """The server's live load and the caller's usage (for the JupyterLab panel)."""

    window_s: float = Field(description="tokens_per_s is averaged over this many seconds")
    tokens_per_s: dict[str, float] = Field(description="trained / prefilled / sampled, all users")
    queue_depth: int = Field(description="requests queued or running on all worker replicas")
    replicas: list[ReplicaLoad]
    usage: list[UsageRow] = Field(description="the caller's own usage (all time)")


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

    @router.get("/load", response_model=ServerLoad, summary="Live load (queue depth, tokens/s) and your usage")
    async def load(user: User = Depends(get_user), service: Service = Depends(get_service)) -> Any:
        from .usage import RATE_WINDOW_S

        status = await service.status()
        reps = [ReplicaLoad(base_model=w.base_model, replica=w.replica, queue_depth=w.queue_depth,
                            adapters=w.adapters) for w in status.workers]
        rows = await service.get_usage(user)
        return ServerLoad(window_s=RATE_WINDOW_S, tokens_per_s=service.usage.rates(),
                          queue_depth=sum(r.queue_depth for r in reps), replicas=reps,
                          usage=[UsageRow(**r) for r in rows])

    return router
