"""Generation: ``Sampler`` (local API) over the backends' KV-cache engine (``twinkle.sampler._engine``)."""

from __future__ import annotations

from typing import Any

__all__ = ["Sampler", "generate"]


def __getattr__(name: str) -> Any:
    if name == "Sampler":
        from .local import Sampler

        return Sampler
    if name == "generate":
        from ._engine import generate

        return generate
    raise AttributeError(f"module 'twinkle.sampler' has no attribute {name!r}")
