"""Inputs: ModelInput, TensorData, Datum. Field names follow Tinker's so JSON is interchangeable."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    WrapValidator,
    field_validator,
    model_validator,
)

from .errors import InvalidInputError

_INT_KEYS = {"target_tokens", "input_ids", "labels", "chosen_tokens", "rejected_tokens"}


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", arbitrary_types_allowed=True)


class EncodedTextChunk(_Model):
    type: Literal["encoded_text"] = "encoded_text"
    tokens: list[int]

    @property
    def length(self) -> int:
        return len(self.tokens)


class ImageChunk(_Model):
    type: Literal["image"] = "image"
    data: str = Field(description="base64-encoded image bytes")
    format: str = "png"
    expected_tokens: int | None = None

    @property
    def length(self) -> int:
        if self.expected_tokens is None:
            raise InvalidInputError("image chunk needs expected_tokens", field="model_input.chunks.expected_tokens")
        return self.expected_tokens


ModelInputChunk = Annotated[Union[EncodedTextChunk, ImageChunk], Field(discriminator="type")]


class ModelInput(_Model):
    chunks: list[ModelInputChunk] = Field(default_factory=list)

    @classmethod
    def from_ints(cls, tokens: list[int] | np.ndarray) -> ModelInput:
        return cls(chunks=[EncodedTextChunk(tokens=[int(t) for t in tokens])])

    @classmethod
    def empty(cls) -> ModelInput:
        return cls(chunks=[])

    def to_ints(self) -> list[int]:
        out: list[int] = []
        for c in self.chunks:
            if not isinstance(c, EncodedTextChunk):
                raise InvalidInputError("this operation takes text tokens only (no image chunks here; see docs/multimodal.md)",
                                        field="model_input.chunks.type")
            out.extend(c.tokens)
        return out

    @property
    def length(self) -> int:
        return sum(c.length for c in self.chunks)

    def append_int(self, token: int) -> ModelInput:
        return ModelInput.from_ints(self.to_ints() + [int(token)])


def _listed(v: Any) -> Any:
    return v.tolist() if isinstance(v, np.ndarray) else v


def _keep_arrays(v: Any, handler: Any) -> Any:
    return v if isinstance(v, np.ndarray) else handler(v)  # an array is checked by the model validator


_Values = Annotated[Union[list[float], list[int]], WrapValidator(_keep_arrays),
                   PlainSerializer(_listed, return_type=Union[list[float], list[int]])]


class TensorData(_Model):
    """A flat array of numbers with a dtype and an optional shape. On the wire ``data`` is a JSON list; in
    memory it is a compact numpy array (int64, or float32/float64 for ``float32`` tensors: a JSON float keeps
    its exact value until :meth:`to_numpy`), about 8 bytes a value where a Python list of floats costs 32:
    a large request decodes to a few times its body, not ten, and travels to a worker as raw bytes."""

    data: _Values
    dtype: Literal["int64", "float32"]
    shape: list[int] | None = None

    @model_validator(mode="after")
    def _values_fit_dtype(self) -> TensorData:
        """Every value is finite and representable in ``dtype`` (a NaN token id or a 1e308 weight used to
        fail inside the model as a server error, or silently turn into garbage); the list becomes an array."""
        a: Any = self.data  # a list from JSON or an array; an int64, float32 or float64 array when done
        if isinstance(a, np.ndarray):
            if a.dtype.kind not in "biuf":
                raise ValueError(f"data must be numbers, not an array of {a.dtype}")
            if a.ndim != 1:
                if self.shape is None:
                    self.shape = [int(s) for s in a.shape]
                a = a.reshape(-1)
            a = a.copy()  # never alias the caller's array
        elif self.dtype == "int64" and all(type(x) is int for x in a):
            try:
                a = np.asarray(a, dtype=np.int64)
            except OverflowError:
                raise ValueError("int64 values must be integers within the int64 range") from None
        else:
            try:
                a = np.asarray(a, dtype=np.float64)
            except (OverflowError, ValueError):
                raise ValueError(f"values do not fit {self.dtype}") from None
        if a.dtype.kind == "b":
            a = a.astype(np.int64 if self.dtype == "int64" else np.float64)
        if a.dtype.kind == "f" and a.size:
            if not np.isfinite(a).all():
                raise ValueError("values must be finite numbers (no NaN or Infinity)")
            if self.dtype == "int64":
                if not (a == np.round(a)).all() or np.abs(a).max() >= 2.0**63:
                    raise ValueError("int64 values must be integers within the int64 range")
            elif np.abs(a).max() > float(np.finfo(np.float32).max):
                raise ValueError("float32 values must be within the float32 range")
        if self.dtype == "int64":
            a = a.astype(np.int64, copy=False)
        elif a.dtype.kind != "f":
            a = a.astype(np.float64)
        self.data = a
        return self

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TensorData):
            return NotImplemented
        return (self.dtype == other.dtype and self.shape == other.shape
                and np.array_equal(np.asarray(self.data), np.asarray(other.data)))

    __hash__ = None  # type: ignore[assignment]

    @classmethod
    def from_numpy(cls, arr: np.ndarray | list[Any], dtype: str | None = None) -> TensorData:
        a = np.asarray(arr)
        if dtype is None:
            dtype = "int64" if np.issubdtype(a.dtype, np.integer) else "float32"
        a = a.astype(np.int64 if dtype == "int64" else np.float32)
        return cls(data=a.reshape(-1), dtype=dtype, shape=list(a.shape))

    def to_numpy(self) -> np.ndarray:
        """A new array (int64 or float32) of ``shape``: the caller may change it freely."""
        a = np.array(self.data, dtype=np.int64 if self.dtype == "int64" else np.float32)
        if self.shape is not None:
            if int(np.prod(self.shape)) != a.size:
                raise InvalidInputError(f"TensorData shape {self.shape} does not match {a.size} values", field="shape")
            a = a.reshape(self.shape)
        return a

    def tolist(self) -> list[Any]:
        return self.to_numpy().tolist()


def _to_tensor(key: str, value: Any) -> TensorData:
    if isinstance(value, TensorData):
        return value
    if isinstance(value, dict) and "data" in value and "dtype" in value:
        return TensorData.model_validate(value)
    if hasattr(value, "detach"):  # torch tensor, without importing torch
        value = value.detach().cpu().numpy()
    a = np.asarray(value)
    if a.dtype == object:
        raise InvalidInputError(f"loss_fn_inputs[{key!r}] is not a numeric array", field=f"loss_fn_inputs.{key}")
    dtype = "int64" if key in _INT_KEYS or np.issubdtype(a.dtype, np.integer) and key not in ("weights", "advantages", "logprobs") else "float32"
    return TensorData.from_numpy(a, dtype)


class Datum(_Model):
    """One training example. Position i of ``model_input`` predicts ``loss_fn_inputs['target_tokens'][i]``."""

    model_input: ModelInput
    loss_fn_inputs: dict[str, TensorData] = Field(default_factory=dict)

    @field_validator("loss_fn_inputs", mode="before")
    @classmethod
    def _convert(cls, v: Any) -> Any:
        if v is None:
            return {}
        if not isinstance(v, dict):
            raise InvalidInputError("loss_fn_inputs must be a mapping of name to array", field="loss_fn_inputs")
        return {k: _to_tensor(k, val) for k, val in v.items()}

    @model_validator(mode="before")
    @classmethod
    def _coerce_input(cls, v: Any) -> Any:
        if isinstance(v, dict) and isinstance(v.get("model_input"), (list, tuple, np.ndarray)):
            v = dict(v)
            toks = v["model_input"]
            toks = toks.tolist() if isinstance(toks, np.ndarray) else list(toks)
            # validated like any chunk: a non-integer token is a 400 naming it, not a TypeError
            v["model_input"] = {"chunks": [{"type": "encoded_text", "tokens": toks}]}
        return v


def datum_from_tokens(tokens: list[int], weights: list[float] | None = None) -> Datum:
    """Next-token datum from a full sequence: input ``tokens[:-1]``, targets ``tokens[1:]``."""
    if len(tokens) < 2:
        raise InvalidInputError("a training sequence needs at least 2 tokens", field="tokens")
    w = [1.0] * (len(tokens) - 1) if weights is None else list(weights)[1:]
    return Datum(
        model_input=ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": TensorData.from_numpy(np.asarray(tokens[1:], dtype=np.int64)),
            "weights": TensorData.from_numpy(np.asarray(w, dtype=np.float32)),
        },
    )
