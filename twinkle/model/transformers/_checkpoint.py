"""Checkpoints in the peft adapter format plus the full training state for an exact resume."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Protocol

import torch

from twinkle.model.base import ADAPTER_CONFIG, ADAPTER_WEIGHTS, CHECKPOINT_META
from twinkle.types import InvalidInputError, LoraConfig, LRSchedulerConfig, NotFoundError, OptimizerConfig

from ._adapter import AdapterState, peft_target_modules


class CheckpointHost(Protocol):
    """What saving and loading need of a backend (``TransformersBackend`` and its subclasses are one); a
    protocol, so that this module does not import the backend that imports it."""

    name: str
    model_id: str
    path: Path
    _layers: dict[str, Any]  # module name -> MultiLoraLinear
    _adapters: dict[str, AdapterState]

    def add_adapter(self, adapter: str, config: LoraConfig, *, _modules: list[str] | None = None) -> None: ...

    def remove_adapter(self, adapter: str) -> None: ...

TRAINING_STATE = "training_state.pt"
_PREFIX = "base_model.model."


def _atomic_write(path: Path, write: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save(backend: CheckpointHost, st: AdapterState, path: Path, *, optimizer: bool) -> None:
    from peft import LoraConfig as PeftLoraConfig
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for m in st.modules:
        pair = st.pairs[m]
        tensors[f"{_PREFIX}{m}.lora_A.weight"] = pair.lora_A.detach().cpu().contiguous()
        tensors[f"{_PREFIX}{m}.lora_B.weight"] = pair.lora_B.detach().cpu().contiguous()
    _atomic_write(path / ADAPTER_WEIGHTS, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    pc = PeftLoraConfig(r=st.config.rank, lora_alpha=st.config.lora_alpha, lora_dropout=st.config.dropout,
                        target_modules=peft_target_modules(st.config, st.modules), bias="none", task_type="CAUSAL_LM",
                        base_model_name_or_path=str(backend.path))
    cfg = pc.to_dict()
    cfg = {k: (sorted(v) if isinstance(v, set) else v) for k, v in cfg.items()}
    cfg["peft_type"] = "LORA"
    cfg["task_type"] = "CAUSAL_LM"
    _atomic_write(path / ADAPTER_CONFIG, lambda p: p.write_text(json.dumps(cfg, indent=2, default=str)))
    meta = {"base_model": backend.model_id, "lora": st.config.model_dump(), "step": st.step,
            "backend": backend.name, "modules": st.modules}
    if optimizer:
        state = {
            "optimizer": st.optimizer.state_dict() if st.optimizer is not None else None,
            "optimizer_config": st.opt_config.model_dump(),
            "scheduler": st.scheduler.model_dump() if st.scheduler is not None else None,
            "step": st.step,
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        }
        _atomic_write(path / TRAINING_STATE, lambda p: torch.save(state, str(p)))
    _atomic_write(path / CHECKPOINT_META, lambda p: p.write_text(json.dumps(meta, indent=2)))


def _read_config(path: Path) -> tuple[LoraConfig, list[str] | None]:
    meta_p, cfg_p = path / CHECKPOINT_META, path / ADAPTER_CONFIG
    if meta_p.is_file():
        meta = json.loads(meta_p.read_text())
        return LoraConfig.model_validate(meta["lora"]), meta.get("modules")
    pc = json.loads(cfg_p.read_text())
    tm = pc.get("target_modules")
    return LoraConfig(rank=int(pc.get("r", 8)), alpha=float(pc.get("lora_alpha", 8)),
                      dropout=float(pc.get("lora_dropout", 0.0)),
                      target_modules=sorted(tm) if isinstance(tm, list) else tm), None


def load(backend: CheckpointHost, adapter: str, path: Path, *, optimizer: bool) -> LoraConfig:
    from safetensors.torch import load_file

    if not (path / ADAPTER_WEIGHTS).is_file() or not (path / ADAPTER_CONFIG).is_file():
        raise NotFoundError(f"no adapter checkpoint at {str(path)!r}", field="path")
    config, modules = _read_config(path)
    raw = load_file(str(path / ADAPTER_WEIGHTS))
    weights: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in raw.items():
        name = k[len(_PREFIX):] if k.startswith(_PREFIX) else k
        for part in ("lora_A", "lora_B"):
            marker = f".{part}."
            if marker in name:
                mod = name.split(marker)[0]
                weights.setdefault(mod, {})[part] = v
    if modules is None:
        modules = [m for m in backend._layers if m in weights]
    if set(modules) != set(weights) or any(len(w) != 2 for w in weights.values()):
        raise InvalidInputError("adapter weights do not match the checkpoint's module list", field="path")
    for m in modules:
        base = backend._layers[m].base if m in backend._layers else None
        if base is None:
            raise InvalidInputError(f"checkpoint module {m!r} is not in this model", field="path")
        a, b = weights[m]["lora_A"], weights[m]["lora_B"]
        if a.shape != (config.rank, base.in_features) or b.shape != (base.out_features, config.rank):
            raise InvalidInputError(f"checkpoint weight shapes for {m!r} do not fit the model", field="path")
    has_state = (path / TRAINING_STATE).is_file()
    state = torch.load(str(path / TRAINING_STATE), map_location="cpu", weights_only=False) if optimizer and has_state else None
    old = backend._adapters.get(adapter)
    if old is not None:
        backend.remove_adapter(adapter)
    try:
        backend.add_adapter(adapter, config, _modules=modules)
    except Exception:
        if old is not None:  # put the previous adapter back untouched
            for m in old.modules:
                backend._layers[m].adapters[adapter] = old.pairs[m]
            backend._adapters[adapter] = old
        raise
    st = backend._adapters[adapter]
    with torch.no_grad():
        for m in modules:
            st.pairs[m].lora_A.copy_(weights[m]["lora_A"])
            st.pairs[m].lora_B.copy_(weights[m]["lora_B"])
    if state is not None:
        st.opt_config = OptimizerConfig.model_validate(state["optimizer_config"])
        st.make_optimizer()
        if state["optimizer"] is not None:
            assert st.optimizer is not None  # made just above
            st.optimizer.load_state_dict(state["optimizer"])
        st.scheduler = LRSchedulerConfig.model_validate(state["scheduler"]) if state["scheduler"] else None
        st.step = int(state["step"])
        rng = state.get("rng") or {}
        if rng.get("torch") is not None:
            torch.set_rng_state(rng["torch"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    return config
