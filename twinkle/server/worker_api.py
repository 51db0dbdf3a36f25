"""The interface the gateway (its service and its routes) uses to talk to a model worker: every call it makes
on a worker is a method here.

Implemented by :class:`twinkle.server.worker.ModelWorker` (in process), by the Ray Serve handle adaptor in
:mod:`twinkle.server.app` (whose worker deployment offers the same methods), and by test doubles. mypy checks
the two implementations conform (``_conforms`` in each module). The adapter id on a worker is the run id.
Results may come back as the API models or as their plain-dict form (through Ray); the gateway normalises them.
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

    async def sample_stream_open(self, op: SampleOp, *, adapter_id: str | None = None,
                                 checkpoint_path: str | None = None) -> str:
        """Start a streamed sample request; returns the stream id to poll."""

    async def sample_stream_poll(self, stream_id: str, after: int = 0, timeout: float = 10.0) -> dict[str, Any]:
        """The stream's events after ``after`` (``{"events", "next", "done", "result"}``), waiting up to
        ``timeout`` seconds for some."""

    async def sample_stream_close(self, stream_id: str) -> bool:
        """The reader went away: forget the stream (and drop its request while still queued)."""

    async def tokenize(self, *, text: str | None = None, messages: list[dict[str, Any]] | None = None,
                       add_special_tokens: bool = False, add_generation_prompt: bool = True) -> list[int]:
        """Token ids of ``text``, or of chat ``messages`` with the chat template (OpenAI-compatible routes)."""

    async def tokenizer_info(self) -> dict[str, Any]:
        """The tokenizer's special tokens, chat template and context length (``GET /tokenizer_info``)."""

    async def token_texts(self, ids: list[int], singles: list[int]) -> tuple[list[str], list[str]]:
        """The text each token of ``ids`` adds in sequence, and each token of ``singles`` alone (OpenAI echo)."""

    async def has_adapter(self, adapter_id: str) -> bool:
        """Whether this worker holds ``adapter_id`` (false after a replica restart)."""

    async def status(self) -> dict[str, Any]:
        """Queue depth, batch statistics, adapters held."""

    async def model_info(self) -> ModelInfo | dict[str, Any]:
        """The base model's vocabulary size, context, tokenizer."""

    async def telemetry_exposition(self) -> str | None:
        """The replica's Prometheus exposition (None: telemetry is off)."""
