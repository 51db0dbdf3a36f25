"""What a loss is, without torch: a ``LossSpec`` names its inputs, its config keys (defaults and ranges) and
its two implementations (torch, numpy). ``register_loss`` is the one place a loss is added.

Both implementations take per-datum learner logprobs of the target tokens (shape ``(N,)`` or ``(N, K)``), the
datum's ``loss_fn_inputs`` and the resolved config:

* ``torch_fn(logprobs: list[Tensor], inputs: list[dict[str, Tensor]], config) -> LossOutput``; the backends
  call ``loss.backward()``;
* ``numpy_fn(logprobs: list[ndarray], inputs: list[dict[str, ndarray]], config) -> NumpyLossOutput`` returns
  the value and dLoss/dlogprobs per datum (the mock backend's backward pass starts there).

Both report ``loss:sum`` (the loss value, sum-reduced) plus any extra ``name:reduction`` metrics. A
``torch_fn`` may be given as ``"module:attr"`` so that registering it does not import torch.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from twinkle.types import InvalidInputError, NonFiniteError, UnsupportedError

if TYPE_CHECKING:
    import numpy as np
    import torch


@dataclass
class LossOutput:
    """The torch result: ``loss`` the scalar to minimise (sum-reduced, not normalised); ``outputs`` one dict
    per datum (at least ``logprobs``); ``metrics`` ``name:reduction`` keys (at least ``loss:sum``)."""

    loss: torch.Tensor
    outputs: list[dict[str, torch.Tensor]]
    metrics: dict[str, float]


@dataclass
class NumpyLossOutput:
    """The numpy result: the loss value, dLoss/dlogprobs per datum (each shaped like its logprobs), metrics."""

    loss: float
    grads: list[np.ndarray]
    metrics: dict[str, float]


LossFn = Callable[..., LossOutput]
NumpyLossFn = Callable[..., NumpyLossOutput]
ConfigCheck = Callable[[dict[str, float]], None]


@dataclass(frozen=True)
class ConfigKey:
    """One number of ``loss_fn_config``: its default and the range it must lie in (always finite)."""

    name: str
    default: float
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    doc: str = ""

    def check(self, value: Any) -> float:
        where = f"loss_fn_config.{self.name}"
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise InvalidInputError(f"loss_fn_config[{self.name!r}] must be a number, got {value!r}", field=where)
        try:
            number = float(value)  # proto v2 may carry a number as text
        except (TypeError, ValueError, OverflowError):
            raise InvalidInputError(
                f"loss_fn_config[{self.name!r}] must be a number, got {value!r}", field=where
            ) from None
        if not math.isfinite(number):
            raise InvalidInputError(f"loss_fn_config[{self.name!r}] must be finite, got {value!r}", field=where)
        for bound, ok, word in ((self.ge, lambda b: number >= b, ">="), (self.gt, lambda b: number > b, ">"),
                                (self.le, lambda b: number <= b, "<=")):
            if bound is not None and not ok(bound):
                raise InvalidInputError(
                    f"loss_fn_config[{self.name!r}] must be {word} {bound:g}, got {number:g}", field=where
                )
        return number

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "default": self.default}
        for k in ("ge", "gt", "le"):
            if getattr(self, k) is not None:
                out[k] = getattr(self, k)
        if self.doc:
            out["doc"] = self.doc
        return out


@dataclass(frozen=True)
class LossSpec:
    """A registered loss. ``needs_reference``: the backend supplies ``ref_logprobs`` (the base model's, adapter
    disabled) for datums that lack them; ``paired``: datums come in (chosen, rejected) pairs."""

    name: str
    torch_fn: LossFn | str
    numpy_fn: NumpyLossFn
    required_inputs: tuple[str, ...] = ("target_tokens",)
    optional_inputs: tuple[str, ...] = ()
    config: tuple[ConfigKey, ...] = ()
    checks: tuple[ConfigCheck, ...] = ()
    needs_reference: bool = False
    paired: bool = False
    doc: str = ""
    _resolved: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def fn(self) -> LossFn:
        """The torch implementation (imported on first use when registered as ``"module:attr"``)."""
        fn = self._resolved.get("torch")
        if fn is None:
            fn = self.torch_fn
            if isinstance(fn, str):
                module, _, attr = fn.partition(":")
                fn = getattr(importlib.import_module(module), attr)
            self._resolved["torch"] = fn
        return fn

    @property
    def config_defaults(self) -> dict[str, float]:
        return {k.name: k.default for k in self.config}

    @property
    def inputs(self) -> tuple[str, ...]:
        return self.required_inputs + self.optional_inputs

    def resolve_config(self, config: Mapping[str, Any] | None) -> dict[str, float]:
        """Defaults overlaid with ``config``, every value checked; raises ``InvalidInputError`` naming the key."""
        if config is not None and not isinstance(config, Mapping):
            raise InvalidInputError("loss_fn_config must be an object of numbers", field="loss_fn_config")
        keys = {k.name: k for k in self.config}
        out = self.config_defaults
        for name, value in (config or {}).items():
            key = keys.get(name) if isinstance(name, str) else None
            if key is None:
                known = ", ".join(keys) or "none"
                raise InvalidInputError(
                    f"loss_fn {self.name!r} has no config key {name!r} (keys: {known})", field=f"loss_fn_config.{name}"
                )
            out[name] = key.check(value)
        for check in self.checks:
            check(out)
        return out

    def describe(self) -> dict[str, Any]:
        """What the capabilities route shows."""
        return {
            "name": self.name,
            "required_inputs": list(self.required_inputs),
            "optional_inputs": list(self.optional_inputs),
            "config": [k.describe() for k in self.config],
            "paired": self.paired,
            "doc": self.doc,
        }


_REGISTRY: dict[str, LossSpec] = {}


def register_loss(spec: LossSpec, *, replace: bool = False) -> LossSpec:
    """Add ``spec`` to the registry (every backend and both APIs then accept it). Returns ``spec``."""
    if not isinstance(spec, LossSpec):
        raise TypeError("register_loss takes a LossSpec")
    if not spec.name or not spec.name.isidentifier():
        raise ValueError(f"loss name {spec.name!r} must be an identifier")
    if spec.name in _REGISTRY and not replace:
        raise ValueError(f"loss {spec.name!r} is already registered")
    if "target_tokens" not in spec.required_inputs:
        raise ValueError("every loss reads target_tokens (its logprobs are the loss's input)")
    names = [k.name for k in spec.config]
    if len(set(names)) != len(names):
        raise ValueError(f"loss {spec.name!r} declares a config key twice")
    for key in spec.config:
        key.check(key.default)  # a default outside its own range is a bug of the spec
    _REGISTRY[spec.name] = spec
    return spec


def unregister_loss(name: str) -> None:
    _REGISTRY.pop(name, None)


def get_loss(name: Any) -> LossSpec:
    """The registered loss ``name``; an unknown name raises ``UnsupportedError`` naming ``loss_fn``."""
    spec = _REGISTRY.get(name) if isinstance(name, str) else None
    if spec is None:
        raise UnsupportedError(
            f"unknown loss_fn {name!r}; available: {', '.join(sorted(_REGISTRY))}", field="loss_fn"
        )
    return spec


def list_losses() -> list[str]:
    return sorted(_REGISTRY)


def all_losses() -> dict[str, LossSpec]:
    """A snapshot of the registry (name → spec)."""
    return dict(_REGISTRY)


def validate_request(loss_fn: Any, loss_fn_config: Any) -> dict[str, float]:
    """What the gateways call before queueing: the loss exists and its config is valid. Returns the config."""
    return get_loss(loss_fn).resolve_config(loss_fn_config)


def clip_order(config: dict[str, float]) -> None:
    """A cross-key check: ``clip_low_threshold`` ≤ ``clip_high_threshold``."""
    lo, hi = config.get("clip_low_threshold"), config.get("clip_high_threshold")
    if lo is not None and hi is not None and lo > hi:
        raise InvalidInputError(
            f"clip_low_threshold {lo:g} is above clip_high_threshold {hi:g}", field="loss_fn_config.clip_low_threshold"
        )


def check_finite_loss(name: str, value: float) -> None:
    """Called by every backend on each item's loss before any gradient is accumulated: a NaN or infinite loss
    is refused (``NonFiniteError``, a 400) and nothing of that pass is kept, so the run stays usable. A forward
    is refused too: its ``loss:sum`` would be NaN, which JSON cannot carry."""
    if not math.isfinite(value):
        raise NonFiniteError(
            f"loss_fn {name!r} gave a non-finite loss ({value}) on this batch; nothing was accumulated and the "
            "adapter is unchanged (look for extreme logprobs or advantages in loss_fn_inputs)",
            field="loss_fn_inputs", detail={"non_finite": "loss"},
        )


def nonfinite_gradient_error(norm: float) -> NonFiniteError:
    """What ``optim_step`` raises when the accumulated gradient is NaN or infinite: the step is not applied,
    adapter weights and optimizer state are unchanged, and the accumulated gradients are discarded."""
    return NonFiniteError(
        f"optim_step not applied: the accumulated gradient is not finite (norm {norm}); the adapter weights and "
        "optimizer state are unchanged, the gradients were discarded, and the run can continue",
        field="gradients", detail={"non_finite": "gradient"},
    )
