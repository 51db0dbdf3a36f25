"""Request and response models of the native HTTP API (``/api/v1/twinkle/...``).

The server's FastAPI routes and ``twinkle_client`` both use these classes, so the OpenAPI schema is the
documentation. The route table lives in ``docs/native-api.md``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .data import Datum, ModelInput
from .outputs import VisionInfo
from .params import (
    MAX_NUM_SAMPLES,
    ExactAdamParams,
    ExactLoraConfig,
    ExactLRSchedulerConfig,
    ExactOptimizerConfig,
    ExactSamplingParams,
    LoraConfig,
    SamplingParams,
    TopKLogprobs,
    TtlSeconds,
)


class _Api(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EmptyRequest(BaseModel):
    """The (optional) body of a route that takes no parameters: any object is accepted and ignored."""

    model_config = ConfigDict(extra="ignore")


class _Reply(BaseModel):
    model_config = ConfigDict(extra="ignore")


# ---- capabilities / status ---------------------------------------------------------------------------------


class BaseModelInfo(_Reply):
    name: str
    backend: str
    vocab_size: int | None = None
    max_length: int | None = None
    max_lora_rank: int
    max_adapters: int
    max_tokens_per_request: int
    tokenizer_id: str | None = None
    replicas: int = 1
    vision: VisionInfo | None = None  # set when the model accepts images (docs/multimodal.md)


class LossInfo(_Reply):
    """A loss of the registry (``twinkle.loss``): its inputs and config keys (default and range)."""

    name: str
    required_inputs: list[str]
    optional_inputs: list[str] = Field(default_factory=list)
    config: list[dict[str, Any]] = Field(default_factory=list, description="[{name, default, ge?, gt?, le?, doc?}]")
    paired: bool = False
    doc: str = ""


class Capabilities(_Reply):
    version: str
    base_models: list[BaseModelInfo]
    losses: list[LossInfo] = Field(default_factory=list, description="the losses forward_backward accepts")


class WorkerStatus(_Reply):
    base_model: str
    replica: int
    adapters: int
    queue_depth: int = 0
    batches_run: int = 0
    last_batch: dict[str, Any] | None = Field(None, description="{adapters: [...], rows, tokens, mixed: bool}")
    mixed_batches: int = Field(0, description="batches that held rows of more than one adapter")
    max_adapters_in_batch: int = 0
    recent_batches: list[dict[str, Any]] = Field(default_factory=list, description="the last batches, oldest first")


class ServerStatus(_Reply):
    version: str
    uptime_s: float
    sessions_active: int
    runs_active: int
    workers: list[WorkerStatus]


# ---- sessions ------------------------------------------------------------------------------------------------


class CreateSessionRequest(_Api):
    metadata: dict[str, Any] = Field(default_factory=dict)
    tags: list[str] = Field(default_factory=list)
    lease_seconds: float | None = Field(None, gt=0)


class SessionInfo(_Reply):
    session_id: str
    user: str
    client: Literal["twinkle", "tinker"] = "twinkle"
    state: Literal["active", "expired", "closed"]
    created_at: float
    last_heartbeat: float
    lease_seconds: float
    metadata: dict[str, Any] = Field(default_factory=dict)
    run_ids: list[str] = Field(default_factory=list)
    stop_requested_at: float | None = Field(
        None, description="when someone asked this session's training loop to stop (panel Stop, `%twinkle stop`); "
        "cleared by the client once its loop stopped")


class SessionList(_Reply):
    sessions: list[SessionInfo]


# ---- runs (one LoRA adapter each) ------------------------------------------------------------------------------


class CreateRunRequest(_Api):
    session_id: str
    base_model: str
    lora: ExactLoraConfig = Field(default_factory=LoraConfig)
    name: str | None = Field(None, description="display name; the server picks the run id")
    metadata: dict[str, Any] = Field(default_factory=dict)


class RunInfo(_Reply):
    run_id: str
    session_id: str
    user: str
    base_model: str
    lora: LoraConfig
    name: str | None = None
    state: Literal["active", "unloaded", "lost", "deleted"]
    step: int = 0
    created_at: float
    last_request_time: float | None = None
    last_metrics: dict[str, float] = Field(default_factory=dict)
    last_checkpoint: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    last_seq_id: int | None = Field(
        None, description="the highest seq_id the server consumed for this run (executed, queued or refused); "
        "a client re-attaching without its own record continues at last_seq_id + 1")


class RunList(_Reply):
    runs: list[RunInfo]
    total: int | None = None


class MetricPoint(_Reply):
    step: int
    time: float
    kind: str = Field(description="forward_backward | optim_step | sample ...")
    metrics: dict[str, float]


class MetricHistory(_Reply):
    run_id: str
    points: list[MetricPoint]


class SetOptimizerRequest(_Api):
    optimizer: ExactOptimizerConfig


class SetLRSchedulerRequest(_Api):
    scheduler: ExactLRSchedulerConfig


class ForwardRequest(_Api):
    seq_id: int | None = Field(None, description="per-run order; a repeated seq_id is answered from the first execution")
    data: list[Datum]
    loss_fn: str = "cross_entropy"
    loss_fn_config: dict[str, Any] | None = Field(
        None, description="numbers (or numbers as text) checked by the loss registry: see capabilities.losses")


class OptimStepRequest(_Api):
    seq_id: int | None = None
    adam_params: ExactAdamParams | None = Field(None, description="absent: the run's optimizer + LR schedule")


class SaveCheckpointRequest(_Api):
    seq_id: int | None = None
    name: str
    kind: Literal["training", "sampler"] = "training"
    ttl_seconds: TtlSeconds | None = None
    overwrite: bool = False


class LoadCheckpointRequest(_Api):
    seq_id: int | None = None
    checkpoint: str = Field(description="a tinker:// path or a checkpoint name of this run")
    optimizer: bool = True


class ResumeRunRequest(_Api):
    session_id: str
    checkpoint: str = Field(description="tinker://<run>/weights/<name>")
    optimizer: bool = True


class CheckpointInfo(_Reply):
    checkpoint_id: str = Field(description="'weights/<name>' or 'sampler_weights/<name>'")
    run_id: str
    name: str
    kind: Literal["training", "sampler", "external"]
    path: str = Field(description="tinker://<run>/<weights|sampler_weights|external_weights>/<name>")
    created_at: float
    step: int = 0
    size_bytes: int | None = None
    expires_at: float | None = None
    public: bool = False


class CheckpointList(_Reply):
    checkpoints: list[CheckpointInfo]


# ---- sampling ------------------------------------------------------------------------------------------------


class SampleRequest(_Api):
    base_model: str | None = None
    run_id: str | None = Field(None, description="sample from the run's current adapter weights")
    checkpoint: str | None = Field(None, description="tinker:// path of a saved adapter")
    prompt: ModelInput
    num_samples: int = Field(1, ge=1, le=MAX_NUM_SAMPLES)
    sampling_params: ExactSamplingParams = Field(default_factory=SamplingParams)
    prompt_logprobs: bool = False
    topk_prompt_logprobs: TopKLogprobs = 0
    session_id: str | None = Field(None, description="the caller's session: a pending Stop of it rides on the reply "
                                   "(stop_requested), so a loop that only samples stops too")


class SampleStreamRequest(SampleRequest):
    """``sample/stream``: a ``SampleRequest`` that may also ask for the most likely tokens at each sampled
    position, sent with each ``token`` event (``top``: ``[token, text, logprob]``, likeliest first)."""

    topk_logprobs: TopKLogprobs = Field(0, description="the k most likely tokens at each sampled position "
                                        "(needs the continuous sampler: the transformers backend)")


# ---- futures -------------------------------------------------------------------------------------------------


class FutureRef(_Reply):
    future_id: str
    run_id: str | None = None
    state: FutureState | None = Field(
        None, description="the finished state, when the request asked to wait (?wait=S) and it finished in time")
    stop_requested: bool = Field(
        False, description="the run's session has a pending stop request: the client ends its loop at the next "
        "step boundary and clears it (DELETE sessions/{id}/stop)")


class StepTiming(_Reply):
    """Where a finished request's time went on the server (seconds)."""

    queue_s: float | None = Field(None, description="waited in the worker's queue before its batch/barrier started")
    exec_s: float | None = Field(None, description="the batch, barrier or sampling pass that served it")
    server_s: float = Field(description="the gateway's submit -> result (includes queue_s, exec_s, ordering "
                            "behind the run's earlier requests and transport to the worker)")


class FutureState(_Reply):
    future_id: str
    status: Literal["pending", "complete", "failed"]
    type: str | None = Field(None, description="forward_backward | optim_step | save | load | sample | create_run ...")
    result: Any = None
    error: dict[str, Any] | None = None
    timing: StepTiming | None = Field(None, description="set when the request completed in this gateway process")


FutureRef.model_rebuild()
