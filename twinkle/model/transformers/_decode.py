"""Inference kernels for the sampling path: base linear weights pre-packed for oneDNN on CPU, and one
adapter's merged weights for batches that sample from it alone.

A decode step multiplies a handful of rows by every weight of the model once. PyTorch's default CPU GEMM
re-lays-out (packs) the weight on every call, which at a few rows costs about as much as the product itself;
oneDNN with the weight packed once does not. Measured on the 2-core CPU (builtin://small, 8 rows, rank-8
adapter): a decode step ~1.4x faster. The packed copy doubles the memory of the base linear weights, so it is
made lazily (first sampling call), only on CPU, and only under ``max_bytes``; training and every gradient
path keep the plain ``nn.Linear``. The packed product differs from the default GEMM by float32 rounding only,
and neither promises a row the same bits at every batch size (oneDNN does for most shapes, not all), so a
seeded request samples the same tokens alone or batched unless a draw lands within rounding of a boundary
(``tests/sampler/test_decode_kernels.py``).
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


MERGE_AFTER = 4  # single-adapter sampling forwards of unchanged weights before that adapter's merge is built


class Merged:
    """One adapter's merged weights (``W + scale * B @ A``, packed) for sampling passes whose rows all use it.

    Such a forward then runs one product per adapted layer instead of the base product plus the two LoRA ones
    (on builtin://small with a rank-8 adapter the LoRA products are ~12 % of a decode step). At most one
    adapter is merged at a time (a copy of the adapted layers' weights), only for float32 models (merging into
    bf16/fp16 weights would round the LoRA update away), and only after ``MERGE_AFTER`` such forwards in a row
    (a short decode does not pay the merge). The merge is keyed on the adapter's parameter objects *and their
    version counters* (every in-place change bumps them), and the backend drops it explicitly whenever it
    changes the adapter (``optim_step``, ``load``, ``remove_adapter``), so a sample never sees stale weights.
    A layer uses the merge only when the routing names the same adapter; anything else (several adapters in
    the batch, a merge being rebuilt on another thread) takes the packed base product plus LoRA — the same
    numbers up to float32 rounding.
    """

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self.key: tuple[Any, ...] | None = None
        self._seen: tuple[Any, ...] | None = None
        self._count = 0
        self._layers: list[Any] = []
        self.builds = 0

    @staticmethod
    def _key(name: str, state: Any) -> tuple[Any, ...]:
        return (name, id(state), tuple((id(p), p._version) for p in state.parameters()))

    @property
    def adapter(self) -> str | None:
        return None if self.key is None else self.key[0]

    def drop(self, adapter: str | None = None) -> None:
        """Forget the merge (when ``adapter`` is given: only if it is that adapter's)."""
        if adapter is None or adapter == self.adapter:
            self.key = None
            for m in self._layers:
                m.merged = None
            self._layers = []
        if adapter is None or (self._seen is not None and self._seen[0] == adapter):
            self._seen, self._count = None, 0

    def use(self, name: str, state: Any, layers: dict[str, Any]) -> bool:
        """Whether ``name``'s merged weights serve this forward (building them when due)."""
        key = self._key(name, state)
        if key == self.key:
            return True
        if key != self._seen:
            self._seen, self._count = key, 0
        self._count += 1
        if self._count < MERGE_AFTER:
            return False
        mods = [m for m in state.modules if layers[m].packed is not None]
        size = sum(layers[m].base.weight.numel() * layers[m].base.weight.element_size() for m in mods)
        if not mods or size > self.max_bytes:
            return False
        self.drop()
        built = []
        with torch.no_grad():
            for mod in mods:
                layer, pair = layers[mod], state.pairs[mod]
                w = layer.base.weight
                merged = torch.addmm(w.float(), pair.lora_B.float(), pair.lora_A.float(), alpha=pair.scale)
                layer.merged = (name, pack(merged.to(w.dtype)))
                built.append(layer)
        self._layers = built
        self.key = key
        self.builds += 1
        return True
