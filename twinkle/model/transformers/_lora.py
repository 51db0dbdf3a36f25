"""A linear layer that carries many LoRA adapters and applies each to its own rows of the batch.

The backend wraps every candidate ``nn.Linear`` of the base model in a ``MultiLoraLinear``. Before a
forward pass it sets a *routing*: a list of ``(start, end, adapter_name | None)`` row segments that cover
the batch in order. Each adapter's ``B @ A`` update is added only to its segment, so one pass serves rows of
different adapters and each adapter's gradients come only from its own rows (exactly as separate passes).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import _decode

Segment = tuple[int, int, "str | None"]


@dataclass
class Routing:
    """Row segments of the current batch; shared by every ``MultiLoraLinear`` of one model."""

    segments: list[Segment]
    dropout: bool = False  # apply LoRA dropout (training passes only)
    infer: bool = False  # a no-grad sampling pass: base layers may use their packed weight (``_decode``)
    merged: str | None = None  # (infer, one segment) layers holding this adapter's merged weights use them


class RoutingSlot:
    """Where the layers read the current routing (``slot[0]``). Shared by one model's layers; with
    ``per_thread`` each thread sees its own value, so a sampling pass on one thread and a training pass on
    another route their rows independently (see the scheduler's concurrent sampling)."""

    def __init__(self) -> None:
        self.per_thread = False
        self._shared: Routing | None = None
        self._local = threading.local()

    def __getitem__(self, index: int) -> Routing | None:
        if self.per_thread:
            return getattr(self._local, "value", None)
        return self._shared

    def __setitem__(self, index: int, value: Routing | None) -> None:
        if self.per_thread:
            self._local.value = value
        else:
            self._shared = value


class LoraPair(nn.Module):
    """One adapter's factors on one linear layer: ``delta(x) = scale * B(A(dropout(x)))``."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, dropout: float,
                 *, dtype: torch.dtype, device: torch.device, generator: torch.Generator) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(in_features)  # kaiming_uniform(a=sqrt(5)), as peft initialises A
        a = (torch.rand(rank, in_features, generator=generator, dtype=torch.float32) * 2 - 1) * bound
        self.lora_A = nn.Parameter(a.to(device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, device=device, dtype=dtype))
        self.rank = rank
        self.scale = alpha / rank
        self.dropout = dropout

    def forward(self, x: torch.Tensor, train: bool) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(self.lora_A.dtype)  # LoRA factors may be kept in float32 under a bf16/fp16 base model
        if self.dropout > 0.0 and train:
            x = F.dropout(x, self.dropout, training=True)
        return (F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale).to(dtype)

    def add_to(self, out: torch.Tensor, x: torch.Tensor, train: bool, inplace: bool = False) -> torch.Tensor:
        """``out + forward(x)`` with the scale fused into the addition; ``inplace`` (no-grad passes whose ``out``
        is a fresh contiguous product): added into ``out`` by one ``addmm_`` (two operations instead of three)."""
        if x.dtype != self.lora_A.dtype:
            return out + self.forward(x, train)
        if inplace and out.is_contiguous() and out.dtype == x.dtype:
            flat = out.view(-1, out.shape[-1])
            flat.addmm_(F.linear(x.reshape(-1, x.shape[-1]), self.lora_A), self.lora_B.t(), alpha=self.scale)
            return out
        if self.dropout > 0.0 and train:
            x = F.dropout(x, self.dropout, training=True)
        return torch.add(out, F.linear(F.linear(x, self.lora_A), self.lora_B), alpha=self.scale)


class MultiLoraLinear(nn.Module):
    """``base(x)`` plus, for each row segment, that segment's adapter update (none for ``None``)."""

    def __init__(self, base: nn.Linear, routing_ref: RoutingSlot | list[Routing | None], unit: int = 1) -> None:
        super().__init__()
        self.base = base
        self.adapters = nn.ModuleDict()
        self._routing = routing_ref  # one slot (``[0]``) shared by all layers of the model
        self.unit = unit  # segments count rows of `unit` input rows each (vision mergers: merge_size**2 patches)
        self.packed: torch.Tensor | None = None  # the base weight laid out for inference (``_decode.pack_all``)
        self.merged: dict[str, torch.Tensor] = {}  # adapter -> W + scale*B@A, laid out so (``_decode.Merged``)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routing = self._routing[0]
        if self.packed is not None and routing is not None and routing.infer:
            m = self.merged.get(routing.merged) if routing.merged is not None else None
            if m is not None:
                return _decode.linear(x, m, self.base.bias)
            out = _decode.linear(x, self.packed, self.base.bias, self.base.weight)
        else:
            out = self.base(x)
        if routing is None or not self.adapters:
            return out
        segs = routing.segments
        if self.unit != 1:
            segs = [(a // self.unit, b // self.unit, n) for a, b, n in segs]
        if len(segs) == 1:
            name = segs[0][2]
            if name is None or name not in self.adapters:
                return out
            return self.adapters[name].add_to(out, x, routing.dropout, inplace=routing.infer)
        if routing.infer and out.is_contiguous():  # each segment's update added into its rows of `out`
            for start, end, name in segs:
                if name is not None and name in self.adapters:
                    self.adapters[name].add_to(out[start:end], x[start:end], False, inplace=True)
            return out
        deltas: list[torch.Tensor] = []
        any_lora = False
        for start, end, name in segs:
            pair = self.adapters[name] if name is not None and name in self.adapters else None
            if pair is None:
                deltas.append(out.new_zeros((end - start, *out.shape[1:])))
            else:
                deltas.append(pair(x[start:end], routing.dropout))
                any_lora = True
        if not any_lora:
            return out
        return out + torch.cat(deltas, dim=0)
