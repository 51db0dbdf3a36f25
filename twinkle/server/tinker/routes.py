"""The Tinker-compatible HTTP API (the unmodified ``tinker`` 0.38 SDK talks to it), assembled from one
``APIRouter`` per area:

=================  =====================================================================================
``sessions``       client/config, dynamic_config, create_session, heartbeat, finish, telemetry, sessions
``training``       create_model, get_info, forward_backward (protobuf or JSON), forward, optim_step
``weights``        save_weights, save_weights_for_sampler, save_weights_external, load_weights
``sampling``       create_sampling_session, samplers/{id}, asample
``futures``        retrieve_future
``rest``           training_runs, their checkpoints, checkpoints, weights_info
=================  =====================================================================================

Request bodies are pydantic models (``models``), query parameters are typed, so ``/openapi.json`` documents
every body and a bad value is a 400 naming the field. Protobuf bodies go through ``codec`` into the same
models. Mount on a gateway app (the service is ``app.state.service``)::

    app.include_router(create_router(), prefix="/api/v1")

or on any app with an explicit service: ``app.include_router(tinker_router(lambda: service), prefix="/api/v1")``.

Wire rules (see ``docs/tinker-compat.md`` and the SDK's behaviour): auth is ``X-API-Key`` (``Authorization:
Bearer`` also accepted) on every route except ``healthz``; future routes answer ``{"request_id",
"model_id"?, "sample_sequence_ids"?}`` where the request id is the service future id plus a tag saying how
to shape the result; user errors are 4xx ``{error, category, code, detail}`` (never 402 or 409).
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter, Depends, Request

from twinkle.types import UnsupportedError

from ..service import Service
from . import futures, rest, sampling, sessions, training, weights
from ._common import TinkerRoute, bind_service, tinker_user
from .futures import RETRIEVE_HOLD_S

__all__ = ["AREAS", "RETRIEVE_HOLD_S", "UNSUPPORTED_GET", "UNSUPPORTED_POST", "create_router", "tinker_router"]

# The order FastAPI tries them in: a request scans every route of the areas before its own (twice its own),
# so the SDK's hot calls come first: retrieve_future (every call's second request), then forward_backward /
# optim_step, asample. In process, mock: 2.23 -> 1.78 ms of CPU per forward_backward + retrieve_future.
AREAS = (futures.router, training.router, sampling.router, sessions.router, weights.router, rest.router)

UNSUPPORTED_POST = (
    "auth/token", "create_custom_loss", "copy_weights", "join_sampling_session", "retrieve_futures",
    "cancel_future", "unload_model", "sessions/search", "audit", "billing/usage/events",
    "billing/usage/checkpoints/current",
)
UNSUPPORTED_GET = ("auth/apikey/me", "sessions/{sid}/trace_export", "audit", "whoami")


def _unsupported_router() -> APIRouter:
    """Routes of the hosted service we do not serve: a clear 400 naming the route (after auth)."""
    r = APIRouter(route_class=TinkerRoute)

    def handler_for(route: str) -> Callable[..., object]:
        async def handler(request: Request, _user: object = Depends(tinker_user)) -> None:
            raise UnsupportedError(f"Tinker route '{route}' is not supported by this Twinkle server", field="route")

        handler.__name__ = "unsupported_" + route.replace("/", "_").replace("{", "").replace("}", "")
        return handler

    for route in UNSUPPORTED_POST:
        r.add_api_route("/" + route, handler_for(route), methods=["POST"], include_in_schema=False)
    for route in UNSUPPORTED_GET:
        r.add_api_route("/" + route, handler_for(route), methods=["GET"], include_in_schema=False)
    r.add_api_route("/sessions/{sid}/project", handler_for("sessions/{sid}/project"), methods=["PUT"],
                    include_in_schema=False)
    return r


def tinker_router(service_getter: Callable[[], Service] | None = None, *, health: bool = True) -> APIRouter:
    """All Tinker routes, to be mounted with ``prefix="/api/v1"``. With ``service_getter`` each request uses
    ``service_getter()``; without, ``request.app.state.service`` (the gateway's convention). ``health``:
    include ``GET healthz`` (the gateway has its own)."""
    deps = [Depends(bind_service(service_getter))] if service_getter is not None else []
    router = APIRouter(dependencies=deps)
    for area in (sessions.health_router, *AREAS) if health else AREAS:
        router.include_router(area)
    router.include_router(_unsupported_router())
    return router


def create_router() -> APIRouter:
    """What ``twinkle.server.app.create_app`` mounts under ``/api/v1`` (service from ``app.state.service``)."""
    return tinker_router(health=False)
