"""Inference kernels for the sampling path: base linear weights pre-packed for oneDNN on CPU.

A decode step multiplies a handful of rows by every weight of the model once. PyTorch's default CPU GEMM
re-lays-out (packs) the weight on every call, which at a few rows costs about as much as the product itself;
oneDNN with the weight packed once does not. Measured on the 2-core CPU (builtin://small, 8 rows, rank-8
adapter): a decode step ~1.4x faster. The packed copy doubles the memory of the base linear weights, so it is
made lazily (first sampling call), only on CPU, and only under ``max_bytes``; training and every gradient
path keep the plain ``nn.Linear``. oneDNN's packed product gives a row the same bits whatever the batch size
(so a seeded request samples the same tokens alone or batched); it differs from the default GEMM by float32
rounding only (``tests/sampler/test_decode_kernels.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 2 << 30  # pack at most 2 GiB of base weights (the copy costs as much memory)


def available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether packed oneDNN linears can serve this device/dtype."""
    if device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    return hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def pack(weight: torch.Tensor, rows_hint: int = 8) -> torch.Tensor:
    """``weight`` ([out, in]) packed for :func:`linear` (``rows_hint``: the typical number of rows)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows_hint)


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` with the weight packed by :func:`pack`."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def pack_all(layers: Iterable[Any], *, device: torch.device, dtype: torch.dtype,
             max_bytes: int = DEFAULT_MAX_BYTES) -> bool:
    """Give every ``MultiLoraLinear`` of ``layers`` a ``packed`` weight; False (nothing packed) when not
    available or the weights are larger than ``max_bytes``."""
    layers = list(layers)
    if not layers or not available(device, dtype):
        return False
    size = sum(m.base.weight.numel() * m.base.weight.element_size() for m in layers)
    if size > max_bytes:
        log.info("decode kernels: %d MiB of linear weights is above the %d MiB limit; not packed",
                 size >> 20, max_bytes >> 20)
        return False
    try:
        packed = [pack(m.base.weight) for m in layers]
        x = torch.zeros((1, layers[0].base.in_features), dtype=dtype, device=device)
        linear(x, packed[0], layers[0].base.bias)  # the kernel runs here, or we keep the default path
    except (RuntimeError, NotImplementedError) as e:  # pragma: no cover - torch built without oneDNN ops
        log.info("decode kernels unavailable (%s); using the default GEMM", e)
        return False
    for m, p in zip(layers, packed, strict=True):
        m.packed = p
    return True
