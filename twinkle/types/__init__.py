"""The wire/data model shared by the server and both clients. numpy + pydantic only (no torch)."""

from .data import Datum, EncodedTextChunk, ImageChunk, ModelInput, TensorData, datum_from_tokens
from .errors import (
    AuthenticationError,
    CapacityError,
    ForbiddenError,
    GoneError,
    InternalError,
    InvalidInputError,
    LimitExceededError,
    NonFiniteError,
    NotFoundError,
    StateLostError,
    TwinkleError,
    UnsupportedError,
)
from .outputs import (
    ForwardBackwardOutput,
    ModelInfo,
    OptimStepResponse,
    SampledSequence,
    SampleResponse,
    VisionInfo,
)
from .params import AdamParams, LoraConfig, LRSchedulerConfig, OptimizerConfig, SamplingParams, to_lora_config

__all__ = [
    "AdamParams",
    "AuthenticationError",
    "CapacityError",
    "Datum",
    "EncodedTextChunk",
    "ForbiddenError",
    "ForwardBackwardOutput",
    "GoneError",
    "ImageChunk",
    "InternalError",
    "InvalidInputError",
    "LimitExceededError",
    "NonFiniteError",
    "LoraConfig",
    "LRSchedulerConfig",
    "ModelInfo",
    "VisionInfo",
    "ModelInput",
    "NotFoundError",
    "OptimStepResponse",
    "OptimizerConfig",
    "SampleResponse",
    "to_lora_config",
    "SampledSequence",
    "SamplingParams",
    "StateLostError",
    "TensorData",
    "TwinkleError",
    "UnsupportedError",
    "datum_from_tokens",
]
