"""The model worker: one base model, many LoRA adapters, a scheduler in front of the backend.

A plain class. The Ray Serve application wraps it as one deployment per (base model, replica) with
``num_replicas=1`` so an adapter's state lives on exactly one replica; unit tests use it in-process. The
deployment must allow many concurrent calls (``max_ongoing_requests`` well above the number of clients),
otherwise Ray Serve queues requests in front of the worker and nothing is ever batched.

Model config keys read here (the server's config schema validates them and holds every default; unknown keys
are ignored here): ``backend``, ``model_id``, ``max_adapters``, ``max_lora_rank``, ``max_tokens_per_request``,
and the :class:`~twinkle.server.scheduler.SchedulerConfig` fields (flat, or in a ``scheduler:`` / ``sampler:``
section): ``batch_token_budget``, ``seq_grace_s``, ``max_pending_per_adapter``, ``max_queue``, ...
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from twinkle.model.base import ADAPTER_CONFIG, ADAPTER_WEIGHTS, CHECKPOINT_META, Backend
from twinkle.types import (
    Datum,
    EncodedTextChunk,
    InvalidInputError,
    LimitExceededError,
    LoraConfig,
    ModelInfo,
    NotFoundError,
    SampleResponse,
    TwinkleError,
    UnsupportedError,
)

from .config import model_default
from .ops import (
    ForwardBackwardOp,
    LoadOp,
    Op,
    OptimStepOp,
    SampleOp,
    SaveOp,
    SetOptimizerOp,
    SetSchedulerOp,
    op_kind,
)
from .scheduler import RANKED_NEEDS_ENGINE, Scheduler, SchedulerConfig, new_backend_executor
from .worker_api import WorkerAPI

_SAMPLER_PREFIX = "__sampler__"
_OPS = (ForwardBackwardOp, OptimStepOp, SetOptimizerOp, SetSchedulerOp, SaveOp, LoadOp)


class ModelWorker:
    """Hosts one base model. All methods are coroutines running on the caller's event loop."""

    def __init__(self, model_config: dict[str, Any], replica_index: int = 0, *,
                 backend: Backend | None = None) -> None:
        """``backend`` given (tests): use it instead of building one from ``model_config``."""
        if not isinstance(model_config, dict):
            raise InvalidInputError("model_config must be a mapping", field="model_config")
        self.config = dict(model_config)
        self.replica_index = replica_index
        self.max_adapters = _positive_int(self.config, "max_adapters", model_default("max_adapters"))
        self.max_lora_rank = _positive_int(self.config, "max_lora_rank", model_default("max_lora_rank"))
        self.max_tokens_per_request = _positive_int(self.config, "max_tokens_per_request",
                                                    model_default("max_tokens_per_request"))
        sched_config = SchedulerConfig.from_dict(self.config)
        self._started_at = time.time()
        executor = new_backend_executor()
        if backend is None:
            from .backends import build_backend

            # Built on the backend thread, so every torch call of this backend happens on the same thread.
            backend = executor.submit(build_backend, self.config).result()
        self.backend: Backend = backend
        self._scheduler = Scheduler(backend, sched_config, executor=executor, own_executor=True)
        self._info: ModelInfo = self._scheduler.call_blocking(backend.model_info)
        self._adapters: dict[str, LoraConfig | None] = {}  # None: being created by a load
        self.base_model = str(self.config.get("name") or self.config.get("model_id") or self._info.model_name)
        self._metrics: Any = None
        if self.config.get("telemetry"):  # telemetry on: prometheus_client is imported only then
            from .telemetry.setup import worker_observer

            self._metrics = worker_observer(self.config["telemetry"], self.base_model, replica_index,
                                            queue_depth=lambda: float(self._scheduler.queue_depth()),
                                            adapters=lambda: float(len(self._adapters)))
            self._scheduler.observer = self._metrics

    # ---- model -----------------------------------------------------------------------------------------------
    async def model_info(self) -> ModelInfo:
        return self._info

    # ---- adapters --------------------------------------------------------------------------------------------
    async def create_adapter(self, adapter_id: str, lora: LoraConfig, *, next_seq_id: int | None = None) -> None:
        """Add a fresh adapter. Idempotent for the same config. ``next_seq_id``: where the client's seq_id
        counter continues (a run restored onto a new replica); by default the first seq_id seen starts it."""
        _check_adapter_id(adapter_id)
        if isinstance(lora, dict):
            lora = LoraConfig.model_validate(lora)
        if not isinstance(lora, LoraConfig):
            raise InvalidInputError("lora must be a LoraConfig", field="lora")
        existing = self._adapters.get(adapter_id, ...)
        if existing is not ...:
            if existing is not None and existing.model_dump() == lora.model_dump():
                return
            raise InvalidInputError(f"adapter {adapter_id!r} already exists with another config", field="model_id")
        self._check_rank(lora.rank)
        self._check_slots()
        self._adapters[adapter_id] = lora
        try:
            await self._scheduler.call(self.backend.add_adapter, adapter_id, lora)
        except BaseException:
            self._adapters.pop(adapter_id, None)
            raise
        if next_seq_id is not None:
            self._scheduler.reset_sequence(adapter_id, next_seq_id)

    async def remove_adapter(self, adapter_id: str) -> None:
        """Unload an adapter (idempotent). Its queued requests fail with NotFoundError; a running one finishes."""
        if adapter_id not in self._adapters:
            return
        del self._adapters[adapter_id]
        self._scheduler.drop_adapter(adapter_id)

        def _remove() -> None:
            if adapter_id in self.backend.list_adapters():
                self.backend.remove_adapter(adapter_id)

        await self._scheduler.call(_remove)

    async def has_adapter(self, adapter_id: str) -> bool:
        return self._adapters.get(adapter_id, ...) is not ...

    async def list_adapters(self) -> list[str]:
        return list(self._adapters)

    # ---- training ops ----------------------------------------------------------------------------------------
    async def execute(self, adapter_id: str, op: Op, *, seq_id: int | None = None, path: str | None = None) -> Any:
        """Run a training op on ``adapter_id`` in seq_id order (see ``twinkle.server.scheduler``).

        ``path``: the absolute checkpoint directory of a SaveOp/LoadOp (chosen by the gateway). A LoadOp on an
        adapter this worker does not hold creates it from the checkpoint.
        """
        sched = self._scheduler
        if seq_id is not None and (isinstance(seq_id, bool) or not isinstance(seq_id, int) or seq_id < 0):
            raise InvalidInputError("seq_id must be a non-negative integer", field="seq_id")
        earlier = sched.known(adapter_id, seq_id, op_kind(op))
        if earlier is not None:
            return await asyncio.shield(earlier)
        creating = False
        try:
            tokens = self._validate_op(adapter_id, op, path)
            if isinstance(op, LoadOp) and adapter_id not in self._adapters:
                _check_adapter_id(adapter_id)
                self._check_slots()
                creating = True
        except TwinkleError:
            sched.skip_seq(adapter_id, seq_id)
            raise
        fut = sched.submit(adapter_id, op, seq_id=seq_id, path=path, tokens=tokens)
        if isinstance(op, LoadOp):
            if creating:
                self._adapters[adapter_id] = None
            fut.add_done_callback(lambda f: self._after_load(adapter_id, f, creating))
        return await asyncio.shield(fut)

    async def skip(self, adapter_id: str, seq_id: int) -> None:
        """Tell the worker that ``seq_id`` of ``adapter_id`` was consumed upstream (the gateway refused or
        answered that request itself), so later requests do not wait the grace period for it."""
        self._scheduler.skip_seq(adapter_id, seq_id)

    def _after_load(self, adapter_id: str, fut: asyncio.Future, created: bool) -> None:
        if fut.cancelled() or fut.exception() is not None:
            if created and self._adapters.get(adapter_id, ...) is None:
                self._adapters.pop(adapter_id, None)

                def _cleanup() -> None:
                    if adapter_id in self.backend.list_adapters():
                        self.backend.remove_adapter(adapter_id)

                self._scheduler._executor.submit(_cleanup)
            return
        lora = (fut.result() or {}).get("lora")
        if adapter_id in self._adapters and lora is not None:
            self._adapters[adapter_id] = LoraConfig.model_validate(lora)

    # ---- sampling --------------------------------------------------------------------------------------------
    async def sample(self, op: SampleOp, *, adapter_id: str | None = None,
                     checkpoint_path: str | None = None) -> SampleResponse:
        """Sample with a run's live adapter, a saved adapter (cached read-only, LRU) or the base model."""
        fut = self._submit_sample(op, adapter_id, checkpoint_path)
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:  # the caller gave up (its session ended): drop the work if still queued
            self._scheduler.cancel_sample(fut)
            raise

    def _submit_sample(self, op: SampleOp, adapter_id: str | None, checkpoint_path: str | None,
                       on_tokens: Any = None) -> asyncio.Future:
        if not isinstance(op, SampleOp):
            raise InvalidInputError("expected a sample operation", field="type")
        if adapter_id is not None and checkpoint_path is not None:
            raise InvalidInputError("give either a run or a checkpoint to sample from, not both", field="checkpoint")
        self._validate_prompt(op)
        if getattr(op, "topk_logprobs", 0) and getattr(self.backend, "sampler_engine", None) is None:
            raise UnsupportedError(RANKED_NEEDS_ENGINE, field="topk_logprobs")  # (megatron: refused when planned)
        cache_key = None
        if adapter_id is not None:
            if self._adapters.get(adapter_id, ...) is ...:
                raise NotFoundError(f"adapter {adapter_id!r} is not loaded on this worker", field="model_id")
        elif checkpoint_path is not None:
            cache_key = self._checkpoint_key(checkpoint_path)
        return self._scheduler.submit_sample(op, adapter=adapter_id, checkpoint=checkpoint_path, cache_key=cache_key,
                                             on_tokens=on_tokens)

    # ---- streaming and text (see twinkle.server.sample_stream; used by the SSE and OpenAI routes) -----------
    def _hub(self) -> Any:
        hub = getattr(self, "_streams", None)
        if hub is None:
            from .sample_stream import StreamHub

            hub = self._streams = StreamHub(self._decoder())
        return hub

    def _tokenizer(self) -> Any:
        """The model's tokenizer, or None (a backend without one)."""
        return self.backend.tokenizer() if hasattr(self.backend, "tokenizer") else None

    def _decoder(self) -> Any:
        """Token ids -> text with the model's tokenizer (special tokens left out), or None without one."""
        tok = self._tokenizer()
        return (lambda ids: str(tok.decode(ids, skip_special_tokens=True))) if tok is not None else None

    async def sample_stream_open(self, op: SampleOp, *, adapter_id: str | None = None,
                                 checkpoint_path: str | None = None) -> str:
        """Start a streamed sample request; read it with :meth:`sample_stream_poll`."""
        sid, on_tokens, on_done = self._hub().open()
        fut = self._submit_sample(op, adapter_id, checkpoint_path, on_tokens)
        fut.add_done_callback(on_done)
        self._hub().attach(sid, fut)
        return sid

    async def sample_stream_close(self, stream_id: str) -> bool:
        """The reader went away: forget the stream and drop its request (queued, or decoding in the continuous
        sampler: ``Scheduler.cancel_sample``). True when work was dropped."""
        fut = self._hub().close(stream_id)
        return fut is not None and self._scheduler.cancel_sample(fut)

    async def sample_stream_poll(self, stream_id: str, after: int = 0, timeout: float = 10.0) -> dict[str, Any]:
        return await self._hub().poll(stream_id, after, timeout)

    async def tokenize(self, *, text: str | None = None, messages: list[dict[str, Any]] | None = None,
                       add_special_tokens: bool = False, add_generation_prompt: bool = True) -> list[int]:
        """Token ids of ``text``, or of chat ``messages`` with the tokenizer's chat template (generation
        prompt added)."""
        from .openai_text import tokenize

        return tokenize(self._tokenizer(), text=text, messages=messages, add_special_tokens=add_special_tokens,
                        add_generation_prompt=add_generation_prompt)

    async def tokenizer_info(self) -> dict[str, Any]:
        """The tokenizer's special tokens, chat template and context length (``GET /tokenizer_info``)."""
        from .openai_text import tokenizer_info

        return tokenizer_info(self._tokenizer(), self._info.max_length)

    async def token_texts(self, ids: list[int], singles: list[int]) -> tuple[list[str], list[str]]:
        """The text each token of ``ids`` adds in sequence (they add up to the decoded ``ids``), and the text of
        each token of ``singles`` on its own (OpenAI ``echo``: the prompt's tokens and the alternatives)."""
        from .openai_text import token_texts

        return token_texts(self._decoder(), ids, singles)

    # ---- status ----------------------------------------------------------------------------------------------
    async def status(self) -> dict[str, Any]:
        s = self._scheduler
        return {
            "base_model": self.base_model,
            "replica": self.replica_index,
            "backend": self._info.backend,
            "adapters": len(self._adapters),
            "adapter_ids": list(self._adapters),
            "max_adapters": self.max_adapters,
            "queue_depth": s.queue_depth(),
            "batches_run": s.stats["batches_run"],
            "last_batch": dict(s.last_batch) if s.last_batch else None,
            "recent_batches": [dict(b) for b in s.recent_batches],
            "uptime_s": time.time() - self._started_at,
            **{k: v for k, v in s.stats.items() if k != "batches_run"},
        }

    async def telemetry_exposition(self) -> str | None:
        """This replica's Prometheus exposition (None: telemetry is off)."""
        return self._metrics.metrics.exposition() if self._metrics is not None else None

    async def close(self) -> None:
        await self._scheduler.close()
        try:
            self.backend.close()
        except Exception:  # noqa: BLE001 - best effort at shutdown
            pass

    # ---- validation (cheap, before queuing) --------------------------------------------------------------------
    def _validate_op(self, adapter_id: str, op: Op, path: str | None) -> int:
        if not isinstance(op, _OPS):
            raise InvalidInputError(f"unknown operation {type(op).__name__}", field="type")
        if not isinstance(op, LoadOp) and self._adapters.get(adapter_id, ...) is ...:
            raise NotFoundError(f"adapter {adapter_id!r} is not loaded on this worker", field="model_id")
        if isinstance(op, ForwardBackwardOp):
            return self._validate_data(op.data)
        if isinstance(op, (SaveOp, LoadOp)):
            if not path or not os.path.isabs(path):
                raise InvalidInputError("the worker needs an absolute checkpoint directory", field="path")
            if isinstance(op, SaveOp) and op.kind not in ("training", "sampler", "external"):
                raise InvalidInputError("kind must be 'training', 'sampler' or 'external'", field="kind")
            if isinstance(op, LoadOp):
                rank = _checkpoint_rank(Path(path))
                if rank is not None:
                    self._check_rank(rank)
        return 0

    def _validate_data(self, data: list[Datum]) -> int:
        if not isinstance(data, list) or not data:
            raise InvalidInputError("data must be a non-empty list of datums", field="data")
        vocab = self._info.vocab_size
        total = 0
        for i, d in enumerate(data):
            if not isinstance(d, Datum):
                raise InvalidInputError(f"data[{i}] is not a Datum", field=f"data[{i}]")
            n = d.model_input.length
            if n < 1:
                raise InvalidInputError(f"data[{i}] has an empty model_input", field=f"data[{i}].model_input")
            if n > self._info.max_length:
                raise LimitExceededError(
                    f"data[{i}] has {n} tokens; the model's context is {self._info.max_length}",
                    field=f"data[{i}].model_input",
                )
            for c in d.model_input.chunks:
                if isinstance(c, EncodedTextChunk) and c.tokens and (min(c.tokens) < 0 or max(c.tokens) >= vocab):
                    raise InvalidInputError(
                        f"data[{i}] has a token id outside the vocabulary [0, {vocab})",
                        field=f"data[{i}].model_input",
                    )
            target = d.loss_fn_inputs.get("target_tokens")
            if target is not None and target.dtype == "int64" and len(target.data):
                t = np.asarray(target.data)
                if int(t.min()) < 0 or int(t.max()) >= vocab:
                    raise InvalidInputError(
                        f"data[{i}] has a target token id outside the vocabulary [0, {vocab})",
                        field=f"data[{i}].loss_fn_inputs.target_tokens",
                    )
            total += n
        if total > self.max_tokens_per_request:
            raise LimitExceededError(
                f"the request has {total} tokens; this server allows {self.max_tokens_per_request} per request",
                field="data",
            )
        return total

    def _validate_prompt(self, op: SampleOp) -> None:
        prompt = op.prompt
        if not isinstance(prompt, list) or not prompt:
            raise InvalidInputError("prompt must be a non-empty list of token ids", field="prompt")
        vocab = self._info.vocab_size
        if any(not isinstance(t, int) or t < 0 or t >= vocab for t in prompt):
            raise InvalidInputError(f"prompt has a token id outside the vocabulary [0, {vocab})", field="prompt")
        if not isinstance(op.num_samples, int) or op.num_samples < 1:
            raise InvalidInputError("num_samples must be at least 1", field="num_samples")
        max_new = op.params.max_tokens or 0
        if len(prompt) + max_new > self._info.max_length:  # named: the prompt when it alone leaves no room
            raise LimitExceededError(
                f"prompt ({len(prompt)}) + max_tokens ({max_new}) exceeds the context of {self._info.max_length}",
                field="prompt" if len(prompt) >= self._info.max_length else "sampling_params.max_tokens",
            )
        if len(prompt) * op.num_samples > self.max_tokens_per_request:
            raise LimitExceededError("the sampling request has too many tokens", field="num_samples")

    def _checkpoint_key(self, checkpoint_path: str) -> tuple[str, int]:
        path = Path(checkpoint_path)
        if not path.is_absolute():
            raise InvalidInputError("the worker needs an absolute checkpoint directory", field="checkpoint")
        weights = path / ADAPTER_WEIGHTS
        try:
            stamp = weights.stat().st_mtime_ns
        except OSError:
            raise NotFoundError("checkpoint not found", field="checkpoint") from None
        rank = _checkpoint_rank(path)
        if rank is not None:
            self._check_rank(rank)
        return (str(path.resolve()), stamp)

    def _check_rank(self, rank: int) -> None:
        if rank > self.max_lora_rank:
            raise LimitExceededError(
                f"LoRA rank {rank} exceeds this server's maximum of {self.max_lora_rank}", field="lora.rank"
            )

    def _check_slots(self) -> None:
        if len(self._adapters) >= self.max_adapters:
            raise LimitExceededError(
                f"this model worker already holds {len(self._adapters)} adapters (max {self.max_adapters})",
                field="max_adapters",
            )


# ---- helpers -------------------------------------------------------------------------------------------------


def _conforms(w: ModelWorker) -> WorkerAPI:  # never called: mypy checks the worker implements WorkerAPI
    return w


def _positive_int(config: dict[str, Any], key: str, default: int) -> int:
    value = config.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInputError(f"{key} must be a positive integer", field=key)
    return value


def _check_adapter_id(adapter_id: Any) -> None:
    if not isinstance(adapter_id, str) or not adapter_id or adapter_id.startswith(_SAMPLER_PREFIX):
        raise InvalidInputError("invalid adapter id", field="model_id")


def _checkpoint_rank(path: Path) -> int | None:
    """The LoRA rank recorded in a checkpoint directory (None if not found); NotFoundError if no checkpoint."""
    if not path.is_dir():
        raise NotFoundError("checkpoint not found", field="checkpoint")
    for name, keys in ((CHECKPOINT_META, ("lora", "rank")), (ADAPTER_CONFIG, ("r",))):
        f = path / name
        if not f.is_file():
            continue
        try:
            value: Any = json.loads(f.read_text())
            for k in keys:
                value = value[k]
            return int(value)
        except (ValueError, KeyError, TypeError, OSError):
            continue
    return None
