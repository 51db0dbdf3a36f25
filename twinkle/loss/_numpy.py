"""The built-in losses in numpy: value and dLoss/dlogprobs per datum (the mock backend's backward starts here).

Same formulas as ``_torch`` (notation there). Inputs are cast to float64 and shaped like the logprobs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np

from ._spec import NumpyLossOutput

Inputs = dict[str, np.ndarray]


def _quiet(fn: Callable[..., NumpyLossOutput]) -> Callable[..., NumpyLossOutput]:
    """An overflow is reported by its result (the backends refuse a non-finite loss), not by a warning."""

    @functools.wraps(fn)
    def wrapper(*args: object) -> NumpyLossOutput:
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            return fn(*args)

    return wrapper


def _get(inp: Inputs, key: str, lp: np.ndarray) -> np.ndarray:
    return np.asarray(inp[key], dtype=np.float64).reshape(lp.shape)


def _weights(lp: np.ndarray, inp: Inputs) -> np.ndarray:
    return np.ones_like(lp) if inp.get("weights") is None else _get(inp, "weights", lp)


_PerDatum = Callable[[np.ndarray, Inputs, dict[str, float]], tuple[float, np.ndarray]]


def _per_datum(fn: _PerDatum, lps: list[np.ndarray], inputs: list[Inputs], config: dict[str, float]) -> NumpyLossOutput:
    total, grads = 0.0, []
    for lp, inp in zip(lps, inputs, strict=True):
        value, grad = fn(np.asarray(lp, dtype=np.float64), inp, config)
        total += value
        grads.append(grad)
    return NumpyLossOutput(total, grads, {"loss:sum": total})


def _ce(lp: np.ndarray, inp: Inputs, config: dict[str, float]) -> tuple[float, np.ndarray]:
    w = _weights(lp, inp)
    return float(-(w * lp).sum()), -w


def _is(lp: np.ndarray, inp: Inputs, config: dict[str, float]) -> tuple[float, np.ndarray]:
    r = np.exp(lp - _get(inp, "logprobs", lp))
    adv = _get(inp, "advantages", lp)
    return float(-(r * adv).sum()), -r * adv


def _ppo(lp: np.ndarray, inp: Inputs, config: dict[str, float]) -> tuple[float, np.ndarray]:
    r = np.exp(lp - _get(inp, "logprobs", lp))
    adv = _get(inp, "advantages", lp)
    lo, hi = config["clip_low_threshold"], config["clip_high_threshold"]
    unclipped, clipped = r * adv, np.clip(r, lo, hi) * adv
    # d/dlp of min(r·A, clip(r)·A): r·A where the unclipped term is the minimum or r lies inside the bounds.
    live = (unclipped <= clipped) | ((r >= lo) & (r <= hi))
    return float(-np.minimum(unclipped, clipped).sum()), np.where(live, -r * adv, 0.0)


def _cispo(lp: np.ndarray, inp: Inputs, config: dict[str, float]) -> tuple[float, np.ndarray]:
    r = np.exp(lp - _get(inp, "logprobs", lp))
    coef = np.clip(r, config["clip_low_threshold"], config["clip_high_threshold"]) * _get(inp, "advantages", lp)
    return float(-(coef * lp).sum()), -coef


def _dro(lp: np.ndarray, inp: Inputs, config: dict[str, float]) -> tuple[float, np.ndarray]:
    q, adv, beta = _get(inp, "logprobs", lp), _get(inp, "advantages", lp), config["beta"]
    return float(-(lp * adv - 0.5 * beta * (lp - q) ** 2).sum()), -(adv - beta * (lp - q))


@_quiet
def cross_entropy(lps: list[np.ndarray], inputs: list[Inputs], config: dict[str, float]) -> NumpyLossOutput:
    return _per_datum(_ce, lps, inputs, config)


@_quiet
def importance_sampling(lps: list[np.ndarray], inputs: list[Inputs], config: dict[str, float]) -> NumpyLossOutput:
    return _per_datum(_is, lps, inputs, config)


@_quiet
def ppo(lps: list[np.ndarray], inputs: list[Inputs], config: dict[str, float]) -> NumpyLossOutput:
    out = _per_datum(_ppo, lps, inputs, config)
    lo, hi = config["clip_low_threshold"], config["clip_high_threshold"]
    clipped = count = 0
    for lp, inp in zip(lps, inputs, strict=True):
        r = np.exp(np.asarray(lp, dtype=np.float64) - _get(inp, "logprobs", lp))
        clipped += int(((r < lo) | (r > hi)).sum())
        count += r.size
    out.metrics["clip_fraction:mean"] = clipped / max(1, count)
    return out


@_quiet
def cispo(lps: list[np.ndarray], inputs: list[Inputs], config: dict[str, float]) -> NumpyLossOutput:
    return _per_datum(_cispo, lps, inputs, config)


@_quiet
def dro(lps: list[np.ndarray], inputs: list[Inputs], config: dict[str, float]) -> NumpyLossOutput:
    return _per_datum(_dro, lps, inputs, config)


@_quiet
def dpo(lps: list[np.ndarray], inputs: list[Inputs], config: dict[str, float]) -> NumpyLossOutput:
    """Pairs (2i chosen, 2i+1 rejected); ``ref_logprobs`` is in every datum's inputs (the backend fills it)."""
    beta = config["beta"]
    total = 0.0
    grads: list[np.ndarray] = []
    margins, chosen, rejected = [], [], []
    for c in range(0, len(lps), 2):
        lc, lr = np.asarray(lps[c], dtype=np.float64), np.asarray(lps[c + 1], dtype=np.float64)
        wc, wr = _weights(lc, inputs[c]), _weights(lr, inputs[c + 1])
        rc = beta * float((wc * (lc - _get(inputs[c], "ref_logprobs", lc))).sum())
        rr = beta * float((wr * (lr - _get(inputs[c + 1], "ref_logprobs", lr))).sum())
        m = rc - rr
        total += float(np.logaddexp(0.0, -m))  # −log σ(m)
        s = 1.0 / (1.0 + np.exp(m))  # σ(−m) = −dLoss/dm
        grads += [-s * beta * wc, s * beta * wr]
        margins.append(m)
        chosen.append(rc)
        rejected.append(rr)
    metrics = {
        "loss:sum": total,
        "dpo_accuracy:mean": float(np.mean([m > 0 for m in margins])),
        "dpo_margin:mean": float(np.mean(margins)),
        "chosen_reward:mean": float(np.mean(chosen)),
        "rejected_reward:mean": float(np.mean(rejected)),
    }
    return NumpyLossOutput(total, grads, metrics)
