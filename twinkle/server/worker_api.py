"""The interface the gateway's service uses to talk to a model worker.

Implemented by :class:`twinkle.server.worker.ModelWorker` (in process), by the Ray Serve handle adaptor in
:mod:`twinkle.server.app`, and by test doubles. The adapter id on a worker is the run id. Results may come
back as the API models or as their plain-dict form (through Ray); the service normalises them.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from twinkle.types import LoraConfig, ModelInfo, SampleResponse

from .ops import Op, SampleOp

__all__ = ["WorkerAPI"]


@runtime_checkable
class WorkerAPI(Protocol):
    async def create_adapter(self, adapter_id: str, lora: LoraConfig, *, next_seq_id: int | None = None) -> None:
        """Add a fresh adapter (idempotent for the same config)."""

    async def remove_adapter(self, adapter_id: str) -> None:
        """Unload an adapter (idempotent); its queued requests fail."""

    async def execute(self, adapter_id: str, op: Op, *, seq_id: int | None = None, path: str | None = None) -> Any:
        """Run a training op in seq_id order; a repeated seq_id answers from its first execution."""

    async def skip(self, adapter_id: str, seq_id: int) -> None:
        """``seq_id`` was consumed upstream: later ops must not wait for it."""

    async def sample(self, op: SampleOp, *, adapter_id: str | None = None,
                     checkpoint_path: str | None = None) -> SampleResponse | dict[str, Any]:
        """Sample with a run's live adapter, a saved adapter or the base model."""

    async def has_adapter(self, adapter_id: str) -> bool:
        """Whether this worker holds ``adapter_id`` (false after a replica restart)."""

    async def status(self) -> dict[str, Any]:
        """Queue depth, batch statistics, adapters held."""

    async def model_info(self) -> ModelInfo | dict[str, Any]:
        """The base model's vocabulary size, context, tokenizer."""
