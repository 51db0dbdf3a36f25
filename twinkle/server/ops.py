"""Operations a gateway submits to a model worker. Plain dataclasses: no torch, no FastAPI."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from twinkle.loss import validate_request
from twinkle.types import (
    AdamParams,
    Datum,
    InvalidInputError,
    LoraConfig,
    LRSchedulerConfig,
    OptimizerConfig,
    SamplingParams,
)
from twinkle.types.params import MAX_TOPK_LOGPROBS, check_ttl_seconds


@dataclass
class ForwardBackwardOp:
    data: list[Datum]
    loss_fn: str = "cross_entropy"
    loss_fn_config: dict[str, Any] | None = None
    forward_only: bool = False
    type: str = "forward_backward"

    def __post_init__(self) -> None:
        # Both APIs build this op before queueing it: an unknown loss or a bad config is refused here, by the
        # loss registry (the same check the worker's backend makes), as a 400 naming the field.
        validate_request(self.loss_fn, self.loss_fn_config)


@dataclass
class OptimStepOp:
    adam_params: AdamParams | None = None  # None: the run's OptimizerConfig + LR schedule
    type: str = "optim_step"


@dataclass
class SetOptimizerOp:
    optimizer: OptimizerConfig
    type: str = "set_optimizer"


@dataclass
class SetSchedulerOp:
    scheduler: LRSchedulerConfig
    type: str = "set_lr_scheduler"


@dataclass
class SaveOp:
    name: str
    kind: str = "training"  # "training" (weights + optimizer) | "sampler" | "external" (weights only)
    ttl_seconds: float | None = None
    overwrite: bool = False
    type: str = "save"
    age_recipients: tuple[str, ...] = ()  # "external": encrypt every file to these age recipients

    def __post_init__(self) -> None:
        self.ttl_seconds = check_ttl_seconds(self.ttl_seconds)  # 1e300 would make the expiry date overflow


@dataclass
class LoadOp:
    checkpoint: str  # tinker://<run>/<weights|sampler_weights>/<name>, or a name of this run
    optimizer: bool = True
    type: str = "load"


@dataclass
class SampleOp:
    prompt: list[int]  # a ModelInput with images until the gateway expands it (twinkle.model.images)
    num_samples: int = 1
    params: SamplingParams = field(default_factory=SamplingParams)
    prompt_logprobs: bool = False
    topk_prompt_logprobs: int = 0
    topk_logprobs: int = 0  # the k most likely tokens at each sampled position (OpenAI top_logprobs; streams only)
    type: str = "sample"
    images: list[Any] = field(default_factory=list)  # the prompt's ImageChunks, in order
    scope: str = ""  # who may share prompt caches (set by the gateway to the user: no timing tells one user
    # what another sent)

    def __post_init__(self) -> None:
        # The reply grows with k × prompt length: bound k here, whichever API built the op.
        for name in ("topk_prompt_logprobs", "topk_logprobs"):
            k = getattr(self, name)
            if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= MAX_TOPK_LOGPROBS:
                raise InvalidInputError(f"{name} must be an integer in [0, {MAX_TOPK_LOGPROBS}], got {k!r}", field=name)


@dataclass
class CreateAdapterOp:
    lora: LoraConfig
    type: str = "create_adapter"


Op = ForwardBackwardOp | OptimStepOp | SetOptimizerOp | SetSchedulerOp | SaveOp | LoadOp


def op_kind(op: object) -> str:
    """The kind of call an op is, as a retry must repeat it (``forward`` and ``forward_backward`` differ)."""
    if isinstance(op, ForwardBackwardOp):
        return "forward" if op.forward_only else "forward_backward"
    return str(getattr(op, "type", type(op).__name__))
