"""Tinker-SDK-compatible front door: ``tinker_router(service_getter)`` mounts under ``/api/v1``."""

from .routes import RETRIEVE_HOLD_S, create_router, tinker_router

__all__ = ["RETRIEVE_HOLD_S", "create_router", "tinker_router"]
