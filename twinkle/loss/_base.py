"""What a loss function is: a pure torch function of per-token target logprobs, inputs and a config."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from twinkle.types import InvalidInputError


@dataclass
class LossOutput:
    """``loss``: the scalar to minimise (sum-reduced, not normalised); ``outputs``: one dict per datum;
    ``metrics``: ``name:reduction`` keys (at least ``loss:sum``)."""

    loss: torch.Tensor
    outputs: list[dict[str, torch.Tensor]]
    metrics: dict[str, float]


LossFn = Callable[[list[torch.Tensor], list[dict[str, torch.Tensor]], dict[str, float]], LossOutput]


@dataclass(frozen=True)
class LossSpec:
    """A registered loss: its function, required/optional ``loss_fn_inputs`` and config defaults."""

    name: str
    fn: LossFn
    required_inputs: tuple[str, ...] = ("target_tokens",)
    optional_inputs: tuple[str, ...] = ()
    config_defaults: Mapping[str, float] = field(default_factory=dict)
    needs_reference: bool = False  # dpo: reference logprobs from the base model (adapter disabled)
    paired: bool = False  # dpo: datums come in (chosen, rejected) pairs

    def resolve_config(self, config: Mapping[str, Any] | None) -> dict[str, float]:
        """Defaults overlaid with ``config``; every value must be a number."""
        out = dict(self.config_defaults)
        for k, v in (config or {}).items():
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                try:
                    v = float(v)  # proto v2 may send numbers as text
                except (TypeError, ValueError):
                    raise InvalidInputError(
                        f"loss_fn_config[{k!r}] must be a number, got {v!r}", field=f"loss_fn_config.{k}"
                    ) from None
            out[k] = float(v)
        lo, hi = out.get("clip_low_threshold"), out.get("clip_high_threshold")
        if lo is not None and hi is not None and lo > hi:
            raise InvalidInputError(
                f"clip_low_threshold {lo} is above clip_high_threshold {hi}", field="loss_fn_config.clip_low_threshold"
            )
        return out


def _total(parts: list[torch.Tensor], like: list[torch.Tensor]) -> torch.Tensor:
    if parts:
        return torch.stack(parts).sum()
    return like[0].new_zeros(()) if like else torch.zeros(())
