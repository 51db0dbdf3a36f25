"""Turn what users pass as ``inputs`` into ``Datum`` lists (numpy only; used locally and by the client)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from twinkle.types import Datum, InvalidInputError, ModelInput, TensorData

IGNORE_INDEX = -100


def to_datum(item: Any, index: int = 0) -> Datum:
    """Accepts a ``Datum``; a Tinker-style mapping ``{model_input, loss_fn_inputs}``; or an encoded example
    ``{input_ids, labels}`` (HF convention: same length, ``-100`` = not trained, shifted here) or
    ``{input_ids, weights}`` (per-token weights for the full sequence, shifted here)."""
    where = f"inputs[{index}]"
    if isinstance(item, Datum):
        return item
    if not isinstance(item, Mapping):
        raise InvalidInputError(f"{where} must be a Datum or a mapping, got {type(item).__name__}", field=where)
    if "model_input" in item:
        try:
            return Datum.model_validate(dict(item))
        except InvalidInputError:
            raise
        except Exception as e:  # pydantic.ValidationError
            raise InvalidInputError(f"{where} is not a valid Datum: {e}", field=where) from None
    if "input_ids" not in item:
        raise InvalidInputError(f"{where} needs 'input_ids' (or 'model_input')", field=f"{where}.input_ids")
    ids = np.asarray(_plain(item["input_ids"])).reshape(-1)
    if ids.size < 2:
        raise InvalidInputError(f"{where}.input_ids needs at least 2 tokens", field=f"{where}.input_ids")
    if not np.issubdtype(ids.dtype, np.integer):
        raise InvalidInputError(f"{where}.input_ids must be integers", field=f"{where}.input_ids")
    if "labels" in item and item["labels"] is not None:
        labels = np.asarray(_plain(item["labels"])).reshape(-1)
        if labels.shape != ids.shape:
            raise InvalidInputError(
                f"{where}.labels has {labels.size} entries but input_ids has {ids.size}", field=f"{where}.labels"
            )
        targets = labels[1:].copy()
        weights = (targets != IGNORE_INDEX).astype(np.float32)
        targets = np.where(targets == IGNORE_INDEX, ids[1:], targets)
    else:
        targets = ids[1:]
        w = item.get("weights")
        if w is None:
            weights = np.ones(ids.size - 1, dtype=np.float32)
        else:
            w = np.asarray(_plain(w), dtype=np.float32).reshape(-1)
            if w.shape != ids.shape:
                raise InvalidInputError(
                    f"{where}.weights has {w.size} entries but input_ids has {ids.size}", field=f"{where}.weights"
                )
            weights = w[1:]
    return Datum(
        model_input=ModelInput.from_ints(ids[:-1].tolist()),
        loss_fn_inputs={
            "target_tokens": TensorData.from_numpy(targets.astype(np.int64)),
            "weights": TensorData.from_numpy(weights.astype(np.float32)),
        },
    )


def loss_weight_and_tokens(data: Iterable[Datum]) -> tuple[float, int]:
    """(sum of loss weights, input tokens) of a batch. ``loss:sum / weight`` is THE per-token mean loss that the
    local model, the remote client, the server's run metrics and the panel all show (one definition)."""
    weight, tokens = 0.0, 0
    for d in data:
        w = d.loss_fn_inputs.get("weights")
        weight += float(w.to_numpy().sum()) if w is not None else float(d.model_input.length)
        tokens += d.model_input.length
    return weight, tokens


def to_datums(inputs: Any) -> list[Datum]:
    """A batch (list/tuple/iterable of examples, or one mapping of equal-length lists) → list of Datum."""
    if isinstance(inputs, (Datum, Mapping)) and not _is_columnar(inputs):
        inputs = [inputs]
    elif isinstance(inputs, Mapping):
        n = len(next(iter(inputs.values())))
        inputs = [{k: v[i] for k, v in inputs.items()} for i in range(n)]
    if not isinstance(inputs, Iterable):
        raise InvalidInputError("inputs must be a list of examples", field="inputs")
    out = [to_datum(x, i) for i, x in enumerate(inputs)]
    if not out:
        raise InvalidInputError("inputs is empty", field="inputs")
    return out


def _is_columnar(m: Any) -> bool:
    if not isinstance(m, Mapping) or "input_ids" not in m:
        return False
    first = _plain(m["input_ids"])
    return len(first) > 0 and isinstance(first[0], (list, tuple, np.ndarray))


def _plain(x: Any) -> Any:
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return x
