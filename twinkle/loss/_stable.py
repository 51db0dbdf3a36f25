"""``stable_reinforce``: REINFORCE with a truncated importance weight against the SAMPLER's own logprobs.

``loss = −Σ_t sg(min(r_t, α)) · lp_t · A_t + ½ · kl_coeff · Σ_t (lp_t − q_t)²`` with ``r_t = exp(lp_t − q_t)``.
The truncated weight bounds each token's step however stale the data is (off-policy RL stays stable); the
optional quadratic term pulls the learner towards the sampler.

Its inputs are those of the other RL losses (``target_tokens``, ``logprobs`` q, ``advantages``). What makes it
"stable" over Tinker: a sample asked with ``record_stability_info`` is recorded by the server (its tokens and
logprobs, per ``sequence_id``), and a ``forward_backward`` with this loss must carry provenance spans; the
gateway then checks every sampled target token against the record and replaces ``logprobs`` at those positions
by the recorded ones (``twinkle.server.stability``), so the ratio is the exact learner/sampler ratio.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ._spec import ConfigKey, LossOutput, LossSpec, NumpyLossOutput

if TYPE_CHECKING:
    import torch

CONFIG = (
    ConfigKey("alpha", 2.0, gt=0.0, le=1e6, doc="cap of the importance weight r = exp(lp − q)"),
    ConfigKey("kl_coeff", 0.0, ge=0.0, le=1e6, doc="weight of ½·(lp − q)², a pull towards the sampler"),
)


def stable_reinforce_torch(logprobs: list[torch.Tensor], inputs: list[dict[str, torch.Tensor]],
                           config: dict[str, float]) -> LossOutput:
    import torch

    alpha, kl = config["alpha"], config["kl_coeff"]
    parts, capped, count = [], 0.0, 0
    for lp, inp in zip(logprobs, inputs, strict=True):
        q, adv = inp["logprobs"], inp["advantages"]
        r = torch.exp(lp.detach() - q)
        parts.append(-(r.clamp(max=alpha) * lp * adv).sum() + 0.5 * kl * ((lp - q) ** 2).sum())
        capped += float((r > alpha).sum())
        count += r.numel()
    loss = torch.stack(parts).sum() if parts else torch.zeros(())
    outputs = [{"logprobs": lp.detach()} for lp in logprobs]
    return LossOutput(loss, outputs, {"loss:sum": float(loss.detach()), "capped_fraction:mean": capped / max(1, count)})


def stable_reinforce_numpy(lps: list[np.ndarray], inputs: list[dict[str, np.ndarray]],
                           config: dict[str, float]) -> NumpyLossOutput:
    alpha, kl = config["alpha"], config["kl_coeff"]
    total, grads, capped, count = 0.0, [], 0, 0
    with np.errstate(over="ignore", invalid="ignore"):
        for lp, inp in zip(lps, inputs, strict=True):
            lp = np.asarray(lp, dtype=np.float64)
            q = np.asarray(inp["logprobs"], dtype=np.float64).reshape(lp.shape)
            adv = np.asarray(inp["advantages"], dtype=np.float64).reshape(lp.shape)
            r = np.exp(lp - q)
            coef = np.minimum(r, alpha) * adv
            total += float(-(coef * lp).sum() + 0.5 * kl * ((lp - q) ** 2).sum())
            grads.append(-coef + kl * (lp - q))
            capped += int((r > alpha).sum())
            count += r.size
    return NumpyLossOutput(total, grads, {"loss:sum": total, "capped_fraction:mean": capped / max(1, count)})


SPEC = LossSpec(
    "stable_reinforce", "twinkle.loss._stable:stable_reinforce_torch", stable_reinforce_numpy,
    ("target_tokens", "logprobs", "advantages"), config=CONFIG,
    doc="−Σ sg(min(r, α))·lp·A + ½·kl_coeff·Σ(lp − q)²; over Tinker, q comes from the sampler's record",
)
