"""The local training API: a plain script trains without any server (see ``docs/local-api.md``).

``TwinkleModel`` wraps any ``Backend``; ``TransformersModel``, ``MockModel`` and ``MegatronModel`` pick the
backend. Inputs go through ``twinkle.data.to_datums`` (Datum, Tinker mappings, HF ``input_ids``/``labels``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twinkle.data import loss_weight_and_tokens, to_datums
from twinkle.model.base import Backend, BatchItem
from twinkle.types import (
    AdamParams,
    ForwardBackwardOutput,
    InvalidInputError,
    LoraConfig,
    LRSchedulerConfig,
    OptimizerConfig,
    to_lora_config,
)

_OPTIMIZERS = {"adamw": "adamw", "adam": "adam", "sgd": "sgd"}


@dataclass
class _Meter:
    loss: float = 0.0
    weight: float = 0.0
    tokens: int = 0

    def add(self, out: ForwardBackwardOutput, data: list[Any]) -> None:
        self.loss += float(out.metrics.get("loss:sum", 0.0))
        weight, tokens = loss_weight_and_tokens(data)
        self.weight += weight
        self.tokens += tokens


class TwinkleModel:
    """Methods named as in the reference system; every method takes ``adapter_name=`` (default: current)."""

    def __init__(self, backend: Backend, *, seed: int = 0, output_dir: str | os.PathLike[str] = "twinkle_output") -> None:
        self.backend = backend
        self.seed = seed
        self.output_dir = Path(output_dir)
        self.current_adapter: str | None = None
        self._meters: dict[tuple[str, bool], _Meter] = {}
        self._last_step: dict[str, dict[str, float]] = {}

    # -- adapters & optimizer -----------------------------------------------------------------------------
    def _name(self, adapter_name: str | None) -> str:
        name = adapter_name or self.current_adapter
        if name is None:
            raise InvalidInputError("no adapter yet: call add_adapter_to_model first", field="adapter_name")
        return name

    def add_adapter_to_model(self, adapter_name: str, config: Any = None, **kwargs: Any) -> None:
        cfg = to_lora_config(config, **kwargs)
        if cfg.seed is None:
            cfg = cfg.model_copy(update={"seed": self.seed})
        self.backend.add_adapter(adapter_name, cfg)
        if self.current_adapter is None:
            self.current_adapter = adapter_name

    def set_current_adapter(self, adapter_name: str) -> None:
        self.backend.adapter_config(adapter_name)  # raises NotFoundError for an unknown name
        self.current_adapter = adapter_name

    def remove_adapter(self, adapter_name: str) -> None:
        self.backend.remove_adapter(adapter_name)
        if self.current_adapter == adapter_name:
            rest = self.backend.list_adapters()
            self.current_adapter = rest[0] if rest else None

    def set_optimizer(self, optimizer: str = "AdamW", *, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.95),
                      eps: float = 1e-8, weight_decay: float = 0.0, grad_clip_norm: float = 0.0, momentum: float = 0.0,
                      adapter_name: str | None = None) -> None:
        kind = _OPTIMIZERS.get(str(optimizer).lower())
        if kind is None:
            raise InvalidInputError(f"unknown optimizer {optimizer!r}; one of AdamW, Adam, SGD", field="optimizer")
        cfg = OptimizerConfig(name=kind, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                              grad_clip_norm=grad_clip_norm, momentum=momentum)
        self.backend.set_optimizer(self._name(adapter_name), cfg)

    def set_lr_scheduler(self, scheduler: str = "constant", *, num_warmup_steps: int = 0,
                         num_training_steps: int | None = None, min_lr_ratio: float = 0.0,
                         adapter_name: str | None = None) -> None:
        name = str(scheduler).lower().replace("_schedule", "").replace("_with_warmup", "")
        if name not in ("constant", "linear", "cosine"):
            raise InvalidInputError(f"unknown scheduler {scheduler!r}; one of constant, linear, cosine", field="scheduler")
        cfg = LRSchedulerConfig(name=name, warmup_steps=num_warmup_steps, total_steps=num_training_steps,
                                min_lr_ratio=min_lr_ratio)
        self.backend.set_lr_scheduler(self._name(adapter_name), cfg)

    # -- compute ------------------------------------------------------------------------------------------
    def _run(self, inputs: Any, loss_fn: str, loss_fn_config: dict[str, Any] | None, adapter_name: str | None,
             forward_only: bool) -> ForwardBackwardOutput:
        name = self._name(adapter_name)
        data = to_datums(inputs)
        out = self.backend.run_batch([BatchItem(name, data, loss_fn, loss_fn_config, forward_only)])[0]
        self._meters.setdefault((name, not forward_only), _Meter()).add(out, data)
        return out

    def forward_backward(self, *, inputs: Any, loss_fn: str = "cross_entropy", loss_fn_config: dict[str, Any] | None = None,
                         adapter_name: str | None = None) -> ForwardBackwardOutput:
        return self._run(inputs, loss_fn, loss_fn_config, adapter_name, forward_only=False)

    def forward(self, *, inputs: Any, loss_fn: str = "cross_entropy", loss_fn_config: dict[str, Any] | None = None,
                adapter_name: str | None = None) -> ForwardBackwardOutput:
        return self._run(inputs, loss_fn, loss_fn_config, adapter_name, forward_only=True)

    def clip_grad_and_step(self, *, adapter_name: str | None = None, adam_params: AdamParams | None = None) -> dict[str, float]:
        name = self._name(adapter_name)
        m = self.backend.optim_step(name, adam_params)
        res = {"grad_norm": float(m.get("grad_norm:mean", 0.0)), "lr": float(m.get("lr:mean", 0.0)),
               "step": self.backend.step_count(name)}
        self._last_step[name] = res
        return res

    def calculate_metric(self, is_training: bool = True, *, adapter_name: str | None = None) -> dict[str, float]:
        """Mean loss per weighted token since the last call (then reset), with the latest step's figures."""
        name = self._name(adapter_name)
        meter = self._meters.pop((name, is_training), _Meter())
        last = self._last_step.get(name, {})
        return {"loss": meter.loss / meter.weight if meter.weight else float("nan"), "tokens": meter.tokens,
                "step": self.backend.step_count(name), "lr": last.get("lr", float("nan")),
                "grad_norm": last.get("grad_norm", float("nan"))}

    # -- checkpoints --------------------------------------------------------------------------------------
    def _ckpt_path(self, name: str, adapter: str) -> Path:
        p = Path(name).expanduser()
        if p.is_absolute() or os.sep in name or (p.exists() and p.is_dir()):
            return p
        return self.output_dir / adapter / name

    def save(self, name: str, *, save_optimizer: bool = True, adapter_name: str | None = None) -> str:
        if not isinstance(name, str) or not name:
            raise InvalidInputError("checkpoint name must be a non-empty string", field="name")
        adapter = self._name(adapter_name)
        path = self._ckpt_path(name, adapter)
        self.backend.save(adapter, path, optimizer=save_optimizer)
        return str(path)

    def load(self, name: str, *, load_optimizer: bool = True, adapter_name: str | None = None) -> LoraConfig:
        adapter = adapter_name or self.current_adapter or "default"
        cfg = self.backend.load(adapter, self._ckpt_path(name, adapter), optimizer=load_optimizer)
        if self.current_adapter is None:
            self.current_adapter = adapter
        return cfg

    # -- misc ---------------------------------------------------------------------------------------------
    def get_tokenizer(self) -> Any:
        return self.backend.tokenizer()

    def model_info(self) -> Any:
        return self.backend.model_info()

    def list_adapters(self) -> list[str]:
        return self.backend.list_adapters()

    def close(self) -> None:
        self.backend.close()


class TransformersModel(TwinkleModel):
    """HF transformers + multi-LoRA engine (``twinkle.model.transformers.TransformersBackend``)."""

    def __init__(self, model_id: str = "builtin://tiny", *, seed: int = 0, dtype: str = "float32",
                 device: str | None = None, output_dir: str | os.PathLike[str] = "twinkle_output", **kwargs: Any) -> None:
        import torch

        from twinkle.model.transformers import TransformersBackend

        torch.manual_seed(seed)
        super().__init__(TransformersBackend(model_id, dtype=dtype, device=device, **kwargs), seed=seed,
                         output_dir=output_dir)


class MockModel(TwinkleModel):
    """The numpy mock backend (no torch): a small model that really learns."""

    def __init__(self, model_id: str = "mock://tiny", *, seed: int = 0,
                 output_dir: str | os.PathLike[str] = "twinkle_output", **kwargs: Any) -> None:
        from twinkle.model.mock import MockBackend

        super().__init__(MockBackend(model_id, seed=seed, **kwargs), seed=seed, output_dir=output_dir)


class MegatronModel(TwinkleModel):
    """megatron-core backend (``twinkle.model.megatron``), imported only when used."""

    def __init__(self, model_id: str = "builtin://tiny", *, seed: int = 0,
                 output_dir: str | os.PathLike[str] = "twinkle_output", **kwargs: Any) -> None:
        import importlib

        megatron = importlib.import_module("twinkle.model.megatron")
        backend_cls = getattr(megatron, "MegatronBackend", None)
        if backend_cls is None:
            from twinkle.types import UnsupportedError

            raise UnsupportedError("the megatron backend is not available in this install", field="backend")
        super().__init__(backend_cls(model_id, seed=seed, **kwargs), seed=seed, output_dir=output_dir)
