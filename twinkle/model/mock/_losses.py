"""The Tinker losses in numpy, each returning its value and dLoss/dlogprobs (the mock's backward starts here).

Notation: ``lp`` learner logprobs of ``target_tokens``, ``q`` = ``loss_fn_inputs["logprobs"]``,
``A`` = ``advantages``, ``r = exp(lp − q)``, ``sg`` = stop-gradient. All are token-wise sums (no
normalisation). Shapes are (N,) or (N, K) (K targets per position, e.g. distillation).

=================== ================================================ ======================================
loss                objective (minimised)                            config
=================== ================================================ ======================================
cross_entropy       −Σ w·lp                                          —
importance_sampling −Σ r·A                                           —
ppo                 −Σ min(r·A, clip(r, lo, hi)·A)                   clip_low_threshold 0.8, clip_high 1.2
cispo               −Σ sg(clip(r, lo, hi))·lp·A                      clip_low_threshold 0.8, clip_high 1.2
dro                 −Σ (lp·A − ½·β·(lp − q)²)                        beta 0.05
dpo                 −Σ_pairs log σ(β·((Σw·lp_c − Σw·ref_c) − (Σw·lp_r − Σw·ref_r)))   beta 0.1
=================== ================================================ ======================================

dpo takes the data as consecutive (chosen, rejected) pairs; ``ref`` is ``loss_fn_inputs["ref_logprobs"]``
when given, else the base model's logprobs (the adapter disabled). Same defaults as ``twinkle.loss``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from twinkle.types import InvalidInputError

Inputs = dict[str, np.ndarray]
_PerDatum = Callable[[np.ndarray, Inputs, dict[str, Any]], tuple[float, np.ndarray]]

REQUIRED: dict[str, tuple[str, ...]] = {
    "cross_entropy": ("target_tokens",),
    "importance_sampling": ("target_tokens", "logprobs", "advantages"),
    "ppo": ("target_tokens", "logprobs", "advantages"),
    "cispo": ("target_tokens", "logprobs", "advantages"),
    "dro": ("target_tokens", "logprobs", "advantages"),
    "dpo": ("target_tokens",),
}
LOSS_NAMES: tuple[str, ...] = tuple(REQUIRED)
_CLIP = {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}
DEFAULTS: dict[str, dict[str, float]] = {"ppo": _CLIP, "cispo": _CLIP, "dro": {"beta": 0.05}, "dpo": {"beta": 0.1}}


def resolve_config(name: str, config: dict[str, Any] | None) -> dict[str, float]:
    """Defaults overlaid with ``config``; values must be numbers (text holding a number is accepted)."""
    out = dict(DEFAULTS.get(name, {}))
    for key, value in (config or {}).items():
        try:
            if isinstance(value, bool):
                raise TypeError
            number = float(value)
        except (TypeError, ValueError):
            raise InvalidInputError(
                f"loss_fn_config[{key!r}] must be a number, got {value!r}", field=f"loss_fn_config.{key}"
            ) from None
        if not np.isfinite(number):
            raise InvalidInputError(f"loss_fn_config[{key!r}] must be finite", field=f"loss_fn_config.{key}")
        out[key] = number
    lo, hi = out.get("clip_low_threshold"), out.get("clip_high_threshold")
    if lo is not None and hi is not None and lo > hi:
        raise InvalidInputError(
            f"clip_low_threshold {lo} is above clip_high_threshold {hi}", field="loss_fn_config.clip_low_threshold"
        )
    return out


def _weights(lp: np.ndarray, inputs: Inputs) -> np.ndarray:
    w = inputs.get("weights")
    return np.ones_like(lp) if w is None else w.astype(np.float64).reshape(lp.shape)


def _ratio(lp: np.ndarray, inputs: Inputs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    q = inputs["logprobs"].astype(np.float64).reshape(lp.shape)
    adv = inputs["advantages"].astype(np.float64).reshape(lp.shape)
    return np.exp(lp - q), q, adv


def _clip(config: dict[str, Any]) -> tuple[float, float]:
    return float(config["clip_low_threshold"]), float(config["clip_high_threshold"])


def cross_entropy(lp: np.ndarray, inputs: Inputs, config: dict[str, Any]) -> tuple[float, np.ndarray]:
    w = _weights(lp, inputs)
    return float(-(w * lp).sum()), -w


def importance_sampling(lp: np.ndarray, inputs: Inputs, config: dict[str, Any]) -> tuple[float, np.ndarray]:
    r, _, adv = _ratio(lp, inputs)
    return float(-(r * adv).sum()), -r * adv


def ppo(lp: np.ndarray, inputs: Inputs, config: dict[str, Any]) -> tuple[float, np.ndarray]:
    r, _, adv = _ratio(lp, inputs)
    lo, hi = _clip(config)
    clipped = np.clip(r, lo, hi)
    unclipped_obj, clipped_obj = r * adv, clipped * adv
    obj = np.minimum(unclipped_obj, clipped_obj)
    # d obj / d lp: r·A where the unclipped term is the minimum or the ratio lies inside the bounds.
    live = (unclipped_obj <= clipped_obj) | ((r >= lo) & (r <= hi))
    return float(-obj.sum()), np.where(live, -r * adv, 0.0)


def clip_count(lp: np.ndarray, inputs: Inputs, config: dict[str, Any]) -> int:
    """How many ratios fall outside the clip bounds (for ppo's ``clip_fraction:mean``)."""
    r, _, _ = _ratio(lp, inputs)
    lo, hi = _clip(config)
    return int(((r < lo) | (r > hi)).sum())


def cispo(lp: np.ndarray, inputs: Inputs, config: dict[str, Any]) -> tuple[float, np.ndarray]:
    r, _, adv = _ratio(lp, inputs)
    lo, hi = _clip(config)
    coef = np.clip(r, lo, hi) * adv
    return float(-(coef * lp).sum()), -coef


def dro(lp: np.ndarray, inputs: Inputs, config: dict[str, Any]) -> tuple[float, np.ndarray]:
    _, q, adv = _ratio(lp, inputs)
    beta = float(config["beta"])
    obj = lp * adv - 0.5 * beta * (lp - q) ** 2
    return float(-obj.sum()), -(adv - beta * (lp - q))


PER_DATUM: dict[str, _PerDatum] = {
    "cross_entropy": cross_entropy,
    "importance_sampling": importance_sampling,
    "ppo": ppo,
    "cispo": cispo,
    "dro": dro,
}


def dpo(
    lps: list[np.ndarray], refs: list[np.ndarray], inputs: list[Inputs], config: dict[str, Any]
) -> tuple[list[float], list[np.ndarray], dict[str, float]]:
    """Per-datum loss shares (the pair's loss on its chosen datum), dLoss/dlp per datum, and metrics."""
    beta = float(config["beta"])
    losses: list[float] = []
    grads: list[np.ndarray] = []
    margins: list[float] = []
    chosen: list[float] = []
    rejected: list[float] = []
    for c in range(0, len(lps), 2):
        wc, wr = _weights(lps[c], inputs[c]), _weights(lps[c + 1], inputs[c + 1])
        dc = float((wc * (lps[c] - refs[c])).sum())
        dr = float((wr * (lps[c + 1] - refs[c + 1])).sum())
        m = beta * (dc - dr)
        chosen.append(beta * dc)
        rejected.append(beta * dr)
        losses += [float(np.logaddexp(0.0, -m)), 0.0]  # −log σ(m)
        s = 1.0 / (1.0 + np.exp(m))  # σ(−m) = −dLoss/dm
        grads += [-s * beta * wc, s * beta * wr]
        margins.append(m)
    metrics = {
        "dpo_margin:mean": float(np.mean(margins)),
        "dpo_accuracy:mean": float(np.mean([m > 0 for m in margins])),
        "chosen_reward:mean": float(np.mean(chosen)),
        "rejected_reward:mean": float(np.mean(rejected)),
    }
    return losses, grads, metrics
