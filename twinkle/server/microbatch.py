"""Micro-batches: one forward/forward_backward request larger than the worker's ``batch_token_budget`` runs as
several backend passes of at most that many tokens, with the gradients accumulating in the adapter exactly as
one pass would leave them (every loss is token-wise and sum-reduced, so the gradient of the whole is the sum of
the gradients of the parts).

* **Splitting** (:func:`split_item`) keeps whole datums, in order; a paired loss (DPO) keeps each (chosen,
  rejected) pair in one part. A single datum larger than the budget is a part of its own (the per-request and
  per-sequence limits are checked before, at submission).
* **Merging** (:func:`merge_outputs`): ``loss_fn_outputs`` are concatenated in datum order; metrics merge by
  their ``name:reduction`` suffix: ``sum`` adds, ``min``/``max`` take the extreme, ``mean`` is weighted by the
  part's datum count (the same rule the Tinker SDK applies when it merges its own chunks), anything else keeps
  the last part's value.
* **All or nothing** (in the scheduler): the adapter's accumulated gradients are snapshotted before the first
  part and restored if any part fails, so a failed request leaves no partial gradient behind.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from twinkle.model.base import BatchItem
from twinkle.types import ForwardBackwardOutput

__all__ = ["merge_outputs", "split_item"]


def split_item(item: BatchItem, budget: int, *, paired: bool = False) -> list[BatchItem]:
    """``item`` cut into consecutive parts of at most ``budget`` tokens (whole datums, pairs kept together)."""
    unit = 2 if paired else 1
    data = item.data
    parts: list[BatchItem] = []
    start, used = 0, 0
    i = 0
    while i < len(data):
        group = data[i:i + unit]
        n = sum(d.model_input.length for d in group)
        if i > start and used + n > budget:
            parts.append(replace(item, data=data[start:i]))
            start, used = i, 0
        used += n
        i += unit
    parts.append(replace(item, data=data[start:]))
    return parts


def merge_outputs(outs: list[ForwardBackwardOutput], sizes: list[int]) -> ForwardBackwardOutput:
    """One output for the whole request from the outputs of its parts (``sizes``: datums per part)."""
    if len(outs) == 1:
        return outs[0]
    merged: list[dict[str, Any]] = []
    for o in outs:
        merged.extend(o.loss_fn_outputs)
    metrics: dict[str, float] = {}
    weight: dict[str, float] = {}
    for o, n in zip(outs, sizes, strict=True):
        for key, value in (o.metrics or {}).items():
            v = float(value)
            reduction = key.rsplit(":", 1)[-1] if ":" in key else ""
            if key not in metrics:
                metrics[key] = v * n if reduction == "mean" else v
                weight[key] = float(n)
            elif reduction == "sum":
                metrics[key] += v
            elif reduction == "min":
                metrics[key] = min(metrics[key], v)
            elif reduction == "max":
                metrics[key] = max(metrics[key], v)
            elif reduction == "mean":
                metrics[key] += v * n
                weight[key] += n
            else:
                metrics[key] = v
    for key in metrics:
        if key.endswith(":mean"):
            metrics[key] /= max(weight[key], 1.0)
    first = outs[0]
    return first.model_copy(update={"loss_fn_outputs": merged, "metrics": metrics})
