"""The built-in losses, registered once. Defaults follow Tinker's documentation (audit in ``docs/models.md``)."""

from __future__ import annotations

from . import _numpy
from ._spec import ConfigKey, LossSpec, clip_order, register_loss

_RL = ("target_tokens", "logprobs", "advantages")
_MAX = 1e6  # a bound on every scale factor, so that a finite config cannot overflow float32 in the loss


def _clip(low: float, high: float) -> tuple[ConfigKey, ...]:
    return (
        ConfigKey("clip_low_threshold", low, ge=0.0, le=_MAX, doc="lower bound of the ratio r = exp(lp − q)"),
        ConfigKey("clip_high_threshold", high, gt=0.0, le=_MAX, doc="upper bound of the ratio"),
    )


def _torch(name: str) -> str:
    return f"twinkle.loss._torch:{name}"


BUILTIN: tuple[LossSpec, ...] = (
    LossSpec("cross_entropy", _torch("cross_entropy"), _numpy.cross_entropy, ("target_tokens",), ("weights",),
             doc="−Σ w·lp"),
    LossSpec("importance_sampling", _torch("importance_sampling"), _numpy.importance_sampling, _RL,
             doc="−Σ r·A, r = exp(lp − q)"),
    LossSpec("ppo", _torch("ppo"), _numpy.ppo, _RL, config=_clip(0.8, 1.2), checks=(clip_order,),
             doc="−Σ min(r·A, clip(r, lo, hi)·A)"),
    LossSpec("cispo", _torch("cispo"), _numpy.cispo, _RL, config=_clip(0.0, 4.0), checks=(clip_order,),
             doc="−Σ sg(clip(r, lo, hi))·lp·A"),
    LossSpec("dro", _torch("dro"), _numpy.dro, _RL,
             config=(ConfigKey("beta", 0.05, ge=0.0, le=_MAX, doc="weight of the quadratic penalty"),),
             doc="−Σ (lp·A − ½·β·(lp − q)²)"),
    LossSpec("dpo", _torch("dpo"), _numpy.dpo, ("target_tokens",), ("weights", "ref_logprobs"),
             config=(ConfigKey("beta", 0.1, gt=0.0, le=_MAX, doc="scale of the implicit reward"),),
             needs_reference=True, paired=True,
             doc="Σ_pairs −log σ(β·(Σw·(lp_c − ref_c) − Σw·(lp_r − ref_r)))"),
)

for _spec in BUILTIN:
    register_loss(_spec, replace=True)

from ._stable import SPEC as _STABLE  # noqa: E402  (stable_reinforce: its own module, see there)

register_loss(_STABLE, replace=True)
