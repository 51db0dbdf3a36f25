"""Results returned by the engine, the server and both clients."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from .data import TensorData


class _Out(BaseModel):
    model_config = ConfigDict(extra="ignore")
    # Where the request's time went on the worker ({queue_s, exec_s}); set by the scheduler, carried to the
    # gateway with the object (pickled with it), never serialized into a reply body. See :func:`attach_timing`.
    _timing: dict[str, float] | None = PrivateAttr(default=None)


def attach_timing(value: object, queue_s: float, exec_s: float) -> None:
    """Record on a result object how long its request waited in the worker's queue and ran (seconds)."""
    if isinstance(value, _Out):
        value._timing = {"queue_s": max(0.0, queue_s), "exec_s": max(0.0, exec_s)}


def timing_of(value: object) -> dict[str, float] | None:
    """The worker-side timing :func:`attach_timing` recorded on ``value``, if any."""
    return dict(value._timing) if isinstance(value, _Out) and value._timing is not None else None


class ForwardBackwardOutput(_Out):
    """One result per datum, in order, plus metrics whose keys are ``name:reduction``."""

    loss_fn_output_type: str = "TensorData"
    loss_fn_outputs: list[dict[str, TensorData]] = Field(default_factory=list)
    metrics: dict[str, float] = Field(default_factory=dict)


class OptimStepResponse(_Out):
    metrics: dict[str, float] | None = None


class SampledSequence(_Out):
    stop_reason: Literal["stop", "length"]
    tokens: list[int]
    logprobs: list[float] | None = None


class SampleResponse(_Out):
    sequences: list[SampledSequence]
    prompt_logprobs: list[float | None] | None = None
    topk_prompt_logprobs: list[list[tuple[int, float]] | None] | None = None


class VisionInfo(_Out):
    """How a vision-language model turns an image into tokens (Qwen-VL rules; see docs/multimodal.md).

    An image of ``width x height`` is resized so both sides are multiples of ``patch_size * merge_size`` and
    the area lies in ``[min_pixels, max_pixels]``; it then takes ``(h / patch_size) * (w / patch_size) /
    merge_size**2`` tokens. Clients count tokens from these numbers without transformers.
    """

    patch_size: int
    merge_size: int
    temporal_patch_size: int = 2
    min_pixels: int
    max_pixels: int
    image_token_id: int
    vision_start_token_id: int | None = None
    vision_end_token_id: int | None = None
    formats: list[str] = Field(default_factory=lambda: ["png", "jpeg"])
    max_image_pixels: int = Field(4096 * 4096, description="largest decoded image (width x height) accepted")
    max_image_bytes: int = Field(8 * 1024 * 1024, description="largest encoded image accepted")


class ModelInfo(_Out):
    """What a backend tells about its base model."""

    model_name: str
    backend: str
    arch: str | None = None
    vocab_size: int
    max_length: int
    tokenizer_id: str | None = Field(None, description="a path or hub id the client can load a tokenizer from")
    eos_token_ids: list[int] = Field(default_factory=list)
    num_parameters: int | None = None
    vision: VisionInfo | None = Field(None, description="set when the model accepts images")
