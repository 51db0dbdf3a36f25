"""The training engine. Names are imported lazily so ``import twinkle.model`` does not import torch."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Backend": "twinkle.model.base",
    "BatchItem": "twinkle.model.base",
    "SampleItem": "twinkle.model.base",
    "TwinkleModel": "twinkle.model.local",
    "TransformersModel": "twinkle.model.local",
    "MockModel": "twinkle.model.local",
    "MegatronModel": "twinkle.model.local",
    "resolve_model": "twinkle.model.hub",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'twinkle.model' has no attribute {name!r}")
    return getattr(importlib.import_module(mod), name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
