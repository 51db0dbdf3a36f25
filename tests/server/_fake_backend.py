"""A tiny deterministic Backend for scheduler/worker tests: records every call and can be paused.

Each adapter has one scalar weight ``w``. The loss of a datum is ``w * sum(tokens)``; its gradient
``sum(tokens)`` accumulates until ``optim_step`` applies ``w -= lr * grad``. A datum containing token 13
("poison") makes ``run_batch`` raise before any state changes, as the Backend contract requires.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from twinkle.model.base import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    CHECKPOINT_META,
    Backend,
    BatchItem,
    SampleItem,
)
from twinkle.types import (
    AdamParams,
    ForwardBackwardOutput,
    InvalidInputError,
    LoraConfig,
    LRSchedulerConfig,
    ModelInfo,
    NotFoundError,
    OptimizerConfig,
    SampledSequence,
    SampleResponse,
    TensorData,
)

POISON = 13


class FakeBackend(Backend):
    name = "fake"

    def __init__(self, vocab_size: int = 300, max_length: int = 512) -> None:
        self.vocab_size = vocab_size
        self.max_length = max_length
        self.adapters: dict[str, dict[str, Any]] = {}
        self.calls: list[tuple[Any, ...]] = []
        self.threads: set[str] = set()
        self._pause = threading.Event()
        self._pause.set()  # set = running freely
        self.entered = threading.Event()

    # -- test controls ------------------------------------------------------------------------------------------
    def pause(self) -> None:
        """The next compute call blocks (after setting ``entered``) until ``resume``."""
        self.entered.clear()
        self._pause.clear()

    def resume(self) -> None:
        self._pause.set()

    def _enter(self, *call: Any) -> None:
        self.threads.add(threading.current_thread().name)
        self.calls.append(call)
        self.entered.set()
        self._pause.wait(timeout=10)

    def _get(self, adapter: str | None) -> dict[str, Any]:
        if adapter is None:
            return {"w": 0.0, "grad": 0.0, "steps": 0}
        if adapter not in self.adapters:
            raise NotFoundError(f"no adapter {adapter!r}", field="model_id")
        return self.adapters[adapter]

    # -- Backend ------------------------------------------------------------------------------------------------
    def model_info(self) -> ModelInfo:
        return ModelInfo(model_name="fake", backend="fake", vocab_size=self.vocab_size, max_length=self.max_length,
                         eos_token_ids=[2])

    def add_adapter(self, adapter: str, config: LoraConfig) -> None:
        self.threads.add(threading.current_thread().name)
        self.calls.append(("add_adapter", adapter))
        self.adapters[adapter] = {"w": 1.0, "grad": 0.0, "steps": 0, "lora": config, "lr": 0.1}

    def remove_adapter(self, adapter: str) -> None:
        self.calls.append(("remove_adapter", adapter))
        self.adapters.pop(adapter, None)

    def list_adapters(self) -> list[str]:
        return list(self.adapters)

    def adapter_config(self, adapter: str) -> LoraConfig:
        return self._get(adapter)["lora"]

    def set_optimizer(self, adapter: str, config: OptimizerConfig) -> None:
        self._enter("set_optimizer", adapter, config.lr)
        self._get(adapter)["lr"] = config.lr

    def set_lr_scheduler(self, adapter: str, config: LRSchedulerConfig) -> None:
        self._enter("set_lr_scheduler", adapter)
        self._get(adapter)

    def step_count(self, adapter: str) -> int:
        return self._get(adapter)["steps"]

    def run_batch(self, items: list[BatchItem]) -> list[ForwardBackwardOutput]:
        self._enter("run_batch", [(it.adapter, [d.model_input.to_ints() for d in it.data]) for it in items])
        for it in items:  # validate everything before changing state
            self._get(it.adapter)
            for d in it.data:
                if POISON in d.model_input.to_ints():
                    raise InvalidInputError("poisoned datum", field="data")
        outs = []
        for it in items:
            st = self._get(it.adapter)
            total = 0.0
            per_datum = []
            for d in it.data:
                toks = d.model_input.to_ints()
                total += st["w"] * sum(toks)
                per_datum.append({"logprobs": TensorData.from_numpy([-st["w"] * t for t in toks], "float32")})
                if not it.forward_only and it.adapter is not None:
                    st["grad"] += sum(toks)
            outs.append(ForwardBackwardOutput(loss_fn_outputs=per_datum, metrics={"loss:sum": total}))
        return outs

    def optim_step(self, adapter: str, params: AdamParams | None = None) -> dict[str, float]:
        self._enter("optim_step", adapter)
        st = self._get(adapter)
        lr = params.learning_rate if params is not None else st["lr"]
        grad = st["grad"]
        st["w"] -= lr * grad
        st["grad"] = 0.0
        st["steps"] += 1
        return {"grad_norm:mean": grad, "lr:mean": lr}

    def sample(self, items: list[SampleItem]) -> list[SampleResponse]:
        self._enter("sample", [(it.adapter, list(it.prompt)) for it in items])
        out = []
        for it in items:
            w = self._get(it.adapter)["w"] if it.adapter is not None else 0.0
            seqs = [SampledSequence(stop_reason="length", tokens=[int(w * 10) % self.vocab_size, k])
                    for k in range(it.num_samples)]
            out.append(SampleResponse(sequences=seqs))
        return out

    def save(self, adapter: str, path: Path, *, optimizer: bool = True) -> None:
        self._enter("save", adapter, str(path))
        st = self._get(adapter)
        path.mkdir(parents=True, exist_ok=True)
        lora: LoraConfig = st["lora"]
        (path / ADAPTER_CONFIG).write_text(json.dumps({"r": lora.rank}))
        (path / ADAPTER_WEIGHTS).write_text(json.dumps({"w": st["w"]}))
        meta = {"lora": lora.model_dump(), "step": st["steps"], "backend": "fake"}
        if optimizer:
            meta["grad"] = st["grad"]
        (path / CHECKPOINT_META).write_text(json.dumps(meta))

    def load(self, adapter: str, path: Path, *, optimizer: bool = True) -> LoraConfig:
        self._enter("load", adapter, str(path))
        if not (path / ADAPTER_WEIGHTS).is_file():
            raise NotFoundError("no checkpoint there", field="checkpoint")
        meta = json.loads((path / CHECKPOINT_META).read_text())
        lora = LoraConfig.model_validate(meta["lora"])
        w = json.loads((path / ADAPTER_WEIGHTS).read_text())["w"]
        self.adapters[adapter] = {"w": w, "grad": meta.get("grad", 0.0) if optimizer else 0.0,
                                  "steps": meta["step"] if optimizer else 0, "lora": lora, "lr": 0.1}
        return lora
