"""The built-in losses in torch. All are token-wise and SUM-reduced (no normalisation), as in Tinker.

Notation (Tinker's): ``lp`` learner logprob of each target token, ``q`` =
``loss_fn_inputs["logprobs"]`` (sampler logprobs), ``A`` = ``advantages``, ``w`` = ``weights``,
``r = exp(lp − q)``, ``sg`` = stop-gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._spec import LossOutput


def _total(parts: list[torch.Tensor], like: list[torch.Tensor]) -> torch.Tensor:
    if parts:
        return torch.stack(parts).sum()
    return like[0].new_zeros(()) if like else torch.zeros(())


def _outputs(logprobs: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    return [{"logprobs": lp.detach()} for lp in logprobs]


def cross_entropy(logprobs: list[torch.Tensor], inputs: list[dict[str, torch.Tensor]], config: dict[str, float]) -> LossOutput:
    """Weighted negative log-likelihood: ``loss = −Σ_t lp_t · w_t``.

    ``weights`` default to 1. With (N, K) target tokens: ``−Σ_t Σ_k w[t,k] · log p(x[t,k])``.
    """
    parts = []
    for lp, inp in zip(logprobs, inputs, strict=True):
        w = inp.get("weights")
        parts.append(-(lp * w).sum() if w is not None else -lp.sum())
    loss = _total(parts, logprobs)
    return LossOutput(loss, _outputs(logprobs), {"loss:sum": float(loss.detach())})


def importance_sampling(
    logprobs: list[torch.Tensor], inputs: list[dict[str, torch.Tensor]], config: dict[str, float]
) -> LossOutput:
    """Importance-weighted policy gradient: ``loss = −Σ_t r_t · A_t`` with ``r_t = exp(lp_t − q_t)``."""
    parts = [-(torch.exp(lp - inp["logprobs"]) * inp["advantages"]).sum() for lp, inp in zip(logprobs, inputs, strict=True)]
    loss = _total(parts, logprobs)
    return LossOutput(loss, _outputs(logprobs), {"loss:sum": float(loss.detach())})


def ppo(logprobs: list[torch.Tensor], inputs: list[dict[str, torch.Tensor]], config: dict[str, float]) -> LossOutput:
    """Clipped surrogate: ``loss = −Σ_t min(r_t · A_t, clip(r_t, lo, hi) · A_t)``.

    ``lo`` = ``clip_low_threshold`` (default 0.8), ``hi`` = ``clip_high_threshold`` (default 1.2); ratio bounds.
    """
    lo, hi = config["clip_low_threshold"], config["clip_high_threshold"]
    parts, clipped, count = [], 0.0, 0
    for lp, inp in zip(logprobs, inputs, strict=True):
        r = torch.exp(lp - inp["logprobs"])
        a = inp["advantages"]
        parts.append(-torch.minimum(r * a, torch.clamp(r, lo, hi) * a).sum())
        clipped += float(((r < lo) | (r > hi)).sum())
        count += r.numel()
    loss = _total(parts, logprobs)
    metrics = {"loss:sum": float(loss.detach()), "clip_fraction:mean": clipped / max(1, count)}
    return LossOutput(loss, _outputs(logprobs), metrics)


def cispo(logprobs: list[torch.Tensor], inputs: list[dict[str, torch.Tensor]], config: dict[str, float]) -> LossOutput:
    """Clipped importance-sampling policy optimisation: ``loss = −Σ_t sg(clip(r_t, lo, hi)) · lp_t · A_t``.

    ``lo``/``hi`` = ``clip_low_threshold``/``clip_high_threshold``, defaults 0.0/4.0 (Tinker's documented
    one-sided clip: no lower bound, the coefficient capped at 4).
    """
    lo, hi = config["clip_low_threshold"], config["clip_high_threshold"]
    parts = []
    for lp, inp in zip(logprobs, inputs, strict=True):
        r = torch.exp(lp.detach() - inp["logprobs"]).clamp(lo, hi)
        parts.append(-(r * lp * inp["advantages"]).sum())
    loss = _total(parts, logprobs)
    return LossOutput(loss, _outputs(logprobs), {"loss:sum": float(loss.detach())})


def dro(logprobs: list[torch.Tensor], inputs: list[dict[str, torch.Tensor]], config: dict[str, float]) -> LossOutput:
    """Direct reward optimisation: ``loss = −Σ_t (lp_t · A_t − ½ β (lp_t − q_t)²)``; ``beta`` default 0.05."""
    beta = config["beta"]
    parts = []
    for lp, inp in zip(logprobs, inputs, strict=True):
        parts.append(-(lp * inp["advantages"] - 0.5 * beta * (lp - inp["logprobs"]) ** 2).sum())
    loss = _total(parts, logprobs)
    return LossOutput(loss, _outputs(logprobs), {"loss:sum": float(loss.detach())})


def dpo(logprobs: list[torch.Tensor], inputs: list[dict[str, torch.Tensor]], config: dict[str, float]) -> LossOutput:
    """Direct preference optimisation over datums in (chosen, rejected) pairs: datum 2i is chosen, 2i+1 rejected.

    With ``w`` = ``weights`` marking response tokens (default 1) and ``ref`` = ``ref_logprobs`` (the base
    model's logprobs, i.e. the adapter disabled), each datum's implicit reward is
    ``ρ = β · Σ_t w_t (lp_t − ref_t)``; ``loss = Σ_pairs −log σ(ρ_chosen − ρ_rejected)``.
    ``beta`` default 0.1. Metrics: ``dpo_accuracy:mean`` (ρ_c > ρ_r), ``dpo_margin:mean`` (ρ_c − ρ_r),
    ``chosen_reward:mean``, ``rejected_reward:mean``.
    """
    beta = config["beta"]
    rewards = []
    for lp, inp in zip(logprobs, inputs, strict=True):
        w = inp.get("weights")
        d = lp - inp["ref_logprobs"]
        rewards.append(beta * ((d * w).sum() if w is not None else d.sum()))
    chosen, rejected = torch.stack(rewards[0::2]), torch.stack(rewards[1::2])
    margin = chosen - rejected
    loss = F.softplus(-margin).sum()
    m = margin.detach()
    metrics = {
        "loss:sum": float(loss.detach()),
        "dpo_accuracy:mean": float((m > 0).float().mean()),
        "dpo_margin:mean": float(m.mean()),
        "chosen_reward:mean": float(chosen.detach().mean()),
        "rejected_reward:mean": float(rejected.detach().mean()),
    }
    return LossOutput(loss, _outputs(logprobs), metrics)
