"""One LoRA adapter's state: which modules it targets, its factors, optimizer, LR schedule and step."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from twinkle.types import InvalidInputError, LoraConfig, LRSchedulerConfig, OptimizerConfig

from ._lora import LoraPair

ATTN_KEYS = ("attn", "attention")
MLP_KEYS = ("mlp", "feed_forward", "ffn")


def resolve_targets(config: LoraConfig, candidates: list[str], unembed: str | None) -> list[str]:
    """Module names (in model order) that ``config`` puts LoRA on, from the wrapped linear ``candidates``."""
    tm = config.target_modules
    if tm is None or tm == "all-linear":
        chosen = []
        for name in candidates:
            parts = name.split(".")
            if name == unembed:
                ok = config.train_unembed
            elif any(k in p for p in parts for k in ATTN_KEYS):
                ok = config.train_attn
            elif any(k in p for p in parts for k in MLP_KEYS):
                ok = config.train_mlp
            else:
                ok = False
            if ok:
                chosen.append(name)
    else:
        suffixes = [tm] if isinstance(tm, str) else list(tm)
        chosen = []
        for s in suffixes:
            if not isinstance(s, str) or not s:
                raise InvalidInputError(f"target_modules entry {s!r} is not a module name", field="lora.target_modules")
            hits = [n for n in candidates if n == s or n.endswith("." + s)]
            if not hits:
                raise InvalidInputError(
                    f"target_modules entry {s!r} matches no linear layer of the model", field="lora.target_modules"
                )
            chosen.extend(hits)
        chosen = [n for n in candidates if n in set(chosen)]
    if not chosen:
        raise InvalidInputError("this LoRA config targets no layer (all train_* flags off?)", field="lora")
    return chosen


def peft_target_modules(config: LoraConfig, modules: list[str]) -> list[str]:
    """``target_modules`` for adapter_config.json: peft matches each entry as a module-name suffix."""
    tm = config.target_modules
    if isinstance(tm, list):
        return list(tm)
    if isinstance(tm, str) and tm != "all-linear":
        return [tm]
    return sorted({m.rsplit(".", 1)[-1] for m in modules})


@dataclass
class AdapterState:
    name: str
    config: LoraConfig
    modules: list[str]
    pairs: dict[str, LoraPair]
    opt_config: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: LRSchedulerConfig | None = None
    step: int = 0
    optimizer: torch.optim.Optimizer | None = None

    def parameters(self) -> list[torch.nn.Parameter]:
        out: list[torch.nn.Parameter] = []
        for m in self.modules:
            out.extend((self.pairs[m].lora_A, self.pairs[m].lora_B))
        return out

    def make_optimizer(self) -> None:
        c = self.opt_config
        params = self.parameters()
        if c.name == "sgd":
            self.optimizer = torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)
        elif c.name == "adam":
            self.optimizer = torch.optim.Adam(params, lr=c.lr, betas=c.betas, eps=c.eps, weight_decay=c.weight_decay)
        else:
            self.optimizer = torch.optim.AdamW(params, lr=c.lr, betas=c.betas, eps=c.eps, weight_decay=c.weight_decay)
