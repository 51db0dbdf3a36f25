"""Adapters whose LoRA actually changes the output: a fresh adapter's B matrices are zero, so tests that compare
adapters (or an adapter with the base model) fill B with seeded noise first."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from twinkle.types import LoraConfig


def perturb_b(backend: Any, name: str, seed: int, scale: float) -> None:
    """Fill adapter ``name``'s LoRA B matrices with ``scale`` × standard-normal noise from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pair in backend._adapters[name].pairs.values():
            pair.lora_B.copy_(torch.randn(pair.lora_B.shape, generator=g) * scale)


def add_live_adapters(backend: Any, names: Iterable[str], seed: int, scale: float, rank: int = 4) -> None:
    """Add rank-``rank`` adapters ``names`` (LoRA seed = their index) with B noise seeded ``seed + index``."""
    for i, name in enumerate(names):
        backend.add_adapter(name, LoraConfig(rank=rank, seed=i))
        perturb_b(backend, name, seed + i, scale)


def tiny_live_backend(**kw: Any) -> Any:
    """A CPU ``TransformersBackend`` on the tiny model (``kw``: its options) with adapter ``a`` (rank 4) whose B
    matrices are non-zero, so that the adapter changes every logprob."""
    from twinkle.model.transformers import TransformersBackend
    from twinkle.model.transformers._random import tiny_model_path

    b = TransformersBackend(str(tiny_model_path()), device="cpu", **kw)
    b.add_adapter("a", LoraConfig(rank=4, seed=1))
    perturb_b(b, "a", seed=7, scale=0.2)
    return b
