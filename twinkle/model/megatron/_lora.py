"""Multi-adapter LoRA on megatron-core's linear layers, parametrised exactly like the HF/peft adapters.

Megatron fuses projections that HF keeps apart (q/k/v into ``linear_qkv``, gate/up into ``linear_fc1``).
To keep adapters interchangeable with the transformers backend (same init, same training dynamics, and a
lossless export to peft's HF module names), each fused layer carries one ``LoraPair`` per HF projection and
adds its delta to the rows of the fused output that hold that projection. Row routing (which batch rows use
which adapter) is the transformers backend's ``Routing``; megatron activations are ``[seq, batch, hidden]``,
so rows are dimension 1 here.
"""

from __future__ import annotations

import torch
from torch import nn

from twinkle.model.transformers._lora import LoraPair, Routing

from .convert import Geometry, qkv_slices

# megatron module suffix → the HF projections it fuses (None: the whole output is one projection)
FUSED = {
    "self_attention.linear_qkv": ("q_proj", "k_proj", "v_proj"),
    "self_attention.linear_proj": ("o_proj",),
    "mlp.linear_fc1": ("gate_proj", "up_proj"),
    "mlp.linear_fc2": ("down_proj",),
}
HF_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
             "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def output_rows(g: Geometry) -> dict[str, torch.Tensor | None]:
    """Where each HF projection's outputs live in its fused megatron layer (None = all rows)."""
    rows: dict[str, torch.Tensor | None] = dict(qkv_slices(g))
    rows["gate_proj"] = torch.arange(0, g.ffn)
    rows["up_proj"] = torch.arange(g.ffn, 2 * g.ffn)
    for name in ("o_proj", "down_proj", "lm_head"):
        rows[name] = None
    return rows


class MegatronMultiLora(nn.Module):
    """Wraps a megatron Column/RowParallelLinear (which returns ``(out, bias)``)."""

    def __init__(self, base: nn.Module, parts: tuple[str, ...], rows: dict[str, torch.Tensor | None],
                 routing_ref: list[Routing | None], *, in_features: int, out_features: int) -> None:
        super().__init__()
        self.base = base
        self.in_features = in_features
        self.out_features = out_features
        self.parts = parts
        self._rows = {p: rows[p] for p in parts}
        self.adapters = nn.ModuleDict()  # adapter name -> ModuleDict(part -> LoraPair)
        self._routing = routing_ref

    def part_out_features(self, part: str) -> int:
        r = self._rows[part]
        return self.out_features if r is None else int(r.numel())

    def add(self, adapter: str, pairs: dict[str, LoraPair]) -> None:
        self.adapters[adapter] = nn.ModuleDict(pairs)

    def _delta(self, name: str, x: torch.Tensor, out_shape: torch.Size, train: bool) -> torch.Tensor | None:
        if name not in self.adapters:
            return None
        pairs = self.adapters[name]
        if len(self.parts) == 1 and self._rows[self.parts[0]] is None:
            p = self.parts[0]
            return pairs[p](x, train) if p in pairs else None
        delta = x.new_zeros(out_shape)
        for p, pair in pairs.items():
            delta[..., self._rows[p].to(x.device)] = pair(x, train)
        return delta

    def forward(self, x: torch.Tensor, *args, **kwargs):
        out, bias = self.base(x, *args, **kwargs)
        routing = self._routing[0]
        if routing is None or not self.adapters:
            return out, bias
        segs = routing.segments
        deltas: list[torch.Tensor] = []
        any_lora = False
        for start, end, name in segs:
            xs = x[:, start:end]
            shape = (*out.shape[:1], end - start, *out.shape[2:])
            d = self._delta(name, xs, torch.Size(shape), routing.dropout) if name is not None else None
            if d is None:
                d = out.new_zeros(shape)
            else:
                any_lora = True
            deltas.append(d)
        if not any_lora:
            return out, bias
        return out + torch.cat(deltas, dim=1), bias
