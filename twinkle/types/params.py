"""Parameters: LoRA, optimizer, LR schedule, sampling. Tinker's names and defaults."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Params(BaseModel):
    model_config = ConfigDict(extra="ignore")


class LoraConfig(_Params):
    """LoRA adapter settings.

    ``target_modules`` None or ``"all-linear"`` means every linear layer selected by the ``train_*`` flags:
    attention projections (``train_attn``), MLP projections (``train_mlp``) and the output head
    (``train_unembed``). An explicit list of module-name suffixes overrides the flags.
    """

    rank: int = Field(32, ge=1, le=1024)
    alpha: float | None = Field(None, description="LoRA alpha; default equals 32 (Tinker's)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | str | None = None
    seed: int | None = None
    train_attn: bool = True
    train_mlp: bool = True
    train_unembed: bool = True

    @property
    def lora_alpha(self) -> float:
        return float(self.alpha) if self.alpha is not None else 32.0


class AdamParams(_Params):
    """Per-step AdamW hyper-parameters (Tinker's ``AdamParams``). ``grad_clip_norm`` 0 means off."""

    learning_rate: float = Field(1e-4, ge=0.0)
    beta1: float = Field(0.9, ge=0.0, lt=1.0)
    beta2: float = Field(0.95, ge=0.0, lt=1.0)
    eps: float = Field(1e-12, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    grad_clip_norm: float = Field(0.0, ge=0.0)


class OptimizerConfig(_Params):
    """The optimizer an adapter keeps between steps (``set_optimizer``)."""

    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = Field(1e-4, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    grad_clip_norm: float = Field(0.0, ge=0.0)
    momentum: float = 0.0

    def adam_params(self, lr: float | None = None) -> AdamParams:
        return AdamParams(
            learning_rate=self.lr if lr is None else lr,
            beta1=self.betas[0],
            beta2=self.betas[1],
            eps=self.eps,
            weight_decay=self.weight_decay,
            grad_clip_norm=self.grad_clip_norm,
        )


class LRSchedulerConfig(_Params):
    """Learning-rate schedule applied on top of ``OptimizerConfig.lr`` at each optimizer step."""

    name: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    total_steps: int | None = Field(None, ge=1)
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0)

    def factor(self, step: int) -> float:
        """Multiplier for the LR at (0-based) optimizer ``step``."""
        import math

        if self.warmup_steps and step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.name == "constant" or not self.total_steps:
            return 1.0
        span = max(1, self.total_steps - self.warmup_steps)
        t = min(1.0, max(0.0, (step - self.warmup_steps) / span))
        if self.name == "linear":
            shape = 1.0 - t
        else:
            shape = 0.5 * (1.0 + math.cos(math.pi * t))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * shape


class SamplingParams(_Params):
    """Sampling settings. ``temperature`` 0 is greedy. ``stop``: None keeps EOS as the stop; ``[]`` disables
    it; strings or token ids add stops. A stop token is included at the end of the returned tokens."""

    max_tokens: int | None = Field(None, ge=0)
    seed: int | None = None
    stop: str | list[str] | list[int] | None = None
    temperature: float = Field(1.0, ge=0.0)
    top_k: int = -1
    top_p: float = Field(1.0, gt=0.0, le=1.0)
