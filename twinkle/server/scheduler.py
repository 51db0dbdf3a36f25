"""The request scheduler inside a model worker.

One scheduler drives one ``Backend``. It lives on an asyncio loop (the Ray Serve replica's loop, or a test's
``asyncio.run``) and runs every training call and barrier in ONE dedicated thread, so torch never blocks the
loop. Sampling runs there too, unless the backend opts in to concurrent sampling (``backend.concurrent_sampling()``,
config ``concurrent_sampling``): then the continuous sampler runs on a second thread of its own, beside
training (see ``_dispatch_samples`` and docs/scheduler.md).

Rules:

* **Order.** Per adapter, requests run in ``seq_id`` order. The sequence starts at the first seq_id seen
  (when it is ``<= first_seq_id``) or at ``next_seq_id`` given by :meth:`Scheduler.reset_sequence`. A request
  whose seq_id is ahead waits for the missing ones for at most ``seq_grace_s`` (a skipped id may have been
  refused upstream), then the sequence jumps forward. ``seq_id=None`` runs in arrival order. A late request
  (below the sequence, never seen) runs at once.
* **Exactly once.** A repeated ``(adapter, seq_id)`` gets the first execution's future (done or in flight);
  the last ``result_memory`` results per adapter are kept.
* **Barriers.** optim_step, save, load, set_optimizer and set_lr_scheduler wait for their adapter's earlier
  requests and hold back its later ones; other adapters are unaffected.
* **One mixed batch per tick.** Forward/backward requests of all adapters that are ready when the backend
  thread is free go into one ``backend.run_batch`` call (up to ``batch_token_budget`` tokens), picked
  round-robin with the least recently served adapter first. A tick is: the barriers at the head of each
  adapter's queue, the mixed batch, the barriers right after each batched adapter's requests, then one
  ``backend.sample`` call. Each future completes as soon as its own part of the tick is done.
* **Back-pressure.** More than ``max_pending_per_adapter`` / ``max_pending_total`` requests in the worker
  raise :class:`~twinkle.types.CapacityError` (HTTP 429 with Retry-After).
* **Isolation.** A failing mixed batch is re-run item by item so only the faulty request fails; the
  scheduler keeps serving.

Nothing here imports torch: the backend does.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import heapq
import itertools
import logging
import os
import shutil
import sys
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from twinkle.loss import get_loss
from twinkle.model.base import Backend, BatchItem, SampleItem
from twinkle.types import (
    CapacityError,
    InternalError,
    InvalidInputError,
    NotFoundError,
    OptimStepResponse,
    TwinkleError,
    UnsupportedError,
)
from twinkle.types.outputs import attach_timing

from .config import SAMPLER_DEFAULTS as _SAMPLER
from .config import SCHEDULER_DEFAULTS as _SCHED
from .export import encrypt_dir
from .microbatch import merge_outputs, split_item
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

log = logging.getLogger("twinkle.server.scheduler")
# a sample request within this many seconds counts as active sampling: training batches run interleaved
_SAMPLING_RECENT_S = 2.0


# Names the server's config schema uses for the same knobs.
_ALIASES = {"max_queue": "max_pending_total", "max_batch_size": "max_sample_batch"}


def _least(name: str) -> float:
    """The smallest value the config schema allows for a ``SchedulerConfig`` knob (its ``ge``; 0 for a knob the
    schema does not bound from below or does not have)."""
    schema = {v: k for k, v in _ALIASES.items()}.get(name, name)
    for settings in (_SCHED, _SAMPLER):
        info = type(settings).model_fields.get(schema)
        if info is not None:
            return next((m.ge for m in info.metadata if getattr(m, "ge", None) is not None), 0)
    return 0


@dataclass
class SchedulerConfig:
    """Tuning knobs. ``from_dict`` reads them from a model config (flat keys or a ``scheduler:`` section).
    The defaults are the config schema's (``twinkle.server.config.SchedulerSettings``), not written here."""

    batch_token_budget: int = _SCHED.batch_token_budget
    max_batch_items: int = _SCHED.max_batch_items
    seq_grace_s: float = _SCHED.seq_grace_s
    first_seq_id: int = 1
    max_pending_per_adapter: int = _SCHED.max_pending_per_adapter
    max_pending_total: int = _SCHED.max_queue
    result_memory: int = _SCHED.result_memory
    sample_token_budget: int = _SCHED.sample_token_budget
    max_sample_batch: int = _SAMPLER.max_batch_size
    sampler_cache_size: int = _SCHED.sampler_cache_size
    history: int = _SCHED.history
    prefill_chunk: int = _SCHED.prefill_chunk
    prefix_cache_tokens: int = _SCHED.prefix_cache_tokens
    sample_slice_s: float = _SCHED.sample_slice_s
    train_slice_s: float = _SCHED.train_slice_s
    concurrent_sampling: bool = _SCHED.concurrent_sampling
    training_nice: int = _SCHED.training_nice

    @classmethod
    def from_dict(cls, config: dict[str, Any] | None) -> SchedulerConfig:
        config = dict(config or {})
        merged: dict[str, Any] = {}
        for section in ("sampler", "scheduler"):
            sub = config.get(section)
            if isinstance(sub, dict):
                merged.update(sub)
        merged.update(config)
        for alias, name in _ALIASES.items():
            if alias in merged and name not in merged:
                merged[name] = merged[alias]
        out = cls()
        for f in fields(cls):
            if f.name in merged and merged[f.name] is not None:
                value = merged[f.name]
                kind = type(getattr(out, f.name))
                try:
                    value = kind(value)
                except (TypeError, ValueError) as e:
                    raise InvalidInputError(f"{f.name} must be a {kind.__name__}", field=f.name) from e
                least = _least(f.name)
                if value < least:
                    raise InvalidInputError(f"{f.name} must be at least {least}", field=f.name)
                setattr(out, f.name, value)
        return out


# ---- requests ----------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Request:
    adapter: str
    op: Op
    seq: int | None
    future: asyncio.Future
    path: str | None = None
    tokens: int = 0
    arrived: float = field(default_factory=time.monotonic)
    queue: _AdapterQueue | None = None
    finished: bool = False
    started: float | None = None  # monotonic time its batch/barrier started (telemetry)
    ctx: Any = None  # the caller's trace context (telemetry)

    @property
    def is_compute(self) -> bool:
        return isinstance(self.op, ForwardBackwardOp)


@dataclass(eq=False)
class _SampleRequest:
    op: SampleOp
    adapter: str | None
    checkpoint: str | None
    cache_key: tuple[str, int] | None
    future: asyncio.Future
    cost: int = 0
    arrived: float = field(default_factory=time.monotonic)
    finished: bool = False
    name: str | None = None  # the backend adapter it samples with (set when planned)
    started: float | None = None  # monotonic time it reached the sampler (telemetry)
    ctx: Any = None  # the caller's trace context (telemetry)
    on_tokens: Callable[[list[tuple[int, int, float]]], None] | None = None


@dataclass(eq=False)
class _AdapterQueue:
    ready: deque[_Request] = field(default_factory=deque)
    held: list[tuple[int, int, _Request]] = field(default_factory=list)  # heap by (seq, arrival)
    next_seq: int | None = None
    gap_since: float | None = None
    timer: asyncio.TimerHandle | None = None
    memory: OrderedDict[int, asyncio.Future] = field(default_factory=OrderedDict)
    kinds: dict[int, str] = field(default_factory=dict)  # seq_id -> the kind of call it named (see ops.op_kind)
    pending: int = 0  # submitted and not yet completed
    skipped: set[int] = field(default_factory=set)  # seq ids ahead of next_seq consumed upstream



@dataclass(eq=False)
class _Tick:
    pre: list[_Request]
    batch: list[_Request]
    post: list[_Request]
    samples: list[_SampleRequest]
    evict: list[str]
    loads: list[tuple[str, str]]  # (cache adapter name, checkpoint dir)
    sample_names: dict[int, str | None]  # id(sample request) -> backend adapter name


# ---- scheduler ---------------------------------------------------------------------------------------------


class Scheduler:
    """Queues, orders, de-duplicates and batches requests for one backend (see the module docstring)."""

    def __init__(self, backend: Backend, config: SchedulerConfig | None = None, *,
                 executor: ThreadPoolExecutor | None = None, own_executor: bool | None = None) -> None:
        """``executor``: a single-thread executor the backend was built on (owned unless ``own_executor``
        is False); by default the scheduler makes its own."""
        self.backend = backend
        self.config = config or SchedulerConfig()
        self._own_executor = executor is None if own_executor is None else own_executor
        self._executor = executor or new_backend_executor()
        self._queues: dict[str, _AdapterQueue] = {}
        self._order: OrderedDict[str, None] = OrderedDict()  # least recently served first
        self._samples: deque[_SampleRequest] = deque()
        # continuous sampling (see _run_samples): requests handed to the engine and not yet delivered
        self._in_engine: dict[int, _SampleRequest] = {}
        self._sampling: dict[str, int] = {}  # adapter -> requests of it in the engine
        self._kv_used = 0
        self._new_work = False  # set on the loop side when work arrives; read by the decode slice
        self._engine: Any = None
        self._engine_probed = False
        self._streamed: list[tuple[Any, int, int, float, Any]] = []  # backend thread: tokens of this step
        self._last_sample_at = -1e9  # monotonic time of the last sample request (interleaving, see _run_batch)
        self._train_tps: float | None = None  # backend thread: measured training tokens/s (slice sizes)
        self._ckpt_cache: OrderedDict[tuple[str, int], str] = OrderedDict()
        # concurrent sampling (see _dispatch_samples): None until probed on the backend thread
        self._concurrent: bool | None = None
        self._sampler_executor: ThreadPoolExecutor | None = None
        self._swake: asyncio.Event | None = None
        self._new_samples = False  # a sample request arrived, or a barrier ended (the decode slice replans)
        self._barriers_running: dict[str, int] = {}  # adapter -> its planned barriers not yet delivered
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._closed = False
        self._pending_total = 0
        self._counter = itertools.count()
        self.stats: dict[str, Any] = {
            "ticks": 0, "batches_run": 0, "mixed_batches": 0, "rows_run": 0, "tokens_run": 0,
            "barriers_run": 0, "sample_batches": 0, "samples_run": 0, "errors": 0, "dedup_hits": 0,
            "seq_skips": 0, "late_requests": 0, "rejected_capacity": 0, "samples_cancelled": 0, "busy_s": 0.0,
            "max_adapters_in_batch": 0, "micro_batches": 0, "interleaved_batches": 0, "sample_slices_between": 0,
            "concurrent_sampling": False,
        }
        self.last_batch: dict[str, Any] | None = None
        self.recent_batches: deque[dict[str, Any]] = deque(maxlen=self.config.history)
        # telemetry (twinkle.server.telemetry.metrics.WorkerMetrics) or None: then nothing is measured
        self.observer: Any = None

    # ---- thread access -------------------------------------------------------------------------------------
    async def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``fn`` on the backend thread (after whatever is already running there)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))

    def call_blocking(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``fn`` on the backend thread and wait (for use outside the event loop, e.g. in ``__init__``)."""
        return self._executor.submit(fn, *args, **kwargs).result()

    # ---- submission (event-loop side) ----------------------------------------------------------------------
    def submit(self, adapter: str, op: Op, *, seq_id: int | None = None, path: str | None = None,
               tokens: int = 0) -> asyncio.Future:
        """Queue a training op. Returns the future of its result (shared with repeats of the same seq_id)."""
        self._ensure_loop()
        if seq_id is not None and (isinstance(seq_id, bool) or not isinstance(seq_id, int) or seq_id < 0):
            raise InvalidInputError("seq_id must be a non-negative integer", field="seq_id")
        q = self._queues.get(adapter)
        if q is None:
            q = self._queues[adapter] = _AdapterQueue()
        if seq_id is not None:
            known = self.known(adapter, seq_id, op_kind(op))
            if known is not None:
                return known
        self._check_capacity(q)
        fut = self._new_future()
        req = _Request(adapter, op, seq_id, fut, path=path, tokens=tokens, queue=q)
        if self.observer is not None:
            req.ctx = self.observer.capture()
        q.pending += 1
        self._pending_total += 1
        if seq_id is not None:
            q.memory[seq_id] = fut
            q.kinds[seq_id] = op_kind(op)
        self._place(q, req)
        return fut

    def known(self, adapter: str, seq_id: int | None, kind: str | None = None) -> asyncio.Future | None:
        """The future of an earlier request with this ``(adapter, seq_id)``, if it is remembered.
        ``kind`` given: a remembered request of another kind is an ``InvalidInputError`` (a reused seq_id)."""
        if seq_id is None:
            return None
        q = self._queues.get(adapter)
        fut = q.memory.get(seq_id) if q is not None else None
        if fut is not None:
            assert q is not None
            earlier = q.kinds.get(seq_id)
            if kind is not None and earlier is not None and earlier != kind:
                raise InvalidInputError(
                    f"seq_id {seq_id} was already used for a {earlier} call; a new {kind} call needs a new seq_id",
                    field="seq_id",
                )
            self.stats["dedup_hits"] += 1
        return fut

    def skip_seq(self, adapter: str, seq_id: int | None) -> None:
        """Mark ``seq_id`` as consumed without running anything (its request was refused before queuing)."""
        if seq_id is None:
            return
        q = self._queues.setdefault(adapter, _AdapterQueue())
        if q.next_seq is None and seq_id <= self.config.first_seq_id:
            q.next_seq = seq_id
        if q.next_seq is not None and seq_id == q.next_seq:
            q.next_seq += 1
            self._release(q)
        elif (q.next_seq is None or seq_id > q.next_seq) and len(q.skipped) < 4096:
            # ahead of the sequence (earlier requests still on their way): pass over it when it comes up
            q.skipped.add(seq_id)
            self._release(q)

    def reset_sequence(self, adapter: str, next_seq_id: int | None) -> None:
        """Set where ``adapter``'s sequence continues (a restored adapter keeps its client's counter)."""
        q = self._queues.setdefault(adapter, _AdapterQueue())
        q.next_seq = next_seq_id
        q.memory.clear()
        q.kinds.clear()
        if next_seq_id is not None:
            self._release(q)

    def submit_sample(self, op: SampleOp, *, adapter: str | None = None, checkpoint: str | None = None,
                      cache_key: tuple[str, int] | None = None,
                      on_tokens: Callable[[list[tuple[int, int, float]]], None] | None = None) -> asyncio.Future:
        """Queue a sample request. ``on_tokens`` (called on the event loop with ``(sample index, token,
        logprob)`` triples as they are produced) streams it, where the backend has a continuous sampler."""
        self._ensure_loop()
        if self._pending_total >= self.config.max_pending_total:
            self.stats["rejected_capacity"] += 1
            raise CapacityError("the model worker's queue is full; retry shortly", retry_after=self._retry_after())
        fut = self._new_future()
        max_tokens = op.params.max_tokens if op.params.max_tokens is not None else 16
        cost = (len(op.prompt) + max_tokens) * max(1, op.num_samples)
        sreq = _SampleRequest(op, adapter, checkpoint, cache_key, fut, cost=cost, on_tokens=on_tokens)
        if self.observer is not None:
            sreq.ctx = self.observer.capture()
        self._samples.append(sreq)
        self._new_samples = True
        self._last_sample_at = time.monotonic()
        self._pending_total += 1
        self._wake_up()
        return fut

    def cancel_sample(self, fut: asyncio.Future) -> bool:
        """Drop a sampling request (its caller gave up): a queued one at once; one in the continuous sampler
        at its next step (its rows leave the batch and free their KV budget; ``ContinuousSampler.abort``).
        False when it is done, or runs on a backend that samples whole batches (it finishes)."""
        for s in self._samples:
            if s.future is fut and not s.finished:
                self._samples.remove(s)
                s.finished = True
                self._pending_total -= 1
                self.stats["samples_cancelled"] += 1
                if not fut.done():
                    fut.cancel()
                return True
        running = next((s for s in self._in_engine.values() if s.future is fut and not s.finished), None)
        if running is None or self._engine is None:
            return False
        if not fut.done():
            fut.cancel()  # the engine reports it done with no response; the bookkeeping happens then
        self._engine.abort(running)
        return True

    def drop_adapter(self, adapter: str, error: TwinkleError | None = None) -> int:
        """Forget ``adapter``: fail its queued (not yet running) requests. Returns how many were failed."""
        q = self._queues.pop(adapter, None)
        self._order.pop(adapter, None)
        if q is None:
            return 0
        if q.timer is not None:
            q.timer.cancel()
        err = error or NotFoundError(f"adapter {adapter!r} was unloaded", field="model_id")
        dropped = [r for _, _, r in q.held] + list(q.ready)
        for r in dropped:
            r.finished = True
            self._pending_total -= 1
            if not r.future.done():
                r.future.set_exception(err)
        return len(dropped)

    def queue_depth(self) -> int:
        return self._pending_total

    def adapter_queue_depth(self, adapter: str) -> int:
        q = self._queues.get(adapter)
        return q.pending if q else 0

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
        for adapter in list(self._queues):
            self.drop_adapter(adapter, InternalError("the model worker is shutting down"))
        while self._samples:
            s = self._samples.popleft()
            if not s.future.done():
                s.future.set_exception(InternalError("the model worker is shutting down"))
        for s in list(self._in_engine.values()):
            if not s.future.done():
                s.future.set_exception(InternalError("the model worker is shutting down"))
        self._in_engine.clear()
        if self._own_executor:
            self._executor.shutdown(wait=False)
        if self._sampler_executor is not None:
            self._sampler_executor.shutdown(wait=False)

    # ---- ordering ------------------------------------------------------------------------------------------
    def _place(self, q: _AdapterQueue, req: _Request) -> None:
        seq = req.seq
        if seq is None:
            q.ready.append(req)
        elif q.next_seq is None:
            if seq <= self.config.first_seq_id:
                q.next_seq = seq
                self._push_held(q, req)
                self._release(q)
                return
            self._push_held(q, req)
            self._arm_grace(q, req.adapter)
            return
        elif seq < q.next_seq:
            self.stats["late_requests"] += 1
            log.warning("adapter %s: seq_id %d arrived after the sequence moved on to %d; running it now",
                        req.adapter, seq, q.next_seq)
            q.ready.append(req)
        elif seq == q.next_seq:
            q.ready.append(req)
            q.next_seq += 1
            self._release(q)
        else:
            self._push_held(q, req)
            self._arm_grace(q, req.adapter)
            return
        self._mark_ready(req.adapter)

    def _push_held(self, q: _AdapterQueue, req: _Request) -> None:
        heapq.heappush(q.held, (req.seq or 0, next(self._counter), req))

    def _release(self, q: _AdapterQueue) -> None:
        moved = False
        while True:
            if q.skipped and q.next_seq is not None:
                while q.next_seq in q.skipped:
                    q.skipped.discard(q.next_seq)
                    q.next_seq += 1
                if q.skipped and min(q.skipped) < q.next_seq:
                    q.skipped = {x for x in q.skipped if x > q.next_seq}
            if not (q.held and q.next_seq is not None and q.held[0][0] <= q.next_seq):
                break
            seq, _, req = heapq.heappop(q.held)
            q.ready.append(req)
            if seq == q.next_seq:
                q.next_seq += 1
            moved = True
        if moved:
            q.gap_since = None
            self._mark_ready(next(iter(q.ready)).adapter)
        if not q.held and q.timer is not None:
            q.timer.cancel()
            q.timer = None

    def _arm_grace(self, q: _AdapterQueue, adapter: str) -> None:
        if q.gap_since is None:
            q.gap_since = time.monotonic()
        if q.timer is None:
            delay = max(0.0, q.gap_since + self.config.seq_grace_s - time.monotonic())
            assert self._loop is not None
            q.timer = self._loop.call_later(delay, self._grace_expired, adapter)

    def _grace_expired(self, adapter: str) -> None:
        q = self._queues.get(adapter)
        if q is None:
            return
        q.timer = None
        if not q.held:
            q.gap_since = None
            return
        gap_since = q.gap_since or time.monotonic()
        remaining = gap_since + self.config.seq_grace_s - time.monotonic()
        if remaining > 1e-3:
            self._arm_grace(q, adapter)
            return
        lowest = q.held[0][0]
        skipped = lowest - q.next_seq if q.next_seq is not None else 0
        self.stats["seq_skips"] += max(0, skipped)
        log.warning("adapter %s: seq_id(s) %s..%d never arrived within %.1fs; continuing at %d", adapter,
                    q.next_seq, lowest - 1, self.config.seq_grace_s, lowest)
        q.next_seq = lowest
        self._release(q)
        if q.held:  # another gap further on
            q.gap_since = time.monotonic()
            self._arm_grace(q, adapter)

    def _mark_ready(self, adapter: str) -> None:
        if adapter not in self._order:
            self._order[adapter] = None
        self._wake_up()

    # ---- capacity ------------------------------------------------------------------------------------------
    def _check_capacity(self, q: _AdapterQueue) -> None:
        if q.pending >= self.config.max_pending_per_adapter:
            self.stats["rejected_capacity"] += 1
            raise CapacityError(
                f"too many requests queued for this adapter ({q.pending}); retry shortly",
                retry_after=self._retry_after(),
            )
        if self._pending_total >= self.config.max_pending_total:
            self.stats["rejected_capacity"] += 1
            raise CapacityError("the model worker's queue is full; retry shortly", retry_after=self._retry_after())

    def _retry_after(self) -> float:
        ticks = max(1, self.stats["ticks"])
        per_tick = self.stats["busy_s"] / ticks
        return float(min(30.0, max(0.5, per_tick * 2)))

    # ---- loop plumbing -------------------------------------------------------------------------------------
    def _ensure_loop(self) -> None:
        if self._closed:
            raise InternalError("the model worker is shutting down")
        loop = asyncio.get_running_loop()
        if self._loop is loop and self._task is not None and not self._task.done():
            return
        if self._loop is not None and self._loop is not loop:
            # A new event loop (e.g. a second asyncio.run in tests): futures of the old one are unusable.
            for q in self._queues.values():
                if q.timer is not None:
                    q.timer.cancel()
            self._queues.clear()
            self._order.clear()
            self._samples.clear()
            self._in_engine.clear()
            self._sampling.clear()
            self._barriers_running.clear()
            self._kv_used = 0
            if self._engine is not None:
                (self._sampler_executor or self._executor).submit(self._engine.fail_all)
            self._pending_total = 0
        self._loop = loop
        self._wake = asyncio.Event()
        self._swake = asyncio.Event()
        self._task = loop.create_task(self._dispatch(), name="twinkle-scheduler")

    def _new_future(self) -> asyncio.Future:
        assert self._loop is not None
        fut = self._loop.create_future()
        fut.add_done_callback(_consume_exception)
        return fut

    def _wake_up(self) -> None:
        self._new_work = True
        if self._wake is not None:
            self._wake.set()
        if self._swake is not None:
            self._swake.set()

    async def _dispatch(self) -> None:
        assert self._wake is not None and self._loop is not None
        loop = self._loop
        if self._concurrent is None:
            self._concurrent = await loop.run_in_executor(self._executor, self._probe_concurrent)
            self.stats["concurrent_sampling"] = self._concurrent
            if self._concurrent:
                self._sampler_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="twinkle-sampler")
        sampler = loop.create_task(self._dispatch_samples(), name="twinkle-sampler") if self._concurrent else None
        try:
            await self._dispatch_training(loop)
        finally:
            if sampler is not None:
                sampler.cancel()

    def _probe_concurrent(self) -> bool:
        """Backend thread: whether sampling runs on its own thread (config on, and the backend can route LoRA
        rows per thread: ``backend.concurrent_sampling()``)."""
        hook = getattr(self.backend, "concurrent_sampling", None)
        if not self.config.concurrent_sampling or hook is None:
            return False
        try:
            concurrent = bool(hook())
        except BaseException:  # noqa: BLE001
            log.warning("concurrent sampling unavailable; interleaving instead", exc_info=True)
            return False
        if concurrent and self.config.training_nice:
            lower_thread_priority(self.config.training_nice)
        return concurrent

    async def _dispatch_samples(self) -> None:
        """Concurrent sampling: plan sample requests and decode on the sampler thread, beside training on the
        backend thread. A run's samples are not admitted while one of its barriers is planned or running, and
        its barriers wait for its running samples (see ``_plan``), so no sample sees its weights change."""
        assert self._swake is not None and self._loop is not None and self._sampler_executor is not None
        loop, swake = self._loop, self._swake
        while not self._closed:
            self._new_samples = False
            try:
                planned = self._plan_samples(frozenset(self._barriers_running))
            except Exception:  # pragma: no cover - a bug; keep the loop alive
                log.exception("sample planning failed")
                await asyncio.sleep(0.01)
                continue
            if not planned[0] and not self._engine_busy():
                swake.clear()
                if self._new_samples:
                    continue
                await swake.wait()
                continue
            tick = _Tick([], [], [], *planned)
            try:
                await loop.run_in_executor(self._sampler_executor, self._run_sample_tick, tick)
            except asyncio.CancelledError:
                raise
            except BaseException:  # pragma: no cover - _run_sample_tick catches
                log.exception("sampling tick failed")

    def _run_sample_tick(self, tick: _Tick) -> None:
        """Sampler thread: admit the planned requests, decode until idle or new sample work arrives."""
        try:
            self._run_samples(tick)
        except BaseException as e:  # noqa: BLE001 - a bug must not leave callers hanging
            err = _as_twinkle(e, "sample")
            self._post(self._deliver_samples, [(s, (False, err)) for s in tick.samples], None)
            if self._engine is not None:
                self._fail_engine(err)

    async def _dispatch_training(self, loop: asyncio.AbstractEventLoop) -> None:
        assert self._wake is not None
        while not self._closed:
            try:
                tick = self._plan()
            except Exception:  # pragma: no cover - a bug; keep the loop alive
                log.exception("scheduler planning failed")
                await asyncio.sleep(0.01)
                continue
            if tick is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                await loop.run_in_executor(self._executor, self._run_tick, tick)
            except asyncio.CancelledError:
                raise
            except BaseException:  # pragma: no cover - _run_tick catches per part
                log.exception("scheduler tick failed")

    # ---- planning (event-loop side) ------------------------------------------------------------------------
    def _plan(self) -> _Tick | None:
        self._new_work = False
        order = [a for a in self._order if self._queues.get(a) is not None and self._queues[a].ready]
        pre: list[_Request] = []
        for a in order:
            q = self._queues[a]
            # a weight-changing barrier waits until the adapter's running samples finish
            while q.ready and not q.ready[0].is_compute and not self._sampling.get(a):
                pre.append(q.ready.popleft())
        batch: list[_Request] = []
        budget = self.config.batch_token_budget
        used = 0
        blocked: set[str] = set()
        progress = True
        while progress and len(batch) < self.config.max_batch_items:
            progress = False
            for a in order:
                if a in blocked:
                    continue
                q = self._queues[a]
                if not q.ready or not q.ready[0].is_compute:
                    continue
                req = q.ready[0]
                if batch and used + req.tokens > budget:
                    blocked.add(a)
                    continue
                batch.append(q.ready.popleft())
                used += req.tokens
                progress = True
                if len(batch) >= self.config.max_batch_items:
                    break
        served = {r.adapter for r in batch}
        post: list[_Request] = []
        for a in order:
            if a not in served:
                continue
            q = self._queues[a]
            while q.ready and not q.ready[0].is_compute and not self._sampling.get(a):
                post.append(q.ready.popleft())
        for r in pre + batch + post:
            self._order.move_to_end(r.adapter)
        for a in list(self._order):
            queue = self._queues.get(a)
            if queue is None or not queue.ready:
                del self._order[a]
        if self._concurrent:  # sampling is planned by _dispatch_samples
            for r in pre + post:
                self._barriers_running[r.adapter] = self._barriers_running.get(r.adapter, 0) + 1
            if not (pre or batch or post):
                return None
            return _Tick(pre, batch, post, [], [], [], {})
        samples, evict, loads, names = self._plan_samples()
        if not (pre or batch or post or samples or self._in_engine):
            return None
        return _Tick(pre, batch, post, samples, evict, loads, names)

    def _plan_samples(self, exclude: frozenset[str] = frozenset()
                      ) -> tuple[list[_SampleRequest], list[str], list[tuple[str, str]], dict[int, str | None]]:
        """New sample requests for the running decode batch: round-robin over tenants (adapter or checkpoint)
        while the KV-cache budget (``sample_token_budget``) holds; the rest wait in arrival order. Samples of
        the adapters in ``exclude`` (a weight-changing barrier of theirs is about to run) wait."""
        if not self._samples:
            return [], [], [], {}
        taken: list[_SampleRequest] = []
        rest: deque[_SampleRequest] = deque()
        used = self._kv_used
        in_tick: set[tuple[str, int]] = {s.cache_key for s in self._in_engine.values() if s.cache_key is not None}
        cap = self.config.sampler_cache_size
        tenants: OrderedDict[Any, deque[_SampleRequest]] = OrderedDict()
        for s in self._samples:
            tenants.setdefault(s.cache_key or s.adapter, deque()).append(s)
        held: set[int] = set()
        progress = True
        room = self.config.max_sample_batch - len(self._in_engine)
        while progress and len(taken) < room:
            progress = False
            for tq in tenants.values():
                if not tq or len(taken) >= room:
                    continue
                s = tq[0]
                q = self._queues.get(s.adapter) if s.adapter is not None else None
                if (q is not None and q.ready and not q.ready[0].is_compute) or s.adapter in exclude:
                    tq.clear()  # this adapter's barrier goes first: its samples wait
                    continue
                full = (taken or used) and used + s.cost > self.config.sample_token_budget
                new_ckpt = s.cache_key is not None and s.cache_key not in in_tick
                if full or (new_ckpt and len(in_tick) >= cap):
                    tq.clear()
                    continue
                tq.popleft()
                taken.append(s)
                held.add(id(s))
                used += s.cost
                progress = True
                if s.cache_key is not None:
                    in_tick.add(s.cache_key)
        rest.extend(s for s in self._samples if id(s) not in held)
        self._samples = rest
        evict: list[str] = []
        loads: list[tuple[str, str]] = []
        names: dict[int, str | None] = {}
        for s in taken:
            if s.cache_key is None:
                names[id(s)] = s.adapter
                continue
            name = self._ckpt_cache.get(s.cache_key)
            if name is None:
                name = f"__sampler__{uuid.uuid4().hex[:12]}"
                self._ckpt_cache[s.cache_key] = name
                assert s.checkpoint is not None
                loads.append((name, s.checkpoint))
            self._ckpt_cache.move_to_end(s.cache_key)
            names[id(s)] = name
        while len(self._ckpt_cache) > cap:
            key, name = next(iter(self._ckpt_cache.items()))
            if key in in_tick:  # pragma: no cover - prevented by the cap check above
                break
            del self._ckpt_cache[key]
            evict.append(name)
        for s in taken:
            self._in_engine[id(s)] = s
            s.name = names.get(id(s))
            if s.adapter is not None:
                self._sampling[s.adapter] = self._sampling.get(s.adapter, 0) + 1
            self._kv_used += s.cost
        return taken, evict, loads, names

    # ---- execution (backend thread) ------------------------------------------------------------------------
    def _run_tick(self, tick: _Tick) -> None:
        start = time.perf_counter()
        try:
            for req in tick.pre:
                self._run_barrier(req)
            if not self._concurrent and (tick.samples or self._engine_busy()):
                self._run_samples(tick)
            if tick.batch:
                self._run_batch(tick.batch, frozenset(r.adapter for r in tick.post))
            for req in tick.post:
                self._run_barrier(req)
        except BaseException as e:  # noqa: BLE001 - a scheduler bug must not leave callers hanging
            err = _as_twinkle(e, "scheduler tick")
            self._post(self._deliver, [(r, (False, err)) for r in tick.pre + tick.batch + tick.post], None)
            self._post(self._deliver_samples, [(s, (False, err)) for s in tick.samples], None)
            if self._engine is not None:
                self._fail_engine(err)
        busy = time.perf_counter() - start
        self._post(self._tick_done, busy)

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # loop closed (shutdown)
            pass

    def _run_barrier(self, req: _Request) -> None:
        req.started = time.monotonic()
        try:
            result: Any = self._apply_barrier(req)
            outcome: tuple[bool, Any] = (True, result)
        except BaseException as e:  # noqa: BLE001 - every failure goes to its own future
            outcome = (False, _as_twinkle(e, req.op.type))
        self._post(self._deliver, [(req, outcome)], None)

    def _apply_barrier(self, req: _Request) -> Any:
        b, op, a = self.backend, req.op, req.adapter
        if isinstance(op, OptimStepOp):
            metrics = b.optim_step(a, op.adam_params)
            return OptimStepResponse(metrics={k: float(v) for k, v in (metrics or {}).items()})
        if isinstance(op, SetOptimizerOp):
            b.set_optimizer(a, op.optimizer)
            return {"type": op.type, "step": b.step_count(a)}
        if isinstance(op, SetSchedulerOp):
            b.set_lr_scheduler(a, op.scheduler)
            return {"type": op.type, "step": b.step_count(a)}
        if isinstance(op, SaveOp):
            if not req.path:
                raise InvalidInputError("save needs a checkpoint directory", field="path")
            optimizer = op.kind == "training"
            seal = (lambda d: encrypt_dir(d, op.age_recipients)) if op.age_recipients else None
            _atomic_save(b, a, Path(req.path), optimizer=optimizer, overwrite=op.overwrite, seal=seal)
            return {"type": op.type, "path": req.path, "kind": op.kind, "step": b.step_count(a),
                    "size_bytes": _dir_size(Path(req.path))}
        if isinstance(op, LoadOp):
            if not req.path:
                raise InvalidInputError("load needs a checkpoint directory", field="path")
            lora = b.load(a, Path(req.path), optimizer=op.optimizer)
            return {"type": op.type, "path": req.path, "step": b.step_count(a),
                    "lora": lora.model_dump() if lora is not None else None}
        raise InvalidInputError(f"unknown operation {getattr(op, 'type', op)!r}", field="type")

    def _run_batch(self, reqs: list[_Request], exclude: frozenset[str] = frozenset()) -> None:
        """The tick's mixed training batch. While sampling is active it runs interleaved (``_run_interleaved``);
        a single request over ``batch_token_budget`` tokens runs in micro-batches; otherwise one pass.
        ``exclude``: adapters whose weight-changing barrier follows in this tick (no new samples of theirs)."""
        items = [_batch_item(r) for r in reqs]
        started = time.monotonic()
        for r in reqs:
            r.started = started
        if self._interleave_wanted(items):
            self._run_interleaved(reqs, items, exclude)
            return
        if len(items) == 1 and items[0].num_tokens > self.config.batch_token_budget:
            self._run_split(reqs[0], items[0], self.config.batch_token_budget, None)
            return
        self._run_mixed(reqs, items)

    def _run_split(self, req: _Request, item: BatchItem, budget: int, between: Callable[[], None] | None) -> None:
        t0 = time.perf_counter()
        try:
            out = self._run_micro_batches(item, budget, between)
        except BaseException as e:  # noqa: BLE001 - the request fails alone, its gradients rolled back
            self._post(self._deliver, [(req, (False, _as_twinkle(e, "forward_backward")))], None)
            return
        if out is None:
            self._run_mixed([req], [item])
        else:
            self._post(self._deliver, [(req, (True, out))], _batch_info([req], time.perf_counter() - t0))

    def _run_mixed(self, reqs: list[_Request], items: list[BatchItem]) -> None:
        """One backend pass for ``items``; if it fails, each request again alone (a failure stays its own)."""
        t0 = time.perf_counter()
        try:
            outs = self.backend.run_batch(items)
            if len(outs) != len(items):
                raise InternalError(f"backend returned {len(outs)} results for {len(items)} requests")
            seconds = time.perf_counter() - t0
            self._measure_training(sum(it.num_tokens for it in items), seconds)
            pairs = [(r, (True, o)) for r, o in zip(reqs, outs, strict=True)]
            self._post(self._deliver, pairs, _batch_info(reqs, seconds))
            return
        except BaseException as e:  # noqa: BLE001
            if len(reqs) == 1:
                self._post(self._deliver, [(reqs[0], (False, _as_twinkle(e, "forward_backward")))], None)
                return
            log.info("mixed batch of %d failed (%s); re-running its requests one by one", len(reqs), e)
        for r, item in zip(reqs, items, strict=True):
            t1 = time.perf_counter()
            try:
                out = self.backend.run_batch([item])[0]
                self._post(self._deliver, [(r, (True, out))], _batch_info([r], time.perf_counter() - t1))
            except BaseException as e:  # noqa: BLE001
                self._post(self._deliver, [(r, (False, _as_twinkle(e, "forward_backward")))], None)

    def _run_micro_batches(self, item: BatchItem, budget: int,
                           between: Callable[[], None] | None = None) -> Any:
        """A request as consecutive passes of at most ``budget`` tokens (see ``twinkle.server.microbatch``),
        all or nothing: on a failure the adapter's gradients are restored. ``between`` (never raises) runs
        between two passes. Returns None (run it as one pass) when the backend cannot snapshot gradients."""
        snapshot = getattr(self.backend, "grad_snapshot", None)
        restore = getattr(self.backend, "grad_restore", None)
        if item.adapter is None or snapshot is None or restore is None:
            return None
        saved = snapshot(item.adapter) if not item.forward_only else ()
        if saved is None:
            return None
        parts = split_item(item, budget, paired=get_loss(item.loss_fn).paired)
        outs = []
        try:
            for i, part in enumerate(parts):
                if i and between is not None:
                    between()
                t0 = time.perf_counter()
                outs.append(self.backend.run_batch([part])[0])
                self._measure_training(part.num_tokens, time.perf_counter() - t0)
        except BaseException:
            if not item.forward_only:
                restore(item.adapter, saved)
            raise
        self.stats["micro_batches"] += len(parts)
        return merge_outputs(outs, [len(p.data) for p in parts])

    # ---- interleaving training with sampling (backend thread) ----------------------------------------------
    def _measure_training(self, tokens: int, seconds: float) -> None:
        if tokens <= 0 or seconds <= 0:
            return
        tps = tokens / seconds
        self._train_tps = tps if self._train_tps is None else 0.7 * self._train_tps + 0.3 * tps

    def _sampling_active(self) -> bool:
        recent = time.monotonic() - self._last_sample_at < _SAMPLING_RECENT_S
        return self._engine_busy() or bool(self._samples) or recent

    def _interleave_wanted(self, items: list[BatchItem]) -> bool:
        """Split a training batch for sampling: interleaving is on, sampling is active (running, waiting, or
        a request came in the last few seconds), the batch would take longer than a slice, and the backend
        has a continuous sampler and gradient snapshots (micro-batches are all or nothing)."""
        if (self._concurrent or self.config.train_slice_s <= 0 or self._train_tps is None
                or not self._sampling_active()):
            return False
        if getattr(self.backend, "grad_snapshot", None) is None or getattr(self.backend, "grad_restore", None) is None:
            return False
        tokens = sum(it.num_tokens for it in items)
        if tokens / self._train_tps <= self.config.train_slice_s:
            return False
        return self._get_engine() is not None

    def _run_interleaved(self, reqs: list[_Request], items: list[BatchItem], exclude: frozenset[str]) -> None:
        """The training batch in slices of about ``train_slice_s`` (whole datums; small requests of several
        runs still share a pass), with a sampling slice between two of them: new sample requests are admitted
        and prefilled, running ones decode. Every request's gradient is the sum over its parts, as unsplit."""
        assert self._train_tps is not None
        slice_tokens = max(1, min(self.config.batch_token_budget, int(self._train_tps * self.config.train_slice_s)))
        last = {"t": time.perf_counter()}

        def between() -> None:
            self._sample_between(exclude, time.perf_counter() - last["t"])
            last["t"] = time.perf_counter()

        i = 0
        while i < len(reqs):
            if i:
                between()
            if items[i].num_tokens > slice_tokens:
                self._run_split(reqs[i], items[i], slice_tokens, between)
                i += 1
                continue
            j, used = i, 0
            while j < len(reqs) and items[j].num_tokens <= slice_tokens and (j == i or used + items[j].num_tokens
                                                                              <= slice_tokens):
                used += items[j].num_tokens
                j += 1
            self._run_mixed(reqs[i:j], items[i:j])
            i = j
        self.stats["interleaved_batches"] += 1

    def _await_on_loop(self, loop: asyncio.AbstractEventLoop, coro: Any) -> Any:
        """Run ``coro`` on the event loop and wait for its result; None when the scheduler or loop closes first
        (never abandoned otherwise: a plan that ran must reach the engine, else its samples would hang)."""
        try:
            cfut = asyncio.run_coroutine_threadsafe(coro, loop)
        except RuntimeError:  # loop closed
            coro.close()
            return None
        while True:
            try:
                return cfut.result(timeout=1.0)
            except concurrent.futures.TimeoutError:
                if self._closed or loop.is_closed():
                    return None
            except BaseException:  # noqa: BLE001 - cancelled at shutdown
                log.debug("could not plan samples between training slices", exc_info=True)
                return None

    def _sample_between(self, exclude: frozenset[str], train_s: float) -> None:
        """A sampling slice between two training slices: at most ``max(sample_slice_s, train_s)`` of decode
        steps (so each kind gets about half of the device while both wait). Never raises."""
        loop = self._loop
        deadline = time.perf_counter() + max(self.config.sample_slice_s, train_s)
        while not self._closed and loop is not None and (self._samples or self._engine_busy()):
            planned: tuple[Any, ...] = ([], [], [], {})
            if self._samples:
                async def plan() -> tuple[Any, ...]:
                    return self._plan_samples(exclude)

                got = self._await_on_loop(loop, plan())
                if got is None:
                    return
                planned = got
            sub = _Tick([], [], [], *planned)
            if not sub.samples and not self._engine_busy():
                return  # what waits cannot be admitted now (budget, a barrier): training goes on
            try:
                self._run_samples(sub, deadline - time.perf_counter())
            except BaseException as e:  # noqa: BLE001
                err = _as_twinkle(e, "sample")
                self._post(self._deliver_samples, [(s, (False, err)) for s in sub.samples], None)
                if self._engine is not None:
                    self._fail_engine(err)
                return
            self.stats["sample_slices_between"] += 1
            if time.perf_counter() >= deadline or not self._samples:
                return

    def _run_samples(self, tick: _Tick, slice_s: float | None = None) -> None:
        """Hand the tick's sample requests to the engine and decode a slice (``slice_s``: between two
        training slices, how long at most)."""
        for name in tick.evict:
            try:
                self.backend.remove_adapter(name)
            except BaseException:  # noqa: BLE001
                log.warning("could not evict cached sampler adapter %s", name, exc_info=True)
        failed_loads: dict[str, BaseException] = {}
        for name, ckpt in tick.loads:
            try:
                self.backend.load(name, Path(ckpt), optimizer=False)
            except BaseException as e:  # noqa: BLE001
                failed_loads[name] = e
        good: list[_SampleRequest] = []
        bad: list[tuple[_SampleRequest, tuple[bool, Any]]] = []
        started = time.monotonic()
        for s in tick.samples:
            s.started = started
            cached = tick.sample_names.get(id(s))
            if cached is not None and cached in failed_loads:
                bad.append((s, (False, _as_twinkle(failed_loads[cached], "sample"))))
            else:
                good.append(s)
        if failed_loads:
            self._post(self._forget_cached, list(failed_loads))
        if bad:
            self._post(self._deliver_samples, bad, None)
        engine = self._get_engine()
        whole = good if engine is None else [s for s in good if getattr(s.op, "images", None)]
        ranked = [s for s in whole if getattr(s.op, "topk_logprobs", 0)]
        if ranked:  # only the continuous sampler ranks the tokens of each step; a whole batch cannot
            err = UnsupportedError(RANKED_NEEDS_ENGINE, field="topk_logprobs")
            self._post(self._deliver_samples, [(s, (False, err)) for s in ranked], None)
            good = [s for s in good if s not in ranked]
        if engine is None:
            if good:
                self._sample_whole(good, tick)
            return
        with_images = [s for s in good if getattr(s.op, "images", None)]
        if with_images:  # image prompts take the backend's own sampling path (not the continuous engine)
            self._sample_whole(with_images, tick)
            good = [s for s in good if not getattr(s.op, "images", None)]
        for s in good:
            if s.future.cancelled():  # its caller left between planning and here: never admitted
                self._post(self._deliver_samples, [(s, (False, None))], None)
                continue
            item = _sample_item(s, tick.sample_names.get(id(s)))
            try:
                validate = getattr(self.backend, "validate_sample", None)
                if validate is not None:
                    validate([item])
                engine.admit(s, item)
            except BaseException as e:  # noqa: BLE001
                self._post(self._deliver_samples, [(s, (False, _as_twinkle(e, "sample")))], None)
        self._decode_slice(engine, bool(tick.batch), slice_s)

    def _get_engine(self) -> Any:
        if not self._engine_probed:
            self._engine_probed = True
            make = getattr(self.backend, "sampler_engine", None)
            if make is not None:
                try:
                    self._engine = make(kv_budget=self.config.sample_token_budget,
                                        prefill_chunk=self.config.prefill_chunk,
                                        prefix_tokens=self.config.prefix_cache_tokens)
                    if self._engine is not None:
                        self._engine.stream = self._on_token
                except BaseException:  # noqa: BLE001
                    log.warning("continuous sampler unavailable; sampling whole batches", exc_info=True)
        return self._engine

    def _engine_busy(self) -> bool:
        return self._engine is not None and not self._engine.idle()

    def _decode_slice(self, engine: Any, training_waits: bool, bound_s: float | None = None) -> None:
        """Decode steps until the engine is idle, or new work arrived, or (training waits in this tick) the
        slice is over: sampling gets at least as much device time as the last training batch took.
        ``bound_s``: a slice between two training slices, which ends after that long (or on new work)."""
        slice_s = self.config.sample_slice_s
        if bound_s is not None:
            training_waits, slice_s = True, bound_s
        elif training_waits and self.last_batch is not None:
            slice_s = max(slice_s, float(self.last_batch.get("seconds", 0.0)))
        t0 = time.perf_counter()
        while not engine.idle():
            try:
                done = engine.step()
            except BaseException as e:  # noqa: BLE001
                self._fail_engine(_as_twinkle(e, "sample"))
                return
            if self._streamed:
                self._post(self._deliver_tokens, self._streamed)
                self._streamed = []
            if done:  # a None response: aborted (``cancel_sample``)
                self._post(self._deliver_samples, [(key, (out is not None, out)) for key, out in done], 0.0)
            elapsed = time.perf_counter() - t0
            if self._concurrent:  # on the sampler thread: replan when a request can join
                if self._new_samples and self._samples_waiting():
                    return
                continue
            if self._new_work and (self._samples_waiting() or elapsed >= slice_s):
                return
            if training_waits and elapsed >= slice_s:
                return

    def _on_token(self, key: Any, index: int, token: int, logprob: float, top: Any = None) -> None:
        if getattr(key, "on_tokens", None) is not None:
            self._streamed.append((key, index, token, logprob, top))

    def _deliver_tokens(self, items: list[tuple[Any, int, int, float, Any]]) -> None:
        by_req: dict[int, tuple[Any, list[tuple[int, int, float, Any]]]] = {}
        for s, index, token, logprob, top in items:
            by_req.setdefault(id(s), (s, []))[1].append((index, token, logprob, top))
        for s, toks in by_req.values():
            if s.finished:
                continue
            try:
                s.on_tokens(toks)
            except Exception:  # noqa: BLE001 - a listener must not break the scheduler
                log.warning("sample stream listener failed", exc_info=True)

    def _samples_waiting(self) -> bool:
        return bool(self._samples)

    def _fail_engine(self, err: TwinkleError) -> None:
        keys = self._engine.fail_all()
        self._post(self._deliver_samples, [(k, (False, err)) for k in keys], None)

    def _sample_whole(self, good: list[_SampleRequest], tick: _Tick) -> None:
        """Backends without a continuous sampler: one ``backend.sample`` call for the tick's requests."""
        items = [_sample_item(s, tick.sample_names.get(id(s))) for s in good]
        t0 = time.perf_counter()
        try:
            outs = self.backend.sample(items)
            if len(outs) != len(items):
                raise InternalError(f"backend returned {len(outs)} samples for {len(items)} requests")
            self._post(self._deliver_samples, [(s, (True, o)) for s, o in zip(good, outs, strict=True)],
                       time.perf_counter() - t0)
            return
        except BaseException as e:  # noqa: BLE001
            if len(good) == 1:
                self._post(self._deliver_samples, [(good[0], (False, _as_twinkle(e, "sample")))], None)
                return
        for s, item in zip(good, items, strict=True):
            try:
                out = self.backend.sample([item])[0]
                self._post(self._deliver_samples, [(s, (True, out))], None)
            except BaseException as e:  # noqa: BLE001
                self._post(self._deliver_samples, [(s, (False, _as_twinkle(e, "sample")))], None)

    # ---- completion (event-loop side) ----------------------------------------------------------------------
    def _deliver(self, pairs: list[tuple[_Request, tuple[bool, Any]]], info: dict[str, Any] | None) -> None:
        done_at = time.monotonic()
        for req, (ok, value) in pairs:
            if req.finished:
                continue
            if ok:
                if req.started is not None:  # the client's widget shows a step's queue wait and execution
                    attach_timing(value, req.started - req.arrived, done_at - req.started)
                if not req.future.done():
                    req.future.set_result(value)
            else:
                self.stats["errors"] += 1
                if not req.future.done():
                    req.future.set_exception(value)
            if not req.is_compute:
                self.stats["barriers_run"] += 1
                self._barrier_done(req.adapter)
            self._finish(req)
        if self.observer is not None:
            self._observe(pairs, info)
        if info is not None:
            self.stats["batches_run"] += 1
            self.stats["rows_run"] += info["rows"]
            self.stats["tokens_run"] += info["tokens"]
            if info["mixed"]:
                self.stats["mixed_batches"] += 1
            self.stats["max_adapters_in_batch"] = max(self.stats["max_adapters_in_batch"], len(info["adapters"]))
            self.last_batch = info
            self.recent_batches.append(info)

    def _barrier_done(self, adapter: str) -> None:
        n = self._barriers_running.get(adapter)
        if n is None:
            return
        if n > 1:
            self._barriers_running[adapter] = n - 1
            return
        del self._barriers_running[adapter]
        if self._samples:  # samples of this run waited for it
            self._new_samples = True
            if self._swake is not None:
                self._swake.set()

    def _observe(self, pairs: list[tuple[_Request, tuple[bool, Any]]], info: dict[str, Any] | None) -> None:
        self.observer.completed([(req, None if ok else value) for req, (ok, value) in pairs], info,
                                time.monotonic())

    def _finish(self, req: _Request) -> None:
        req.finished = True
        self._pending_total -= 1
        q = req.queue
        if q is None:
            return
        q.pending -= 1
        limit = self.config.result_memory
        while len(q.memory) > limit:
            seq, fut = next(iter(q.memory.items()))
            if not fut.done():
                break
            del q.memory[seq]
            q.kinds.pop(seq, None)

    def _deliver_samples(self, pairs: list[tuple[_SampleRequest, tuple[bool, Any]]], seconds: float | None) -> None:
        for s, (ok, value) in pairs:
            if s.finished:
                continue
            s.finished = True
            self._pending_total -= 1
            if self._in_engine.pop(id(s), None) is not None:
                self._kv_used -= s.cost
                if s.adapter is not None:
                    n = self._sampling.get(s.adapter, 0) - 1
                    if n > 0:
                        self._sampling[s.adapter] = n
                    else:
                        self._sampling.pop(s.adapter, None)
                        if self._concurrent and self._wake is not None:  # its barrier may wait for this
                            self._wake.set()
            if self.observer is not None and (ok or value is not None):  # (not for an aborted one, like a dropped one)
                self.observer.sample_done(s, None if ok else value, time.monotonic())
            if ok:
                if s.started is not None:
                    attach_timing(value, s.started - s.arrived, time.monotonic() - s.started)
                self.stats["samples_run"] += 1
                if not s.future.done():
                    s.future.set_result(value)
            elif value is None:  # aborted in the sampler: its future was cancelled by ``cancel_sample``
                self.stats["samples_cancelled"] += 1
                if not s.future.done():
                    s.future.cancel()
            else:
                self.stats["errors"] += 1
                if not s.future.done():
                    s.future.set_exception(value)
        if seconds is not None:
            self.stats["sample_batches"] += 1

    def _forget_cached(self, names: list[str]) -> None:
        for key, name in list(self._ckpt_cache.items()):
            if name in names:
                del self._ckpt_cache[key]

    def _tick_done(self, busy: float) -> None:
        self.stats["ticks"] += 1
        self.stats["busy_s"] += busy


# ---- helpers -----------------------------------------------------------------------------------------------


_LOWERED = threading.local()


def lower_thread_priority(steps: int) -> bool:
    """Lower the calling thread's OS scheduling priority by ``steps`` nice steps (Linux: a thread id is a valid
    ``PRIO_PROCESS`` target and affects that thread alone). Used on the training thread when sampling runs on
    its own thread: when the machine's cores are contended, the kernel then runs a pending prefill or decode step
    first (at nice +5 a thread's CPU share against a nice-0 one is ~1:3), and when they are not, nothing changes.
    Results are unaffected. An unprivileged thread cannot raise its priority again; the change lasts as long as
    the thread. Returns False where the platform has no per-thread priorities."""
    get_tid = getattr(threading, "get_native_id", None)
    if not sys.platform.startswith("linux") or get_tid is None or steps <= 0:
        return False
    if getattr(_LOWERED, "done", False):  # a backend thread shared by several schedulers: once
        return True
    try:
        tid = get_tid()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + steps))
        _LOWERED.done = True
        return True
    except OSError:
        log.debug("could not lower the training thread's priority", exc_info=True)
        return False


def new_backend_executor() -> ThreadPoolExecutor:
    """The one thread every call of a backend runs on."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="twinkle-backend")


def _consume_exception(fut: asyncio.Future) -> None:
    if not fut.cancelled():
        fut.exception()


def _batch_item(req: _Request) -> BatchItem:
    op = req.op
    assert isinstance(op, ForwardBackwardOp)
    return BatchItem(adapter=req.adapter, data=op.data, loss_fn=op.loss_fn, loss_fn_config=op.loss_fn_config,
                     forward_only=op.forward_only)


RANKED_NEEDS_ENGINE = ("the most likely tokens at each sampled position need the continuous sampler (transformers "
                       "backend, text prompts)")


def _sample_item(s: _SampleRequest, adapter: str | None) -> SampleItem:
    op = s.op
    return SampleItem(adapter=adapter, prompt=list(op.prompt), num_samples=op.num_samples, params=op.params,
                      prompt_logprobs=op.prompt_logprobs, topk_prompt_logprobs=op.topk_prompt_logprobs,
                      images=list(getattr(op, "images", None) or []) or None, scope=getattr(op, "scope", ""),
                      topk_logprobs=getattr(op, "topk_logprobs", 0))


def _batch_info(reqs: list[_Request], seconds: float) -> dict[str, Any]:
    adapters = list(dict.fromkeys(r.adapter for r in reqs))
    rows = sum(len(getattr(r.op, "data", ())) for r in reqs)  # forward_backward ops carry rows
    return {"adapters": adapters, "requests": len(reqs), "rows": rows, "tokens": sum(r.tokens for r in reqs),
            "mixed": len(adapters) > 1, "seconds": round(seconds, 6), "time": time.time()}


def _as_twinkle(e: BaseException, what: str) -> TwinkleError:
    if isinstance(e, TwinkleError):
        return e
    log.error("backend %s failed", what, exc_info=(type(e), e, e.__traceback__))
    return InternalError(f"{what} failed on the model worker ({type(e).__name__})")


def _dir_size(path: Path) -> int:
    total = 0
    for p in path.rglob("*"):
        if p.is_file():
            total += p.stat().st_size
    return total


_save_lock = threading.Lock()


def _atomic_save(backend: Backend, adapter: str, path: Path, *, optimizer: bool, overwrite: bool,
                 seal: Callable[[Path], None] | None = None) -> None:
    """Write into a temporary sibling directory, then rename into place: a crash never leaves a half-written
    checkpoint, and an existing checkpoint is only replaced (``overwrite``) once the new one is complete.
    ``seal`` (age encryption of an external export) runs on the temporary directory before the rename."""
    if path.exists() and not overwrite:
        raise InvalidInputError(f"checkpoint {path.name!r} already exists", field="name")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        backend.save(adapter, tmp, optimizer=optimizer)
        if seal is not None:
            seal(tmp)
        with _save_lock:
            if path.exists():
                old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
                os.replace(path, old)
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
