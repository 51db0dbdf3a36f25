"""Results returned by the engine, the server and both clients."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .data import TensorData


class _Out(BaseModel):
    model_config = ConfigDict(extra="ignore")


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
