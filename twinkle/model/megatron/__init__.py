"""The megatron-core backend (``backend: megatron``). Imports megatron lazily."""

from __future__ import annotations

from typing import Any

__all__ = ["MegatronBackend"]


def __getattr__(name: str) -> Any:
    if name == "MegatronBackend":
        from .backend import MegatronBackend

        return MegatronBackend
    raise AttributeError(name)
