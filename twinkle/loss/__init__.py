"""Loss functions as pure torch functions of (per-token target logprobs, loss_fn_inputs, config).

``get_loss(name)`` returns a ``LossSpec`` (function, required inputs, config defaults); the formulas are in
each function's docstring and follow ``docs/tinker-wire-protocol.md`` §2.
"""

from __future__ import annotations

from twinkle.types import UnsupportedError

from ._base import LossFn, LossOutput, LossSpec
from ._functions import cispo, cross_entropy, dpo, dro, importance_sampling, ppo

_RL = ("target_tokens", "logprobs", "advantages")
_CLIP = {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}

LOSSES: dict[str, LossSpec] = {
    s.name: s
    for s in (
        LossSpec("cross_entropy", cross_entropy, ("target_tokens",), ("weights",)),
        LossSpec("importance_sampling", importance_sampling, _RL),
        LossSpec("ppo", ppo, _RL, (), _CLIP),
        LossSpec("cispo", cispo, _RL, (), _CLIP),
        LossSpec("dro", dro, _RL, (), {"beta": 0.05}),
        LossSpec("dpo", dpo, ("target_tokens",), ("weights", "ref_logprobs"), {"beta": 0.1},
                 needs_reference=True, paired=True),
    )
}


def get_loss(name: str) -> LossSpec:
    """The registered loss ``name``; an unknown name raises ``UnsupportedError`` naming ``loss_fn``."""
    spec = LOSSES.get(name) if isinstance(name, str) else None
    if spec is None:
        raise UnsupportedError(
            f"unknown loss_fn {name!r}; available: {', '.join(sorted(LOSSES))}", field="loss_fn"
        )
    return spec


def list_losses() -> list[str]:
    return sorted(LOSSES)


__all__ = [
    "LOSSES",
    "LossFn",
    "LossOutput",
    "LossSpec",
    "cispo",
    "cross_entropy",
    "dpo",
    "dro",
    "get_loss",
    "importance_sampling",
    "list_losses",
    "ppo",
]
