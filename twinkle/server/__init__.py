"""The Twinkle server: config + CLI, Ray Serve application, native and Tinker-compatible routes, scheduler.

Public names load lazily, so ``import twinkle.server.worker`` in a Ray worker does not pull in FastAPI and a
gateway does not pull in torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "ModelConfig",
    "ServerConfig",
    "Service",
    "Store",
    "User",
    "build_serve_app",
    "create_app",
    "launch",
    "load_config",
    "parse_config",
]

_WHERE = {
    "ModelConfig": "config",
    "ServerConfig": "config",
    "load_config": "config",
    "parse_config": "config",
    "Service": "service",
    "User": "service",
    "Store": "store",
    "create_app": "app",
    "build_serve_app": "app",
    "launch": "launcher",
}


def __getattr__(name: str) -> Any:
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module 'twinkle.server' has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{mod}"), name)
