"""Check a batch before anything runs and turn it into rows grouped by adapter."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from twinkle.loss import LossSpec, get_loss
from twinkle.model.base import BatchItem
from twinkle.types import InvalidInputError, NotFoundError


@dataclass
class PreparedItem:
    item: BatchItem
    spec: LossSpec
    config: dict[str, float]
    tokens: list[np.ndarray]  # per datum, int64 (N,)
    inputs: list[dict[str, np.ndarray]]  # per datum loss_fn_inputs as numpy
    images: list[list[Any]] = field(default_factory=list)  # per datum, its images (vision models only)


Expand = Callable[[Any, str], "tuple[list[int], list[Any]]"]


def prepare(items: list[BatchItem], adapters: set[str], vocab_size: int, max_length: int,
            expand: Expand | None = None) -> list[PreparedItem]:
    """Validate every item (raising a typed error naming the field) and convert its data to numpy.
    ``expand(model_input, field)``: a vision model's image expansion (tokens, images)."""
    if not isinstance(items, list) or not items:
        raise InvalidInputError("a batch needs at least one item", field="data")
    out = []
    for item in items:
        if item.adapter is None:
            if not item.forward_only:
                raise InvalidInputError("the base model (adapter=None) can only run forward", field="adapter")
        elif item.adapter not in adapters:
            raise NotFoundError(f"unknown adapter {item.adapter!r}", field="adapter")
        spec = get_loss(item.loss_fn)
        config = spec.resolve_config(item.loss_fn_config)
        if not item.data:
            raise InvalidInputError("data is empty", field="data")
        if spec.paired and len(item.data) % 2:
            raise InvalidInputError(
                f"loss_fn {spec.name!r} takes datums in (chosen, rejected) pairs; got {len(item.data)}", field="data"
            )
        floats = [k for k in spec.inputs if k != "target_tokens"]  # every other input of a loss is a float
        toks, inps, imgs = [], [], []
        for i, d in enumerate(item.data):
            where = f"data[{i}]"
            if expand is not None:
                ids, row_images = expand(d.model_input, f"{where}.model_input")
            else:
                ids, row_images = d.model_input.to_ints(), []
            imgs.append(row_images)
            t = np.asarray(ids, dtype=np.int64)
            n = t.size
            if n == 0:
                raise InvalidInputError(f"{where}.model_input is empty", field=f"{where}.model_input")
            if n > max_length:
                raise InvalidInputError(
                    f"{where}.model_input has {n} tokens, more than the model's {max_length}", field=f"{where}.model_input"
                )
            if t.min() < 0 or t.max() >= vocab_size:
                bad = int(t[(t < 0) | (t >= vocab_size)][0])
                raise InvalidInputError(
                    f"{where}.model_input token id {bad} is outside the vocabulary [0, {vocab_size})",
                    field=f"{where}.model_input.tokens",
                )
            inp: dict[str, np.ndarray] = {}
            for key, td in d.loss_fn_inputs.items():
                a = td.to_numpy()
                if a.ndim == 0 or a.shape[0] != n:
                    got = "a scalar" if a.ndim == 0 else f"{a.shape[0]} entries"
                    raise InvalidInputError(
                        f"{where}.loss_fn_inputs[{key!r}] has {got} but model_input has {n} tokens",
                        field=f"{where}.loss_fn_inputs.{key}",
                    )
                inp[key] = a.astype(np.float32) if key in floats else a
            for key in spec.required_inputs:
                if key not in inp:
                    raise InvalidInputError(
                        f"loss_fn {spec.name!r} needs {where}.loss_fn_inputs[{key!r}]", field=f"{where}.loss_fn_inputs.{key}"
                    )
            tgt = inp["target_tokens"]
            if not np.issubdtype(tgt.dtype, np.integer):
                raise InvalidInputError(
                    f"{where}.loss_fn_inputs['target_tokens'] must be integers", field=f"{where}.loss_fn_inputs.target_tokens"
                )
            if tgt.ndim > 2 or tgt.min() < 0 or tgt.max() >= vocab_size:
                raise InvalidInputError(
                    f"{where}.loss_fn_inputs['target_tokens'] has ids outside the vocabulary [0, {vocab_size})",
                    field=f"{where}.loss_fn_inputs.target_tokens",
                )
            for key in floats:
                if key == "weights" and key in inp and inp[key].shape != tgt.shape:
                    raise InvalidInputError(
                        f"{where}.loss_fn_inputs['weights'] shape {list(inp[key].shape)} does not match target_tokens "
                        f"{list(tgt.shape)}", field=f"{where}.loss_fn_inputs.weights",
                    )
                if key in inp and not np.all(np.isfinite(inp[key])):
                    raise InvalidInputError(
                        f"{where}.loss_fn_inputs[{key!r}] has a NaN or infinite value", field=f"{where}.loss_fn_inputs.{key}"
                    )
            toks.append(t)
            inps.append(inp)
        out.append(PreparedItem(item, spec, config, toks, inps, imgs))
    return out
