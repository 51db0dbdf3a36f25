"""Row surgery on a Hugging Face ``DynamicCache``: select/repeat rows, left-pad, concatenate, trim.

The continuous sampler keeps ONE cache for all running rows, left-padded to a common width (an attention
mask marks the padding). Rows join (concatenate after left-padding the narrower side), fork (repeat a
prompt's row ``n`` times) and leave (select the remaining rows, then drop columns that are padding in
every row). Only plain full-attention layers are supported (``supports``); other cache kinds (sliding
window, static, hybrid) make the backend fall back to whole-batch generation.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def _layers(cache: Any) -> list[Any]:
    return list(getattr(cache, "layers", []) or [])


def supports(cache: Any) -> bool:
    """True when every layer of ``cache`` is a plain ``DynamicLayer`` holding its tensors."""
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:  # pragma: no cover - very old transformers
        return False
    layers = _layers(cache)
    if not layers:
        return False
    return all(type(la) is DynamicLayer and la.keys is not None and la.keys.dim() == 4 for la in layers)


def width(cache: Any) -> int:
    la = _layers(cache)[0]
    return int(la.keys.shape[-2])


def select(cache: Any, idx: torch.Tensor) -> None:
    """Keep (or repeat) rows ``idx`` in place."""
    for la in _layers(cache):
        la.keys = la.keys.index_select(0, idx)
        la.values = la.values.index_select(0, idx)


def left_pad(cache: Any, n: int) -> None:
    if n <= 0:
        return
    for la in _layers(cache):
        la.keys = F.pad(la.keys, (0, 0, n, 0))
        la.values = F.pad(la.values, (0, 0, n, 0))


def trim_left(cache: Any, n: int) -> None:
    if n <= 0:
        return
    for la in _layers(cache):
        la.keys = la.keys[:, :, n:].contiguous()
        la.values = la.values[:, :, n:].contiguous()


def concat(into: Any, other: Any) -> None:
    """Append ``other``'s rows to ``into`` (both already the same width)."""
    for a, b in zip(_layers(into), _layers(other), strict=True):
        a.keys = torch.cat([a.keys, b.keys], dim=0)
        a.values = torch.cat([a.values, b.values], dim=0)
