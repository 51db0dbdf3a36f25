"""Batched generation with a KV cache over rows that may use different adapters.

The engine is model-agnostic: the backend passes a ``forward`` callback that runs its model on
``(input_ids, attention_mask, position_ids, cache, segments)`` and returns ``(logits, cache)``, where
``segments`` routes each row range to an adapter (see ``twinkle.model.transformers._lora``).
Prompts of different lengths are left-padded. Each request draws its random numbers from its own
generator seeded by ``SamplingParams.seed``, so the same seed gives the same samples.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from twinkle.model.base import SampleItem
from twinkle.types import InvalidInputError, SampledSequence, SampleResponse
from twinkle.types.params import DEFAULT_MAX_TOKENS

ForwardFn = Callable[
    [torch.Tensor, "torch.Tensor | None", torch.Tensor, Any, list[tuple[int, int, "str | None"]]],
    tuple[torch.Tensor, Any],
]


@dataclass
class _Row:
    item: int
    stop_ids: set[int]
    stop_strs: list[str]
    max_tokens: int
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    reason: str | None = None


def _stops(item: SampleItem, eos_ids: list[int], vocab_size: int) -> tuple[set[int], list[str]]:
    stop = item.params.stop
    if stop is None:
        return set(eos_ids), []
    if isinstance(stop, str):
        stop = [stop]
    if len(stop) == 0:
        return set(), []
    ids, strs = set(eos_ids), []
    for s in stop:
        if isinstance(s, str):
            if s:
                strs.append(s)
        elif isinstance(s, int) and 0 <= s < vocab_size:
            ids.add(int(s))
        else:
            raise InvalidInputError(f"stop entry {s!r} is neither a string nor a token id", field="sampling_params.stop")
    return ids, strs


def validate_sample_items(items: list[SampleItem], adapters: set[str], vocab_size: int, max_length: int) -> None:
    from twinkle.types import NotFoundError

    if not items:
        raise InvalidInputError("no sampling request", field="prompt")
    for it in items:
        if it.adapter is not None and it.adapter not in adapters:
            raise NotFoundError(f"unknown adapter {it.adapter!r}", field="adapter")
        if not it.prompt:
            raise InvalidInputError("prompt is empty", field="prompt")
        if min(it.prompt) < 0 or max(it.prompt) >= vocab_size:
            raise InvalidInputError(f"prompt has a token id outside the vocabulary [0, {vocab_size})", field="prompt")
        if len(it.prompt) >= max_length:
            raise InvalidInputError(f"prompt is longer than the model's {max_length - 1}", field="prompt")
        if it.num_samples < 1:
            raise InvalidInputError("num_samples must be at least 1", field="num_samples")
        if it.topk_prompt_logprobs < 0:
            raise InvalidInputError("topk_prompt_logprobs must be >= 0", field="topk_prompt_logprobs")
        _stops(it, [], vocab_size)


def generate(forward: ForwardFn, items: list[SampleItem], *, eos_ids: list[int], vocab_size: int, max_length: int,
             device: torch.device, decode: Callable[[list[int]], str] | None = None) -> list[SampleResponse]:
    """Sample every item; one ``SampleResponse`` per item, in order."""
    order = sorted(range(len(items)), key=lambda i: (items[i].adapter is not None, items[i].adapter or ""))
    rows: list[_Row] = []
    prompts: list[list[int]] = []
    segments: list[tuple[int, int, str | None]] = []
    first_row: dict[int, int] = {}
    gens: dict[int, torch.Generator] = {}
    for i in order:
        it = items[i]
        ids, strs = _stops(it, eos_ids, vocab_size)
        room = max_length - len(it.prompt)
        mt = it.params.max_tokens
        mt = min(DEFAULT_MAX_TOKENS, room) if mt is None else min(mt, room)
        start = len(rows)
        first_row[i] = start
        for _ in range(it.num_samples):
            rows.append(_Row(i, ids, strs, mt))
            prompts.append(list(it.prompt))
        if segments and segments[-1][2] == it.adapter:
            segments[-1] = (segments[-1][0], len(rows), it.adapter)
        else:
            segments.append((start, len(rows), it.adapter))
        seed = it.params.seed if it.params.seed is not None else random.randrange(2**63)
        gens[i] = torch.Generator(device="cpu").manual_seed(int(seed))

    b = len(rows)
    plen = torch.tensor([len(p) for p in prompts], device=device)
    width = int(plen.max())
    ids = torch.zeros((b, width), dtype=torch.long, device=device)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.tensor(p, dtype=torch.long)
    padded = bool((plen != width).any())
    mask = (torch.arange(width, device=device)[None, :] >= (width - plen)[:, None]).long() if padded else None
    pos = (mask.cumsum(-1) - 1).clamp(min=0) if mask is not None else torch.arange(width, device=device)[None].expand(b, -1)

    temps = torch.tensor([items[r.item].params.temperature for r in rows], device=device, dtype=torch.float32)
    top_k = torch.tensor([items[r.item].params.top_k for r in rows], device=device)
    top_p = torch.tensor([items[r.item].params.top_p for r in rows], device=device, dtype=torch.float32)
    any_sampling = bool((temps > 0).any())

    with torch.no_grad():
        logits, cache = forward(ids, mask, pos, None, segments)
        logits = logits.float()
        responses_prompt = _prompt_logprobs(items, first_row, logits, prompts, width)
        last = logits[:, -1]
        next_pos = pos[:, -1:] + 1
        steps = max((r.max_tokens for r in rows), default=0)
        for t in range(steps):
            logp = torch.log_softmax(last, dim=-1)
            tok = _choose(last, temps, top_k, top_p, rows, gens, any_sampling)
            tok_lp = logp.gather(-1, tok[:, None]).squeeze(-1)
            tok_l, lp_l = tok.tolist(), tok_lp.tolist()
            alive = False
            for r, row in enumerate(rows):
                if row.reason is not None or len(row.tokens) >= row.max_tokens:
                    if row.reason is None:
                        row.reason = "length"
                    continue
                row.tokens.append(tok_l[r])
                row.logprobs.append(lp_l[r])
                if tok_l[r] in row.stop_ids or (row.stop_strs and decode is not None
                                                and any(s in decode(row.tokens) for s in row.stop_strs)):
                    row.reason = "stop"
                elif len(row.tokens) >= row.max_tokens:
                    row.reason = "length"
                else:
                    alive = True
            if not alive or t == steps - 1:
                break
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones((b, 1))], dim=1)
            logits, cache = forward(tok[:, None], mask, next_pos, cache, segments)
            last = logits[:, -1].float()
            next_pos = next_pos + 1

    out: list[SampleResponse] = []
    for i, it in enumerate(items):
        seqs = []
        for row in rows[first_row[i]: first_row[i] + it.num_samples]:
            seqs.append(SampledSequence(stop_reason=row.reason or "length", tokens=row.tokens, logprobs=row.logprobs))
        plp, topk = responses_prompt.get(i, (None, None))
        out.append(SampleResponse(sequences=seqs, prompt_logprobs=plp, topk_prompt_logprobs=topk))
    return out


def _prompt_logprobs(items: list[SampleItem], first_row: dict[int, int], logits: torch.Tensor,
                     prompts: list[list[int]], width: int) -> dict[int, tuple[Any, Any]]:
    res: dict[int, tuple[Any, Any]] = {}
    for i, it in enumerate(items):
        if not it.prompt_logprobs and not it.topk_prompt_logprobs:
            continue
        r = first_row[i]
        p = prompts[r]
        n = len(p)
        lg = torch.log_softmax(logits[r, width - n: width - 1], dim=-1)  # position j predicts token j+1
        tgt = torch.tensor(p[1:], dtype=torch.long, device=lg.device)
        lps = lg.gather(-1, tgt[:, None]).squeeze(-1).tolist() if n > 1 else []
        plp = [None, *lps] if it.prompt_logprobs else None
        topk = None
        if it.topk_prompt_logprobs:
            k = min(it.topk_prompt_logprobs, lg.shape[-1])
            v, ix = lg.topk(k, dim=-1) if n > 1 else (lg, lg.long())
            topk = [None] + [list(zip(ix[j].tolist(), v[j].tolist(), strict=True)) for j in range(n - 1)]
        res[i] = (plp, topk)
    return res


def _choose(logits: torch.Tensor, temps: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, rows: list[_Row],
            gens: dict[int, torch.Generator], any_sampling: bool) -> torch.Tensor:
    greedy = logits.argmax(dim=-1)
    if not any_sampling:
        return greedy
    v = logits.shape[-1]
    scaled = logits / temps.clamp(min=1e-6)[:, None]
    sorted_l, sorted_ix = scaled.sort(dim=-1, descending=True)
    rank = torch.arange(v, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k.clamp(max=v), torch.full_like(top_k, v))
    sorted_l = sorted_l.masked_fill(rank >= k[:, None], float("-inf"))
    probs = torch.softmax(sorted_l, dim=-1)
    cum = probs.cumsum(dim=-1)
    drop = (cum - probs) >= top_p[:, None]
    drop[:, 0] = False
    probs = probs.masked_fill(drop, 0.0)
    cdf = probs.cumsum(dim=-1)
    # one uniform per row, drawn from its request's generator in row order
    parts, r = [], 0
    while r < len(rows):
        e = r
        while e < len(rows) and rows[e].item == rows[r].item:
            e += 1
        parts.append(torch.rand(e - r, generator=gens[rows[r].item]))
        r = e
    u = torch.cat(parts)
    u = u.to(logits.device) * cdf[:, -1]
    pick = torch.searchsorted(cdf, u[:, None]).clamp(max=v - 1)
    sampled = sorted_ix.gather(-1, pick).squeeze(-1)
    return torch.where(temps > 0, sampled, greedy)
