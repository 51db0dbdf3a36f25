"""Data-parallel rows and gradients, and TP-sliced adapter state, for ``MegatronBackend``.

Data parallelism (DP size M): each DP rank runs the forward/backward of a contiguous slice of the batch rows.
The per-row logprobs are all-gathered (``gather_rows``), so every rank evaluates the same losses on the whole
batch, exactly as at DP 1, whatever the loss normalisation; the gather's backward keeps only this rank's rows.
The LoRA gradients, each the contribution of this rank's rows to the same total loss, are then **summed** across
DP ranks before the optimizer step (``allreduce_grads``), which gives the DP-1 gradient. Optimizer state is
replicated across DP ranks (same gradients, same steps).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from twinkle.model.transformers._adapter import AdapterState

from ._lora import SHARDED_ATTR, PartShard, gather_tensor, is_sharded, shard_pair, shard_tensor


def row_range(rows: int, dp: int, dp_rank: int) -> tuple[int, int, int]:
    """``(start, end, per_rank)``: this DP rank's contiguous slice of ``rows`` (may be empty)."""
    per = -(-rows // dp)
    start = min(rows, dp_rank * per)
    return start, min(rows, start + per), per


def slice_segments(segments: list[tuple[int, int, Any]], start: int, end: int) -> list[tuple[int, int, Any]]:
    out = []
    for s, e, a in segments:
        lo, hi = max(s, start), min(e, end)
        if hi > lo:
            out.append((lo - start, hi - start, a))
    return out


class _GatherRows(torch.autograd.Function):
    """All-gather ``[per_rank, width]`` along rows; backward returns this rank's rows of the gradient (every
    rank computes the same loss from the gathered rows, so that gradient is already complete)."""

    @staticmethod
    def forward(ctx: Any, local: torch.Tensor, group: Any, dp_rank: int, dp: int) -> torch.Tensor:
        import torch.distributed as dist

        ctx.dp_rank, ctx.per = dp_rank, local.shape[0]
        pieces = [torch.empty_like(local) for _ in range(dp)]
        dist.all_gather(pieces, local.contiguous(), group=group)
        return torch.cat(pieces, 0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        s = ctx.dp_rank * ctx.per
        return grad[s: s + ctx.per], None, None, None


def gather_rows(local: list[torch.Tensor], shapes: list[tuple[int, ...]], per: int, group: Any, dp_rank: int,
                dp: int, device: torch.device) -> list[torch.Tensor]:
    """Every DP rank's per-row tensors (``local``: this rank's rows) → all rows, shaped ``shapes``."""
    width = max(int(np.prod(s)) for s in shapes)
    rows = [torch.nn.functional.pad(t.reshape(-1).float(), (0, width - t.numel())) for t in local]
    rows += [torch.zeros(width, device=device)] * (per - len(rows))
    full = _GatherRows.apply(torch.stack(rows), group, dp_rank, dp)
    return [full[r, : int(np.prod(s))].reshape(s) for r, s in enumerate(shapes)]


def allreduce_grads(params: list[torch.nn.Parameter], group: Any) -> None:
    """Sum gradients over ``group``; a parameter with no gradient on any rank keeps none (as at DP 1)."""
    import torch.distributed as dist

    if not params:
        return
    device = params[0].device
    has = torch.tensor([0.0 if p.grad is None else 1.0 for p in params], device=device)
    dist.all_reduce(has, group=group)
    live = [p for p, h in zip(params, has.tolist(), strict=True) if h > 0]
    if not live:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in live])
    dist.all_reduce(flat, group=group)
    off = 0
    for p in live:
        n = p.numel()
        p.grad = flat[off: off + n].view_as(p).clone()
        off += n


def global_grad_norm(grads_params: list[torch.nn.Parameter], tp_group: Any, tp: int) -> float:
    """L2 norm of all gradients of the full (unsliced) adapter: TP slices are summed over the TP group."""
    import torch.distributed as dist

    sharded = torch.zeros((), dtype=torch.float64)
    replicated = torch.zeros((), dtype=torch.float64)
    for p in grads_params:
        sq = torch.linalg.vector_norm(p.grad).double().cpu() ** 2
        if getattr(p, SHARDED_ATTR, False):
            sharded += sq
        else:
            replicated += sq
    if tp > 1:
        t = sharded.to(grads_params[0].device if grads_params else "cpu")
        dist.all_reduce(t, group=tp_group)
        sharded = t.cpu()
    return float(torch.sqrt(sharded + replicated))


def _factor(st: AdapterState, index: int) -> tuple[str, str]:
    """The (module, "A"|"B") of optimizer parameter ``index`` (``AdapterState.parameters`` order)."""
    return st.modules[index // 2], "AB"[index % 2]


def shard_state(st: AdapterState, shard_of: Any) -> None:
    """Slice a full-size adapter (factors and optimizer state) in place to this TP rank's part."""
    sd = st.optimizer.state_dict() if st.optimizer is not None else None
    for m in st.modules:
        shard_pair(st.pairs[m], shard_of(m))
    st.make_optimizer()
    if sd is not None and sd["state"]:
        for i, state in list(sd["state"].items()):
            m, factor = _factor(st, int(i))
            shard = shard_of(m)
            state = sd["state"][i] = dict(state)  # state_dict() shares the optimizer's per-parameter dicts
            for k, v in list(state.items()):
                if isinstance(v, torch.Tensor) and v.ndim > 0:
                    state[k] = shard_tensor(v, factor, shard)
        assert st.optimizer is not None
        st.optimizer.load_state_dict(sd)


class _StateDict:
    def __init__(self, sd: dict[str, Any]) -> None:
        self._sd = sd

    def state_dict(self) -> dict[str, Any]:
        return self._sd


def full_state(st: AdapterState, shards_of: Any, tp_rank: int, group: Any) -> AdapterState:
    """A read-only full-size copy of a TP-sliced adapter (factors and optimizer state), gathered from every TP
    rank (a collective), in exactly the form ``_checkpoint.save`` writes at TP 1."""
    pairs: dict[str, Any] = {}
    for m in st.modules:
        shards: list[PartShard] = shards_of(m)
        pair = st.pairs[m]
        pairs[m] = SimpleNamespace(
            lora_A=gather_tensor(pair.lora_A.detach(), "A", shards, tp_rank, group),
            lora_B=gather_tensor(pair.lora_B.detach(), "B", shards, tp_rank, group),
        )
    optimizer = None
    if st.optimizer is not None:
        sd = st.optimizer.state_dict()
        for i, state in list(sd["state"].items()):
            m, factor = _factor(st, int(i))
            shards = shards_of(m)
            if not is_sharded(factor, shards[tp_rank]):
                continue
            state = sd["state"][i] = dict(state)  # state_dict() shares the optimizer's per-parameter dicts
            for k, v in list(state.items()):
                if isinstance(v, torch.Tensor) and v.ndim > 0:
                    state[k] = gather_tensor(v, factor, shards, tp_rank, group)
        optimizer = _StateDict(sd)
    return AdapterState(st.name, st.config, list(st.modules), pairs, opt_config=st.opt_config,
                        scheduler=st.scheduler, step=st.step, optimizer=optimizer)
