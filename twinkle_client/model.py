"""Remote mirrors of ``twinkle.model`` (see ``docs/local-api.md``): the same methods, executed on the server.

Change ``from twinkle.model import TransformersModel`` to ``from twinkle_client.model import TransformersModel``
and call ``twinkle_client.init_twinkle_client(url, key)``; the script is otherwise unchanged. Every training
call carries a per-run ``seq_id`` so a retried request is answered from its first execution, never applied
twice, and a re-attached process continues the sequence.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from twinkle.data import loss_weight_and_tokens, to_datums
from twinkle.types import (
    AdamParams,
    ForwardBackwardOutput,
    InvalidInputError,
    LoraConfig,
    LRSchedulerConfig,
    NotFoundError,
    OptimizerConfig,
    OptimStepResponse,
    to_lora_config,
)
from twinkle.types.api import BaseModelInfo, CheckpointInfo, RunInfo

from ._futures import SUBMIT_WAIT_S, RemoteFuture
from ._stop import TrainingStopped
from .session import Session, current_session
from .tokenizer import load_tokenizer, load_tokenizer_from_candidates

__all__ = ["MegatronModel", "MockModel", "RemoteModel", "TransformersModel", "load_tokenizer", "to_lora_config"]

_SCHEDULER_ALIASES = {"cosine": "cosine", "linear": "linear", "constant": "constant", "cosine_with_warmup": "cosine"}


def _optimizer_body(optimizer: str, lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
                    grad_clip_norm: float, momentum: float, extra: dict[str, Any]) -> dict[str, Any]:
    lr = extra.pop("learning_rate", lr)
    if extra:
        raise InvalidInputError(f"unknown optimizer option(s): {', '.join(extra)}", field=next(iter(extra)))
    try:
        cfg = OptimizerConfig(name=optimizer.lower(), lr=lr, betas=tuple(betas), eps=eps,
                              weight_decay=weight_decay, grad_clip_norm=grad_clip_norm, momentum=momentum)
    except Exception as e:
        raise InvalidInputError(f"invalid optimizer settings: {e}", field="optimizer") from None
    return {"optimizer": cfg.model_dump(mode="json")}


def _scheduler_body(scheduler: str, num_warmup_steps: int, num_training_steps: int | None,
                    min_lr_ratio: float) -> dict[str, Any]:
    name = _SCHEDULER_ALIASES.get(scheduler.lower())
    if name is None:
        raise InvalidInputError(f"unknown LR scheduler {scheduler!r} (cosine, linear, constant)", field="scheduler")
    try:
        cfg = LRSchedulerConfig(name=name, warmup_steps=num_warmup_steps, total_steps=num_training_steps,
                                min_lr_ratio=min_lr_ratio)
    except Exception as e:
        raise InvalidInputError(f"invalid LR scheduler settings: {e}", field="scheduler") from None
    return {"scheduler": cfg.model_dump(mode="json")}


def _save_body(name: str, save_optimizer: bool, overwrite: bool, ttl_seconds: float | None) -> dict[str, Any]:
    body: dict[str, Any] = {"name": name, "kind": "training" if save_optimizer else "sampler", "overwrite": overwrite}
    if ttl_seconds is not None:
        body["ttl_seconds"] = ttl_seconds
    return body


@dataclass
class _Adapter:
    name: str
    run: RunInfo
    lora: LoraConfig
    step: int = 0
    meters: dict[bool, list[float]] = field(default_factory=dict)  # is_training -> [loss, weight, tokens]
    last: dict[str, float] = field(default_factory=dict)
    in_step: bool = False  # a forward_backward was sent since the last optim_step (mid-step: never stop here)

    @property
    def run_id(self) -> str:
        return self.run.run_id


class RemoteModel:
    """Base of the remote model classes. ``model_id``: a base model the server hosts (None: its first one)."""

    backend = "transformers"

    def __init__(self, model_id: str | None = None, *, seed: int = 0, session: Session | None = None, **kwargs: Any):
        self.session = session or current_session()
        self.seed = seed
        self.options = kwargs
        self.base = self._pick_base_model(model_id)
        self.model_id = self.base.name
        self._adapters: dict[str, _Adapter] = {}
        self._current: str | None = None
        self._tokenizer: Any = None

    # ---- base model -----------------------------------------------------------------------------------------
    def _pick_base_model(self, model_id: str | None) -> BaseModelInfo:
        models = self.session.capabilities().base_models
        if not models:
            raise NotFoundError("the server hosts no base model", field="model_id")
        if model_id is None:
            same = [m for m in models if m.backend == self.backend]
            return (same or models)[0]

        def bare(s: str) -> str:
            return s.split("://", 1)[-1].strip("/")

        for m in models:
            if m.name == model_id:
                return m
        for m in models:
            if bare(m.name) == bare(model_id):
                return m
        names = ", ".join(m.name for m in models)
        raise NotFoundError(f"base model {model_id!r} is not hosted by {self.session.url} (hosted: {names})",
                            field="model_id")

    # ---- adapters -------------------------------------------------------------------------------------------
    def add_adapter_to_model(self, adapter_name: str = "default", config: Any = None, **kwargs: Any) -> RunInfo:
        """Create the adapter as a training run on the server. If this session already has an active run of
        that name (a re-run cell, a re-attached kernel), it is re-used and training continues where it was."""
        lora = self._lora(config, **kwargs)
        run, body = self._reuse_or_create(self.session.runs(all_sessions=False), adapter_name, lora)
        if run is None:
            run = self.session.submit("runs", body, RunInfo.model_validate, "create_run", wait=SUBMIT_WAIT_S).result()
        return self._register(adapter_name, run, lora)

    async def aadd_adapter_to_model(self, adapter_name: str = "default", config: Any = None, **kwargs: Any) -> RunInfo:
        """``add_adapter_to_model`` without blocking the event loop."""
        lora = self._lora(config, **kwargs)
        run, body = self._reuse_or_create(await self.session.aio.runs(all_sessions=False), adapter_name, lora)
        if run is None:
            fut = await self.session.aio.submit("runs", body, RunInfo.model_validate, "create_run", wait=SUBMIT_WAIT_S)
            run = await fut
        return self._register(adapter_name, run, lora)

    def _lora(self, config: Any, **kwargs: Any) -> LoraConfig:
        lora = to_lora_config(config, **kwargs)
        return lora.model_copy(update={"seed": self.seed}) if lora.seed is None else lora

    def _reuse_or_create(self, runs: list[RunInfo], adapter_name: str,
                         lora: LoraConfig) -> tuple[RunInfo | None, dict[str, Any]]:
        """``(this session's active run of that name, {})`` to re-use, or ``(None, the create request's body)``."""
        existing = [r for r in runs if r.name == adapter_name and r.state == "active" and r.base_model == self.model_id]
        if not existing:
            return None, {"session_id": self.session.session_id, "base_model": self.model_id,
                          "lora": lora.model_dump(exclude_none=True), "name": adapter_name,
                          "metadata": {"adapter": adapter_name, "client": "twinkle_client", "backend": self.backend}}
        run = existing[-1]
        if run.lora.rank != lora.rank:
            raise InvalidInputError(
                f"this session already has adapter {adapter_name!r} with rank {run.lora.rank}, not {lora.rank}",
                field="config.rank")
        last_seq = getattr(run, "last_seq_id", None)
        if last_seq is not None:
            self.session.run_state.bump_seq_id(run.run_id, int(last_seq) + 1)
        elif self.session.run_state.get(run.run_id, "next_seq_id") is None:
            # no record of where this run's sequence stands (state file from another machine): jump far
            # ahead so no earlier seq_id is replayed; the server skips the gap after a short grace
            self.session.run_state.bump_seq_id(run.run_id, int(time.time() * 1000))
        return run, {}

    def _register(self, adapter_name: str, run: RunInfo, lora: LoraConfig) -> RunInfo:
        self._adapters[adapter_name] = _Adapter(adapter_name, run, lora, step=run.step)
        if self._current is None:
            self._current = adapter_name
        return run

    def set_current_adapter(self, adapter_name: str) -> None:
        self._adapter(adapter_name)
        self._current = adapter_name

    def list_adapters(self) -> list[str]:
        return list(self._adapters)

    def remove_adapter(self, adapter_name: str) -> None:
        a = self._adapter(adapter_name)
        self.session.delete_run(a.run_id)
        self._forget(adapter_name)

    async def aremove_adapter(self, adapter_name: str) -> None:
        a = self._adapter(adapter_name)
        await self.session.aio.delete_run(a.run_id)
        self._forget(adapter_name)

    def _forget(self, adapter_name: str) -> None:
        del self._adapters[adapter_name]
        if self._current == adapter_name:
            self._current = next(iter(self._adapters), None)

    def _adapter(self, adapter_name: str | None = None) -> _Adapter:
        name = adapter_name or self._current
        if name is None:
            raise InvalidInputError("no adapter yet: call add_adapter_to_model(name, LoraConfig(...)) first",
                                    field="adapter_name")
        if name not in self._adapters:
            raise NotFoundError(f"no adapter named {name!r} (have: {', '.join(self._adapters) or 'none'})",
                                field="adapter_name")
        return self._adapters[name]

    @property
    def run_id(self) -> str:
        """The server's id of the current adapter's training run."""
        return self._adapter().run_id

    def run_info(self, adapter_name: str | None = None) -> RunInfo:
        a = self._adapter(adapter_name)
        a.run = self.session.get_run(a.run_id)
        return a.run

    async def arun_info(self, adapter_name: str | None = None) -> RunInfo:
        a = self._adapter(adapter_name)
        a.run = await self.session.aio.get_run(a.run_id)
        return a.run

    # ---- requests -------------------------------------------------------------------------------------------
    def _submit(self, a: _Adapter, op: str, body: dict[str, Any], parse: Any, *, seq: bool = True,
                wait: bool | str = False) -> Any:
        """One request, built once for both twins. ``wait``: the caller blocks on the result right away (one
        round trip, see ``SUBMIT_WAIT_S``); ``"async"``: a coroutine giving the result (the ``a*`` methods)."""
        if seq:
            body = {"seq_id": self.session.run_state.next_seq_id(a.run_id), **body}
        path = f"runs/{a.run_id}/{op}"
        if wait == "async":
            return self._aresult(path, body, parse, op)
        return self.session.submit(path, body, parse, op, wait=SUBMIT_WAIT_S if wait else 0.0)

    async def _aresult(self, path: str, body: dict[str, Any], parse: Any, op: str) -> Any:
        fut = await self.session.aio.submit(path, body, parse, op, wait=SUBMIT_WAIT_S)
        return await fut

    def set_optimizer(
        self, optimizer: str = "AdamW", *, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8, weight_decay: float = 0.0, grad_clip_norm: float = 0.0, momentum: float = 0.0,
        adapter_name: str | None = None, **kwargs: Any,
    ) -> None:
        """Configure the adapter's optimizer. Re-sending the settings a re-attached run already has is a no-op
        (its optimizer state is kept)."""
        body = _optimizer_body(optimizer, lr, betas, eps, weight_decay, grad_clip_norm, momentum, kwargs)
        self._configure(adapter_name, "optimizer", body)

    async def aset_optimizer(
        self, optimizer: str = "AdamW", *, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8, weight_decay: float = 0.0, grad_clip_norm: float = 0.0, momentum: float = 0.0,
        adapter_name: str | None = None, **kwargs: Any,
    ) -> None:
        """``set_optimizer`` without blocking the event loop."""
        body = _optimizer_body(optimizer, lr, betas, eps, weight_decay, grad_clip_norm, momentum, kwargs)
        await self._aconfigure(adapter_name, "optimizer", body)

    def set_lr_scheduler(
        self, scheduler: str = "constant", *, num_warmup_steps: int = 0, num_training_steps: int | None = None,
        min_lr_ratio: float = 0.0, adapter_name: str | None = None,
    ) -> None:
        body = _scheduler_body(scheduler, num_warmup_steps, num_training_steps, min_lr_ratio)
        self._configure(adapter_name, "lr_scheduler", body)

    async def aset_lr_scheduler(
        self, scheduler: str = "constant", *, num_warmup_steps: int = 0, num_training_steps: int | None = None,
        min_lr_ratio: float = 0.0, adapter_name: str | None = None,
    ) -> None:
        """``set_lr_scheduler`` without blocking the event loop."""
        body = _scheduler_body(scheduler, num_warmup_steps, num_training_steps, min_lr_ratio)
        await self._aconfigure(adapter_name, "lr_scheduler", body)

    def _configure(self, adapter_name: str | None, op: str, body: dict[str, Any]) -> None:
        a = self._adapter(adapter_name)
        if self.session.run_state.get(a.run_id, op) == body:
            return
        self._submit(a, op, body, lambda x: x, seq=False, wait=True).result()  # no seq_id in these requests
        self.session.run_state.set(a.run_id, op, body)

    async def _aconfigure(self, adapter_name: str | None, op: str, body: dict[str, Any]) -> None:
        a = self._adapter(adapter_name)
        if self.session.run_state.get(a.run_id, op) == body:
            return
        await self._submit(a, op, body, lambda x: x, seq=False, wait="async")
        self.session.run_state.set(a.run_id, op, body)

    def forward_backward_async(
        self, *, inputs: Any, loss_fn: str = "cross_entropy", loss_fn_config: dict[str, Any] | None = None,
        adapter_name: str | None = None,
    ) -> RemoteFuture[ForwardBackwardOutput]:
        return self._fb(inputs, loss_fn, loss_fn_config, adapter_name, forward_only=False)

    def forward_backward(
        self, *, inputs: Any, loss_fn: str = "cross_entropy", loss_fn_config: dict[str, Any] | None = None,
        adapter_name: str | None = None,
    ) -> ForwardBackwardOutput:
        """Forward and backward on the server; gradients accumulate until ``clip_grad_and_step``."""
        return self._fb(inputs, loss_fn, loss_fn_config, adapter_name, forward_only=False, wait=True).result()

    def forward(
        self, *, inputs: Any, loss_fn: str = "cross_entropy", loss_fn_config: dict[str, Any] | None = None,
        adapter_name: str | None = None,
    ) -> ForwardBackwardOutput:
        """Forward only (no gradients); same output shape as ``forward_backward``."""
        return self._fb(inputs, loss_fn, loss_fn_config, adapter_name, forward_only=True, wait=True).result()

    def _fb(self, inputs: Any, loss_fn: str, loss_fn_config: dict[str, Any] | None, adapter_name: str | None,
            *, forward_only: bool, wait: bool | str = False) -> Any:
        a = self._adapter(adapter_name)
        if not forward_only:
            self._stop_at_boundary(a)
            a.in_step = True
        data = to_datums(inputs)
        weight, tokens = loss_weight_and_tokens(data)
        body: dict[str, Any] = {"data": [d.model_dump(mode="json", exclude_none=True) for d in data],
                                "loss_fn": loss_fn}
        if loss_fn_config:
            body["loss_fn_config"] = loss_fn_config

        def parse(result: Any) -> ForwardBackwardOutput:
            out = ForwardBackwardOutput.model_validate(result)
            meter = a.meters.setdefault(not forward_only, [0.0, 0.0, 0])
            meter[0] += float(out.metrics.get("loss:sum", 0.0))
            meter[1] += weight
            meter[2] += tokens
            return out

        return self._submit(a, "forward" if forward_only else "forward_backward", body, parse, wait=wait)

    def _stop_at_boundary(self, a: _Adapter) -> None:
        """A stop request (panel, Stop button, ``%twinkle stop``) ends a plain loop before a new step starts."""
        if a.in_step or not self.session.stop_requested.is_set():
            return
        self.session.clear_stop()
        raise TrainingStopped(
            f"stopped: adapter {a.name!r} of run {a.run_id} at step {a.step} (a Stop was requested; the run is "
            "intact, run the cell again to continue)")

    def clip_grad_and_step(self, adapter_name: str | None = None, adam_params: AdamParams | None = None) -> dict[str, float]:
        """Apply the accumulated gradients (clipped at the optimizer's ``grad_clip_norm``). Returns
        ``{"grad_norm", "lr", "step"}``."""
        return self._optim_step(adapter_name, adam_params, wait=True).result()

    def optim_step_async(self, adapter_name: str | None = None,
                         adam_params: AdamParams | None = None) -> RemoteFuture[dict[str, float]]:
        return self._optim_step(adapter_name, adam_params)

    def _optim_step(self, adapter_name: str | None, adam_params: AdamParams | None, *,
                    wait: bool | str = False) -> Any:
        a = self._adapter(adapter_name)
        body: dict[str, Any] = {}
        if adam_params is not None:
            body["adam_params"] = adam_params.model_dump()

        a.in_step = False

        def parse(result: Any) -> dict[str, float]:
            m = OptimStepResponse.model_validate(result or {}).metrics or {}
            a.step += 1
            out = {"grad_norm": float(m.get("grad_norm:mean", m.get("grad_norm", 0.0))),
                   "lr": float(m.get("lr:mean", m.get("lr", 0.0))),
                   "step": int(m.get("step:max", m.get("step", a.step)))}
            a.step = int(out["step"])
            a.last.update(out)
            return out

        return self._submit(a, "optim_step", body, parse, wait=wait)

    # ---- async twins (``await`` them; two adapters train concurrently with asyncio.gather) -------------------
    async def aforward_backward(
        self, *, inputs: Any, loss_fn: str = "cross_entropy", loss_fn_config: dict[str, Any] | None = None,
        adapter_name: str | None = None,
    ) -> ForwardBackwardOutput:
        """``forward_backward`` without blocking the event loop."""
        return await self._fb(inputs, loss_fn, loss_fn_config, adapter_name, forward_only=False, wait="async")

    async def aforward(
        self, *, inputs: Any, loss_fn: str = "cross_entropy", loss_fn_config: dict[str, Any] | None = None,
        adapter_name: str | None = None,
    ) -> ForwardBackwardOutput:
        return await self._fb(inputs, loss_fn, loss_fn_config, adapter_name, forward_only=True, wait="async")

    async def aclip_grad_and_step(self, adapter_name: str | None = None,
                                  adam_params: AdamParams | None = None) -> dict[str, float]:
        """``clip_grad_and_step`` without blocking the event loop."""
        return await self._optim_step(adapter_name, adam_params, wait="async")

    def calculate_metric(self, is_training: bool = True, adapter_name: str | None = None) -> dict[str, float]:
        """``{"loss"}`` = mean loss per weighted token of the ``forward_backward`` (``is_training``) or
        ``forward`` calls since the last call (then reset), plus ``tokens``, ``step``, ``lr``, ``grad_norm``."""
        a = self._adapter(adapter_name)
        loss, weight, tokens = a.meters.pop(is_training, [0.0, 0.0, 0])
        return {"loss": loss / weight if weight else float("nan"), "tokens": tokens, "step": a.step,
                "lr": a.last.get("lr", float("nan")), "grad_norm": a.last.get("grad_norm", float("nan"))}

    # ---- checkpoints ----------------------------------------------------------------------------------------
    def save(self, name: str, save_optimizer: bool = True, adapter_name: str | None = None, *,
             overwrite: bool = True, ttl_seconds: float | None = None) -> str:
        """Save a checkpoint on the server; returns its ``tinker://<run>/...`` path."""
        a = self._adapter(adapter_name)
        body = _save_body(name, save_optimizer, overwrite, ttl_seconds)
        return self._submit(a, "checkpoints", body, CheckpointInfo.model_validate, wait=True).result().path

    async def asave(self, name: str, save_optimizer: bool = True, adapter_name: str | None = None, *,
                    overwrite: bool = True, ttl_seconds: float | None = None) -> str:
        """``save`` without blocking the event loop."""
        a = self._adapter(adapter_name)
        body = _save_body(name, save_optimizer, overwrite, ttl_seconds)
        return (await self._submit(a, "checkpoints", body, CheckpointInfo.model_validate, wait="async")).path

    def load(self, name_or_path: str, load_optimizer: bool = True, adapter_name: str | None = None) -> LoraConfig:
        """Load a checkpoint (a name of this run or a ``tinker://`` path) into the adapter."""
        a = self._adapter(adapter_name)
        self._submit(a, "load", {"checkpoint": name_or_path, "optimizer": load_optimizer}, lambda x: x,
                     wait=True).result()
        return self._loaded(a, self.session.get_run(a.run_id))

    async def aload(self, name_or_path: str, load_optimizer: bool = True,
                    adapter_name: str | None = None) -> LoraConfig:
        """``load`` without blocking the event loop."""
        a = self._adapter(adapter_name)
        await self._submit(a, "load", {"checkpoint": name_or_path, "optimizer": load_optimizer}, lambda x: x,
                           wait="async")
        return self._loaded(a, await self.session.aio.get_run(a.run_id))

    @staticmethod
    def _loaded(a: _Adapter, run: RunInfo) -> LoraConfig:
        a.run = run
        a.step = run.step
        return run.lora

    def checkpoints(self, adapter_name: str | None = None) -> list[CheckpointInfo]:
        return self.session.checkpoints(self._adapter(adapter_name).run_id)

    async def acheckpoints(self, adapter_name: str | None = None) -> list[CheckpointInfo]:
        return await self.session.aio.checkpoints(self._adapter(adapter_name).run_id)

    # ---- tokenizer ------------------------------------------------------------------------------------------
    def get_tokenizer(self) -> Any:
        """The base model's tokenizer, loaded on this machine (no torch needed) from the server's
        ``tokenizer_id`` or the model's name — see ``twinkle_client.tokenizer``; loaded once."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer_from_candidates([self.base.tokenizer_id, self.base.name],
                                                             vocab_size=self.base.vocab_size)
        return self._tokenizer

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(model_id={self.model_id!r}, server={self.session.url!r}, "
                f"adapters={list(self._adapters)})")


class TransformersModel(RemoteModel):
    backend = "transformers"


class MockModel(RemoteModel):
    backend = "mock"


class MegatronModel(RemoteModel):
    backend = "megatron"
