"""The one contract every training backend (transformers, megatron, mock) implements.

A backend holds ONE base model and MANY LoRA adapters, each with its own optimizer state, gradient
accumulator, LR schedule and step counter. It is synchronous and single-threaded: the server's scheduler
(``twinkle.server.scheduler``) calls it from one worker thread, and the local API (``twinkle.model.local``)
calls it directly. Nothing here imports torch, so the mock backend works where torch is absent.

Semantics shared by all backends (tests in ``tests/model/test_contract.py`` run against each):

* ``run_batch`` executes ONE pass over rows that may belong to different adapters. Items with
  ``forward_only=False`` add their loss gradients to their adapter's accumulator; nothing is applied until
  ``optim_step``. Results come back one ``ForwardBackwardOutput`` per item, in order, each holding one
  ``{"logprobs": TensorData}`` (plus loss-specific extras) per datum and metrics ``{"loss:sum": ...}``.
* Losses are token-wise and sum-reduced (see ``twinkle.loss``).
* ``optim_step`` applies the accumulated gradients of one adapter with AdamW, then zeroes them. With
  ``params`` given they override the adapter's optimizer hyper-parameters for this step (Tinker passes them
  every step); otherwise the configured ``OptimizerConfig`` and LR schedule apply.
* Every bad input raises ``twinkle.types.InvalidInputError`` (or ``NotFoundError`` for an unknown adapter)
  naming the field, before any state changes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twinkle.types import (
    AdamParams,
    Datum,
    ForwardBackwardOutput,
    LoraConfig,
    LRSchedulerConfig,
    ModelInfo,
    OptimizerConfig,
    SampleResponse,
    SamplingParams,
)

# Files inside a checkpoint directory (all backends write the same layout):
#   adapter_config.json, adapter_model.safetensors   -- peft format (PeftModel.from_pretrained loads it)
#   training_state.pt | training_state.npz           -- optimizer, step, scheduler, RNG (only with optimizer=True)
#   twinkle_checkpoint.json                          -- {"base_model", "lora": LoraConfig, "step", "backend"}
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
CHECKPOINT_META = "twinkle_checkpoint.json"


@dataclass
class BatchItem:
    """A forward or forward_backward request of one adapter (``adapter=None``: the base model, forward only)."""

    adapter: str | None
    data: list[Datum]
    loss_fn: str = "cross_entropy"
    loss_fn_config: dict[str, Any] | None = None
    forward_only: bool = False

    @property
    def num_tokens(self) -> int:
        return sum(d.model_input.length for d in self.data)


@dataclass
class SampleItem:
    """A sampling request: ``num_samples`` continuations of one prompt with one adapter (None = base)."""

    adapter: str | None
    prompt: list[int]
    num_samples: int = 1
    params: SamplingParams = field(default_factory=SamplingParams)
    prompt_logprobs: bool = False
    topk_prompt_logprobs: int = 0
    images: list[Any] | None = None  # ImageChunks of the prompt, in order; ``prompt`` holds their placeholder runs
    scope: str = ""  # who may share prompt caches with this request (the gateway sets the user's name)
    topk_logprobs: int = 0  # the k most likely tokens at each sampled position, to the stream listener only


class Backend(ABC):
    """Base model + many adapters. See the module docstring for the shared semantics."""

    name: str = "abstract"

    # -- model ---------------------------------------------------------------------------------------------
    @abstractmethod
    def model_info(self) -> ModelInfo: ...

    # -- adapters -----------------------------------------------------------------------------------------
    @abstractmethod
    def add_adapter(self, adapter: str, config: LoraConfig) -> None:
        """Create a fresh LoRA adapter (B = 0, so it starts equal to the base model). Seeded by config.seed."""

    @abstractmethod
    def remove_adapter(self, adapter: str) -> None: ...

    @abstractmethod
    def list_adapters(self) -> list[str]: ...

    @abstractmethod
    def adapter_config(self, adapter: str) -> LoraConfig: ...

    @abstractmethod
    def set_optimizer(self, adapter: str, config: OptimizerConfig) -> None: ...

    @abstractmethod
    def set_lr_scheduler(self, adapter: str, config: LRSchedulerConfig) -> None: ...

    @abstractmethod
    def step_count(self, adapter: str) -> int:
        """Number of optimizer steps applied to ``adapter``."""

    # -- compute -------------------------------------------------------------------------------------------
    @abstractmethod
    def run_batch(self, items: list[BatchItem]) -> list[ForwardBackwardOutput]: ...

    @abstractmethod
    def optim_step(self, adapter: str, params: AdamParams | None = None) -> dict[str, float]:
        """Apply and zero the accumulated gradients. Returns metrics such as ``grad_norm:mean``, ``lr:mean``."""

    @abstractmethod
    def sample(self, items: list[SampleItem]) -> list[SampleResponse]: ...

    # -- checkpoints ---------------------------------------------------------------------------------------
    @abstractmethod
    def save(self, adapter: str, path: Path, *, optimizer: bool = True) -> None:
        """Write the adapter (peft format) and, with ``optimizer``, the full training state, into ``path``."""

    @abstractmethod
    def load(self, adapter: str, path: Path, *, optimizer: bool = True) -> LoraConfig:
        """Load a checkpoint into ``adapter`` (created if absent). Returns the adapter's LoRA config."""

    # -- optional ------------------------------------------------------------------------------------------
    def tokenizer(self) -> Any:
        """A HF tokenizer (or compatible object with encode/decode/apply_chat_template), if the backend has one."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook, default does nothing
        """Release memory (GPU, threads)."""
