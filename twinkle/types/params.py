"""Parameters: LoRA, optimizer, LR schedule, sampling. Tinker's names and defaults.

These models are where every number a user sends is checked, once, for both APIs and the local one: each
float is finite (``allow_inf_nan=False``) and in range, each integer is an integer (a bool is neither), and a
failure is a pydantic ``ValidationError`` naming the field, which the routes answer as a 400. The loss
configs are checked by the loss registry (``twinkle.loss``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from .errors import InvalidInputError

MAX_SEED = 2**63 - 1
MAX_LORA_RANK = 8192  # the schema's ceiling for a model's max_lora_rank; each model's own limit is lower
MAX_TOPK_LOGPROBS = 20  # top-k prompt logprobs per position (the reply grows with k × prompt length)
MAX_LEARNING_RATE = 10.0
MAX_STEPS = 10**9
MAX_TTL_SECONDS = 10 * 365 * 86400  # a checkpoint's time to live: ten years at most (its expiry must be a date)
MAX_TOKENS = 2**31 - 1  # the widest max_tokens any API accepts; each model's sampler.max_tokens caps it lower
DEFAULT_MAX_TOKENS = 128  # tokens sampled when a request's max_tokens is None (the model's room caps it too)
MAX_STOP_SEQUENCES = 64  # stop strings or token ids per request: each one is checked after every sampled token
MAX_STOP_CHARS = 1000  # characters in one stop string
MAX_NUM_SAMPLES = 128  # samples one request may ask for (native num_samples, Tinker's, OpenAI prompts × n)


def _not_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("must be a number, not a boolean")
    return value


Number = Annotated[float, BeforeValidator(_not_bool)]
"""A float that is not a bool; the model's ``allow_inf_nan=False`` makes it finite."""
Integer = Annotated[int, BeforeValidator(_not_bool)]
"""An int that is not a bool (``1.0`` and ``"1"`` are accepted as 1, ``1.5`` is not)."""
Seed = Annotated[int, BeforeValidator(_not_bool), Field(ge=0, le=MAX_SEED)]
TopKLogprobs = Annotated[int, BeforeValidator(_not_bool), Field(ge=0, le=MAX_TOPK_LOGPROBS)]
StopString = Annotated[str, Field(max_length=MAX_STOP_CHARS)]
TopK = Annotated[int, BeforeValidator(_not_bool), Field(ge=-1, le=2**31 - 1)]
"""Sample among the k likeliest tokens; -1 (or 0) is off."""


def _stop_bounds(value: Any) -> Any:
    """One clear message for an over-long stop list (before the union tries each of its shapes)."""
    items = value if isinstance(value, list) else [value]
    if len(items) > MAX_STOP_SEQUENCES:
        raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(items)}")
    if any(isinstance(s, str) and len(s) > MAX_STOP_CHARS for s in items):
        raise ValueError(f"a stop string has at most {MAX_STOP_CHARS} characters")
    return value


StopTexts = Annotated[StopString | list[StopString], BeforeValidator(_stop_bounds)]
Stop = Annotated[StopString | list[StopString] | list[Integer], BeforeValidator(_stop_bounds)]
"""Stop strings or token ids: few and short, since each is checked after every sampled token."""
TtlSeconds = Annotated[float, BeforeValidator(_not_bool), Field(gt=0, le=MAX_TTL_SECONDS, allow_inf_nan=False)]


def check_ttl_seconds(value: Any, field: str = "ttl_seconds") -> float | None:
    """A checkpoint TTL from any API: None (keep forever) or a finite number of seconds in (0, ten years]."""
    from .errors import InvalidInputError

    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= MAX_TTL_SECONDS:
        raise InvalidInputError(
            f"{field} must be a number of seconds in (0, {MAX_TTL_SECONDS}] or null, got {value!r}", field=field
        )
    return float(value)


class _Params(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class LoraConfig(_Params):
    """LoRA adapter settings.

    ``target_modules`` None or ``"all-linear"`` means every linear layer selected by the ``train_*`` flags:
    attention projections (``train_attn``), MLP projections (``train_mlp``) and the output head
    (``train_unembed``). An explicit list of module-name suffixes overrides the flags.
    """

    rank: Integer = Field(32, ge=1, le=MAX_LORA_RANK, description="each model's max_lora_rank applies too")
    alpha: Number | None = Field(None, gt=0.0, le=1e6, description="LoRA alpha; default equals 32 (Tinker's)")
    dropout: Number = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | str | None = None
    seed: Seed | None = None
    train_attn: bool = True
    train_mlp: bool = True
    train_unembed: bool = True
    train_vision: bool = False  # vision-language models: also put LoRA on the vision tower

    @property
    def lora_alpha(self) -> float:
        return float(self.alpha) if self.alpha is not None else 32.0


PEFT_LORA_NAMES = {"r": "rank", "lora_alpha": "alpha", "lora_dropout": "dropout"}
"""peft's spellings of our ``LoraConfig`` fields, accepted wherever a user hands a LoRA config to a Python API."""


def to_lora_config(config: Any = None, **overrides: Any) -> LoraConfig:
    """A ``LoraConfig`` from itself, a dict, a ``peft.LoraConfig`` (read by attribute, no peft import) or None,
    with keyword ``overrides`` on top (``r=8`` or ``rank=8``). Within one source our own name beats peft's; a
    keyword beats the config. An unknown keyword is refused by name (the wire model ignores unknown keys, so a
    misspelt keyword would otherwise vanish silently); a bad value is an ``InvalidInputError`` too."""
    if isinstance(config, LoraConfig) and not overrides:
        return config
    if config is None:
        data: dict[str, Any] = {}
    elif isinstance(config, LoraConfig):
        data = config.model_dump(exclude_unset=True)
    elif isinstance(config, Mapping):
        data = dict(config)
    elif hasattr(config, "r") and hasattr(config, "lora_alpha"):  # peft.LoraConfig
        data = {"rank": config.r, "alpha": config.lora_alpha,
                "dropout": getattr(config, "lora_dropout", 0.0) or 0.0,
                "target_modules": getattr(config, "target_modules", None)}
    else:
        raise InvalidInputError(f"config must be a LoraConfig, a dict or a peft.LoraConfig, got {type(config).__name__}",
                                field="config")
    unknown = sorted(set(overrides) - set(LoraConfig.model_fields) - set(PEFT_LORA_NAMES))
    if unknown:
        raise InvalidInputError(f"unknown LoRA setting(s) {', '.join(map(repr, unknown))}; known: "
                                f"{', '.join(sorted(LoraConfig.model_fields))} (or {' / '.join(PEFT_LORA_NAMES)})",
                                field=unknown[0])

    def canonical(source: dict[str, Any]) -> dict[str, Any]:
        out = {PEFT_LORA_NAMES.get(k, k): v for k, v in source.items() if k in PEFT_LORA_NAMES}
        out.update((k, v) for k, v in source.items() if k not in PEFT_LORA_NAMES)
        return out

    data = {**canonical(data), **canonical(overrides)}
    if isinstance(data.get("target_modules"), (set, frozenset, tuple)):
        data["target_modules"] = sorted(data["target_modules"])
    try:
        return LoraConfig.model_validate(data)
    except Exception as e:
        raise InvalidInputError(f"invalid LoRA config: {e}", field="config") from None


class AdamParams(_Params):
    """Per-step AdamW hyper-parameters (Tinker's ``AdamParams``). ``grad_clip_norm`` 0 means off."""

    learning_rate: Number = Field(1e-4, ge=0.0, le=MAX_LEARNING_RATE)
    beta1: Number = Field(0.9, ge=0.0, lt=1.0)
    beta2: Number = Field(0.95, ge=0.0, lt=1.0)
    eps: Number = Field(1e-12, gt=0.0, le=1.0)
    weight_decay: Number = Field(0.0, ge=0.0, le=1e3)
    grad_clip_norm: Number = Field(0.0, ge=0.0)


class OptimizerConfig(_Params):
    """The optimizer an adapter keeps between steps (``set_optimizer``)."""

    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: Number = Field(1e-4, ge=0.0, le=MAX_LEARNING_RATE)
    betas: tuple[Annotated[Number, Field(ge=0.0, lt=1.0)], Annotated[Number, Field(ge=0.0, lt=1.0)]] = (0.9, 0.95)
    eps: Number = Field(1e-8, gt=0.0, le=1.0)
    weight_decay: Number = Field(0.0, ge=0.0, le=1e3)
    grad_clip_norm: Number = Field(0.0, ge=0.0)
    momentum: Number = Field(0.0, ge=0.0, lt=1.0)

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
    warmup_steps: Integer = Field(0, ge=0, le=MAX_STEPS)
    total_steps: Integer | None = Field(None, ge=1, le=MAX_STEPS)
    min_lr_ratio: Number = Field(0.0, ge=0.0, le=1.0)

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

    max_tokens: Integer | None = Field(None, ge=0, le=MAX_TOKENS, description="each model's context caps it too")
    seed: Seed | None = None
    stop: Stop | None = None
    temperature: Number = Field(1.0, ge=0.0, le=100.0)
    top_k: TopK = Field(-1, description="-1 (or 0): no top-k")
    top_p: Number = Field(1.0, gt=0.0, le=1.0)


def _known_keys(model: type[BaseModel]) -> Any:
    """A before-validator refusing keys ``model`` does not know: the models ignore unknown keys (the Tinker SDK
    adds tags, stored state may carry old ones), so a request's misspelt key would vanish silently."""

    def check(value: Any) -> Any:
        if isinstance(value, Mapping):
            unknown = sorted(set(value) - set(model.model_fields), key=str)
            if unknown:
                raise ValueError(f"unknown field(s) {', '.join(map(repr, unknown))}; "
                                 f"known: {', '.join(model.model_fields)}")
        return value

    return BeforeValidator(check)


ExactLoraConfig = Annotated[LoraConfig, _known_keys(LoraConfig)]
ExactAdamParams = Annotated[AdamParams, _known_keys(AdamParams)]
ExactOptimizerConfig = Annotated[OptimizerConfig, _known_keys(OptimizerConfig)]
ExactLRSchedulerConfig = Annotated[LRSchedulerConfig, _known_keys(LRSchedulerConfig)]
ExactSamplingParams = Annotated[SamplingParams, _known_keys(SamplingParams)]
"""The parameter models as fields of the native API's requests, where an unknown key is a 400 naming it."""
