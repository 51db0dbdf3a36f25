"""The loss registry: one ``LossSpec`` per loss (inputs, config keys with defaults and ranges) with its torch
and numpy implementations. Importing this package does not import torch.

Add a loss with ``register_loss(LossSpec(name, torch_fn, numpy_fn, required_inputs, optional_inputs,
config=(ConfigKey(...),)))``; every backend, both APIs, the capabilities route and the parity test
(``tests/loss/test_parity.py``) pick it up. See ``docs/models.md``.
"""

from __future__ import annotations

from . import _builtin  # noqa: F401  (registers the built-in losses)
from ._spec import (
    ConfigKey,
    LossFn,
    LossOutput,
    LossSpec,
    NumpyLossFn,
    NumpyLossOutput,
    all_losses,
    check_finite_loss,
    clip_order,
    get_loss,
    list_losses,
    nonfinite_gradient_error,
    register_loss,
    unregister_loss,
    validate_request,
)


def describe_losses() -> list[dict]:
    """Every registered loss as the capabilities route shows it."""
    return [spec.describe() for _, spec in sorted(all_losses().items())]


__all__ = [
    "ConfigKey",
    "LossFn",
    "LossOutput",
    "LossSpec",
    "NumpyLossFn",
    "NumpyLossOutput",
    "all_losses",
    "check_finite_loss",
    "clip_order",
    "describe_losses",
    "get_loss",
    "list_losses",
    "nonfinite_gradient_error",
    "register_loss",
    "unregister_loss",
    "validate_request",
]
