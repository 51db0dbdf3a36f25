"""Request models of the Tinker routes: what the 0.38 SDK sends, typed, so ``/openapi.json`` documents every
body and every bad value is a 400 naming its field. Numbers are checked by the shared parameter models
(``twinkle.types.params``: AdamParams, LoraConfig, SamplingParams) and the loss registry; nothing here
re-states a range those already own. Unknown fields are ignored (the SDK adds ``type`` tags and may add more).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from twinkle.types import AdamParams, Datum, LoraConfig, ModelInput, SamplingParams
from twinkle.types.params import MAX_NUM_SAMPLES, Integer, TopKLogprobs, TtlSeconds

__all__ = [
    "MAX_NUM_SAMPLES",
    "AdamParamsBody",
    "AsampleRequest",
    "ClientConfigRequest",
    "CreateModelRequest",
    "CreateSamplingSessionRequest",
    "CreateSessionRequest",
    "EmptyBody",
    "FinishSessionRequest",
    "ForwardBackwardBody",
    "ForwardBackwardInput",
    "ForwardBackwardJSON",
    "GetInfoRequest",
    "LoadWeightsRequest",
    "OptimStepRequest",
    "OptimizerConfigBody",
    "RetrieveFutureRequest",
    "SaveWeightsRequest",
    "SessionHeartbeatRequest",
    "SetTTLRequest",
    "TelemetryRequest",
    "WeightsInfoRequest",
]


Id = Annotated[str, Field(min_length=1, max_length=512)]
"""A session, run, sampler or request id (the SDK's ids are short; 512 leaves room for tags)."""
SeqId = Annotated[Integer, Field(ge=0, le=2**62)]
Text = Annotated[str, Field(max_length=4096)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class EmptyBody(_Body):
    """A body the route does not read (any object is accepted)."""


class ClientConfigRequest(_Body):
    sdk_version: Text | None = None


class TelemetryRequest(_Body):
    """Accepted and dropped: the server collects nothing from clients."""

    session_id: Text | None = None
    sdk_version: Text | None = None


class CreateSessionRequest(_Body):
    tags: list[Text] = Field(default_factory=list, max_length=256)
    user_metadata: dict[str, Any] | None = None
    sdk_version: Text | None = None
    project_id: Text | None = None
    display_name: Text | None = None


class SessionHeartbeatRequest(_Body):
    session_id: Id


class FinishReason(_Body):
    type: Text = "finished"


class FinishSessionRequest(_Body):
    reason: FinishReason | Text | None = None
    detail: Any = None


class OptimizerConfigBody(_Body):
    """``{"type": "adamw"}`` (the only optimizer served) or ``{"type": "dimuon", "version": 1}`` (refused)."""

    type: Text = "adamw"


_TINKER_LORA_KEYS = ("rank", "seed", "train_attn", "train_mlp", "train_unembed")


def _tinker_lora(value: Any) -> Any:
    """Tinker's LoraConfig carries only rank, seed and the train_* switches; other keys are ignored."""
    if isinstance(value, dict):
        return {k: value[k] for k in _TINKER_LORA_KEYS if k in value}
    return value


class CreateModelRequest(_Body):
    session_id: Id
    model_seq_id: SeqId
    base_model: Id
    lora_config: Annotated[LoraConfig, BeforeValidator(_tinker_lora)] = Field(default_factory=LoraConfig)
    user_metadata: dict[str, Any] | None = None
    optimizer_config: OptimizerConfigBody | None = None


class GetInfoRequest(_Body):
    model_id: Id


class ForwardBackwardBody(_Body):
    """A forward_backward request in Twinkle types: what the protobuf codec and the JSON form both become."""

    model_id: Id
    seq_id: SeqId | None = None
    data: list[Datum]
    loss_fn: Text = "cross_entropy"
    loss_fn_config: dict[str, Any] | None = Field(None, description="checked by the loss registry")
    forward_only: bool = False
    target_spans: list[list[tuple[str, str, int, int]] | None] | None = Field(
        None, description="per datum, the provenance spans of its targets (protobuf only; stable_reinforce)")


class ForwardBackwardInput(_Body):
    data: list[Datum] = Field(default_factory=list)
    loss_fn: Text = "cross_entropy"
    loss_fn_config: dict[str, Any] | None = Field(None, description="checked by the loss registry")


class ForwardBackwardJSON(_Body):
    """The JSON form (older SDKs; the 0.38 SDK sends protobuf)."""

    model_id: Id
    seq_id: SeqId | None = None
    forward_backward_input: ForwardBackwardInput | None = None
    forward_input: ForwardBackwardInput | None = None
    forward_only: bool | None = None

    def to_body(self, forward_only: bool = False) -> ForwardBackwardBody:
        fbi = self.forward_backward_input or self.forward_input or ForwardBackwardInput()
        return ForwardBackwardBody(
            model_id=self.model_id, seq_id=self.seq_id, data=fbi.data, loss_fn=fbi.loss_fn or "cross_entropy",
            loss_fn_config=fbi.loss_fn_config,
            forward_only=forward_only if self.forward_only is None else self.forward_only,
        )


class AdamParamsBody(AdamParams):
    """AdamParams plus the ``type`` tag Tinker's optimizer params carry (``adam``/``adamw``; others refused)."""

    type: Text | None = None


class OptimStepRequest(_Body):
    model_id: Id
    seq_id: SeqId | None = None
    adam_params: AdamParamsBody | None = None
    optim_params: AdamParamsBody | None = Field(None, description="another spelling of adam_params")
    optimizer_params: AdamParamsBody | None = Field(None, description="another spelling of adam_params")

    def params(self) -> AdamParamsBody | None:
        return self.adam_params or self.optim_params or self.optimizer_params


class SaveWeightsRequest(_Body):
    """save_weights, save_weights_for_sampler (named, or ephemeral with ``sampling_session_seq_id`` and no
    path) and save_weights_external."""

    model_id: Id
    path: Annotated[str, Field(max_length=256)] | None = None
    seq_id: SeqId | None = None
    ttl_seconds: TtlSeconds | None = None
    overwrite: bool = False
    kind: Text | None = None
    sampling_session_seq_id: SeqId | None = None
    user_metadata: dict[str, Any] | None = None
    age_encryption_recipients: list[Text] | None = None


class LoadWeightsRequest(_Body):
    """Create-via-load (``session_id`` + ``model_seq_id``) or legacy load into ``model_id``."""

    path: Id
    optimizer: bool = False
    session_id: Id | None = None
    model_seq_id: SeqId | None = None
    model_id: Id | None = None
    seq_id: SeqId | None = None
    base_model: Id | None = None
    optimizer_config: OptimizerConfigBody | None = None
    user_metadata: dict[str, Any] | None = None
    weights_access_token: Text | None = None


class CreateSamplingSessionRequest(_Body):
    session_id: Id
    sampling_session_seq_id: SeqId
    base_model: Id | None = None
    model_path: Id | None = None


class AsampleRequest(_Body):
    prompt: ModelInput
    num_samples: Integer = Field(1, ge=1, le=MAX_NUM_SAMPLES)
    sampling_params: SamplingParams = Field(default_factory=SamplingParams)
    sampling_session_id: Id | None = None
    model_path: Id | None = None
    base_model: Id | None = None
    seq_id: SeqId | None = None
    prompt_logprobs: bool = False
    topk_prompt_logprobs: TopKLogprobs = Field(0, description="per prompt position; the reply is prompt length × k")
    topk_sample_logprobs: Integer = Field(0, ge=0, description="not supported: must be 0")
    target_prompt_logprobs: Any = Field(None, description="not supported: must be absent")
    prompt_alt_tokens_k: Integer = Field(0, ge=0, description="not supported: must be 0")
    prompt_logprobs_last_n: Integer | None = Field(None, ge=1)
    record_stability_info: bool = False


class RetrieveFutureRequest(_Body):
    request_id: Id
    allow_metadata_only: bool = False


class SetTTLRequest(_Body):
    ttl_seconds: TtlSeconds | None = None


class WeightsInfoRequest(_Body):
    tinker_path: Id
