"""Multi-adapter LoRA on megatron-core's linear layers, parametrised exactly like the HF/peft adapters.

Megatron fuses projections that HF keeps apart (q/k/v into ``linear_qkv``, gate/up into ``linear_fc1``).
To keep adapters interchangeable with the transformers backend (same init, same training dynamics, and a
lossless export to peft's HF module names), each fused layer carries one ``LoraPair`` per HF projection and
adds its delta to the rows of the fused output that hold that projection. Row routing (which batch rows use
which adapter) is the transformers backend's ``Routing``; megatron activations are ``[seq, batch, hidden]``,
so rows are dimension 1 here.

Tensor parallelism (TP size N, this rank r; ``part_shards``):

* column-parallel layers (``linear_qkv``, ``linear_fc1``) output only rank r's rows. LoRA A is replicated,
  B holds the HF output rows of this rank. ``A·x`` goes through megatron's ``copy_to_tensor_model_parallel_region``
  (identity forward, all-reduce backward) so the gradients of A and of x are the full ones on every rank;
* row-parallel layers (``linear_proj``, ``linear_fc2``) see only rank r's input columns and all-reduce their
  output. LoRA A holds this rank's input columns, B is replicated; the partial ``A_r·x_r`` (rank-sized, far
  smaller than the layer's hidden-sized output) is all-reduced before B;
* the output layer gathers the vocabulary (``parallel_output=False``), so an lm_head adapter is replicated.

Adapters are created full-size from the seeded generator (exactly as with TP 1) and then sliced, so TP N
reproduces TP 1; checkpoints gather the slices back (``gather_tensor``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from twinkle.model.transformers._lora import LoraPair, Routing, RoutingSlot

from .convert import Geometry, padded_vocab, qkv_slices

# megatron module suffix → the HF projections it fuses (None: the whole output is one projection)
FUSED = {
    "self_attention.linear_qkv": ("q_proj", "k_proj", "v_proj"),
    "self_attention.linear_proj": ("o_proj",),
    "mlp.linear_fc1": ("gate_proj", "up_proj"),
    "mlp.linear_fc2": ("down_proj",),
}
HF_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
             "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
SHARDED_ATTR = "twinkle_tp_sharded"  # set on LoRA parameters that hold a TP slice


@dataclass(frozen=True)
class PartShard:
    """Where one HF projection lives on this TP rank.

    ``kind``: ``col`` (B holds HF output rows ``keep``), ``row`` (A holds input columns ``keep``) or ``rep``
    (replicated). ``out_rows``: positions of the part's local outputs in the layer's local output (None: all).
    """

    kind: str
    out_rows: torch.Tensor | None
    keep: torch.Tensor | None


def _set(index: torch.Tensor | None) -> torch.Tensor:
    """An index a sharded part always has (``keep`` of a col/row shard; ``out_rows`` of a fused layer's part)."""
    assert index is not None
    return index


def output_rows(g: Geometry) -> dict[str, torch.Tensor | None]:
    """Where each HF projection's outputs live in its fused megatron layer at TP 1 (None = all rows)."""
    return {n: s.out_rows for n, s in part_shards(g, 1, 0).items()}


def part_shards(g: Geometry, tp: int, rank: int) -> dict[str, PartShard]:
    out: dict[str, PartShard] = {}
    qkv_rows = (g.heads + 2 * g.groups) * g.head_dim
    lo, hi = rank * qkv_rows // tp, (rank + 1) * qkv_rows // tp
    for name, rows in qkv_slices(g).items():
        mine = (rows >= lo) & (rows < hi)
        out[name] = PartShard("col", rows[mine] - lo, torch.nonzero(mine).flatten())
    f = g.ffn // tp
    keep = torch.arange(rank * f, (rank + 1) * f)
    out["gate_proj"] = PartShard("col", torch.arange(0, f), keep)
    out["up_proj"] = PartShard("col", torch.arange(f, 2 * f), keep)
    c = g.heads * g.head_dim // tp
    out["o_proj"] = PartShard("row", None, torch.arange(rank * c, (rank + 1) * c))
    out["down_proj"] = PartShard("row", None, keep)
    out["lm_head"] = PartShard("rep", None if padded_vocab(g, tp) == g.vocab else torch.arange(g.vocab), None)
    return out


def shard_tensor(t: torch.Tensor, factor: str, shard: PartShard) -> torch.Tensor:
    """This rank's slice of a full-size LoRA factor (``factor`` is ``"A"`` or ``"B"``) or of its optimizer state."""
    if shard.kind == "col" and factor == "B":
        return t[_set(shard.keep).to(t.device)].contiguous()
    if shard.kind == "row" and factor == "A":
        return t[:, _set(shard.keep).to(t.device)].contiguous()
    return t


def is_sharded(factor: str, shard: PartShard) -> bool:
    return (shard.kind, factor) in (("col", "B"), ("row", "A"))


def gather_tensor(t: torch.Tensor, factor: str, shards: list[PartShard], rank: int, group: Any) -> torch.Tensor:
    """The full-size factor from every TP rank's slice (``shards[r]`` is rank r's layout); a collective."""
    import torch.distributed as dist

    shard = shards[rank]
    if not is_sharded(factor, shard):
        return t
    pieces = [torch.empty_like(t) for _ in shards]
    dist.all_gather(pieces, t.contiguous(), group=group)
    if factor == "A":  # row-parallel: columns, in rank order
        return torch.cat(pieces, dim=1)
    rows = sum(p.shape[0] for p in pieces)
    full = t.new_empty(rows, *t.shape[1:])
    for s, p in zip(shards, pieces, strict=True):
        full[_set(s.keep).to(t.device)] = p
    return full


def shard_pair(pair: LoraPair, shard: PartShard) -> None:
    """Slice a full-size pair in place to this rank's part (TP > 1)."""
    for factor in ("A", "B"):
        if is_sharded(factor, shard):
            attr = f"lora_{factor}"
            p = nn.Parameter(shard_tensor(getattr(pair, attr).detach(), factor, shard).clone())
            setattr(p, SHARDED_ATTR, True)
            setattr(pair, attr, p)


class MegatronMultiLora(nn.Module):
    """Wraps a megatron Column/RowParallelLinear (which returns ``(out, bias)``)."""

    def __init__(self, base: nn.Module, parts: tuple[str, ...], shards: dict[str, PartShard],
                 routing_ref: RoutingSlot | list[Routing | None], *, in_features: int, out_features: dict[str, int], tp: int = 1) -> None:
        super().__init__()
        self.base = base
        self.in_features = in_features  # full (TP 1) sizes: what the HF-named adapters see
        self._out_features = out_features
        self.parts = parts
        self.shards = {p: shards[p] for p in parts}
        self.tp = tp
        self.adapters = nn.ModuleDict()  # adapter name -> ModuleDict(part -> LoraPair)
        self._routing = routing_ref

    def part_out_features(self, part: str) -> int:
        return self._out_features[part]

    def add(self, adapter: str, pairs: dict[str, LoraPair]) -> None:
        self.adapters[adapter] = nn.ModuleDict(pairs)

    def _pair_delta(self, part: str, pair: LoraPair, x: torch.Tensor, train: bool) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(pair.lora_A.dtype)
        if pair.dropout > 0.0 and train:
            x = F.dropout(x, pair.dropout, training=True)
        z = F.linear(x, pair.lora_A)
        if self.tp > 1:
            from megatron.core.tensor_parallel.mappings import (
                copy_to_tensor_model_parallel_region,
                reduce_from_tensor_model_parallel_region,
            )

            kind = self.shards[part].kind
            if kind == "col":
                z = copy_to_tensor_model_parallel_region(z)
            elif kind == "row":
                z = reduce_from_tensor_model_parallel_region(z)
        return (F.linear(z, pair.lora_B) * pair.scale).to(dtype)

    def _delta(self, name: str, x: torch.Tensor, out_shape: torch.Size, train: bool) -> torch.Tensor | None:
        if name not in self.adapters:
            return None
        pairs = self.adapters[name]
        if len(self.parts) == 1 and self.shards[self.parts[0]].out_rows is None:
            p = self.parts[0]
            return self._pair_delta(p, pairs[p], x, train) if p in pairs else None
        delta = x.new_zeros(out_shape)
        for p, pair in pairs.items():
            delta[..., _set(self.shards[p].out_rows).to(x.device)] = self._pair_delta(p, pair, x, train)
        return delta

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, Any]:
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
