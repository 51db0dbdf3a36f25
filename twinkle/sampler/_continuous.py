"""Continuous batching: requests join the running decode batch at the next step and leave when done.

``ContinuousSampler`` keeps one KV cache for every running row (rows of different adapters are kept
sorted by adapter, so each adapter owns one contiguous row segment, routed to its LoRA exactly as in
training). One :meth:`ContinuousSampler.step` does, in order:

1. one decode step of the running rows (choose a token per row, check stops, drop finished rows and the
   cache columns no remaining row needs, then one forward of the survivors), and
2. one prefill chunk (at most ``prefill_chunk`` tokens) of the requests admitted since the last prefill
   began; requests of one adapter and user with the same prompt (a GRPO group sent as one request per sample, as
   the Tinker cookbook does) share one prefill row; when a prefill completes, each prompt's single row is forked
   once per sequence of its requests (``num_samples`` each: shared prefill) and the rows join the running batch.

It returns the requests whose every sequence finished during the step, so each caller's result is ready
as soon as its own sequences are. Sampling never sorts the vocabulary unless a row uses top-k/top-p, and
every sequence draws its random numbers from its own generator (seeded from the request's seed and the
sample's index), so a seeded request gives the same tokens alone or batched with others.

The engine is model-agnostic: the backend passes ``forward(ids, mask, pos, cache, segments, last_only=)`` and the
cache must be a plain ``DynamicCache`` (see ``_kv``); image inputs can plug in at the prefill step.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import torch

from twinkle.model.base import SampleItem
from twinkle.types import SampledSequence, SampleResponse
from twinkle.types.params import DEFAULT_MAX_TOKENS

from . import _kv
from ._engine import _stops
from ._prefix import BLOCK, PrefixStore

# forward(ids, mask, pos, cache, segments, last_only=False) -> (logits, cache); ``last_only``: only the last
# position's logits are needed (the backend may skip the unembedding of the others)
ForwardFn = Callable[..., tuple[torch.Tensor, Any]]
StreamFn = Callable[[Hashable, int, int, float, "list[tuple[int, float]] | None"], None]
"""(request key, sample index, token, logprob, the ``topk_logprobs`` most likely (token, logprob) or None)"""
WeightsKeyFn = Callable[[str | None], Hashable]  # adapter -> a key that changes whenever its weights do


@dataclass
class _Req:
    key: Hashable
    item: SampleItem
    cost: int
    rows: list[_Row] = field(default_factory=list)
    left: int = 0
    prompt_lp: Any = None
    topk_lp: Any = None
    aborted: bool = False


@dataclass
class _Row:
    req: _Req
    index: int
    adapter: str | None
    gen: torch.Generator
    stop_ids: set[int]
    stop_strs: list[str]
    max_tokens: int
    temp: float
    top_k: int
    top_p: float
    top: int = 0  # rank this many most likely tokens at each step, for the stream listener
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    reason: str | None = None

    @property
    def plain(self) -> bool:
        return self.top_k <= 0 and self.top_p >= 1.0


@dataclass
class _Prefill:
    reqs: list[_Req]
    src: list[int]  # each request's prefill row (requests of one adapter and prompt share one)
    ids: torch.Tensor
    mask: torch.Tensor | None
    pos: torch.Tensor
    segments: list[tuple[int, int, str | None]]
    done: int = 0
    cache: Any = None
    last: torch.Tensor | None = None
    kept: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # row -> logits chunks (prompt logprobs)


def _order_key(adapter: str | None) -> tuple[bool, str]:
    return adapter is not None, adapter or ""


def request_cost(item: SampleItem, max_length: int) -> int:
    """KV-cache tokens a request may hold at most: ``num_samples * (prompt + max_tokens)``."""
    return max(1, item.num_samples) * (len(item.prompt) + _max_tokens(item, max_length))


def _max_tokens(item: SampleItem, max_length: int) -> int:
    room = max_length - len(item.prompt)
    mt = item.params.max_tokens
    return min(DEFAULT_MAX_TOKENS, room) if mt is None else max(0, min(int(mt), room))


class ContinuousSampler:
    """Rows of many requests and adapters in one decode batch; see the module docstring."""

    def __init__(self, forward: ForwardFn, *, eos_ids: list[int], vocab_size: int, max_length: int,
                 device: torch.device, decode: Callable[[list[int]], str] | None = None,
                 prefill_chunk: int = 512, kv_budget: int | None = None, prefix_tokens: int = 0,
                 weights_key: WeightsKeyFn | None = None) -> None:
        self.forward = forward
        self.eos_ids = list(eos_ids)
        self.vocab_size = vocab_size
        self.max_length = max_length
        self.device = device
        self.decode = decode
        self.prefill_chunk = max(1, int(prefill_chunk))
        self.kv_budget = kv_budget
        self.stream: StreamFn | None = None
        self._aborts: list[Hashable] = []  # keys to drop at the next step (appended from any thread)
        self._waiting: list[_Req] = []
        self._prefill: _Prefill | None = None
        self._rows: list[_Row] = []
        self._cache: Any = None
        self._mask: torch.Tensor | None = None  # [b, width] 1 = real token
        self._pos: torch.Tensor | None = None  # [b, 1] position of the next token
        self._last: torch.Tensor | None = None  # [b, vocab] logits for the next token
        self.reserved = 0
        self.weights_key = weights_key
        self.prefix = PrefixStore(prefix_tokens) if weights_key is not None and prefix_tokens > 0 else None
        self.stats = {"steps": 0, "prefill_chunks": 0, "max_rows": 0, "joins": 0, "prefix_hits": 0,
                      "prefix_tokens": 0, "aborted": 0}

    # ---- admission -----------------------------------------------------------------------------------------
    def idle(self) -> bool:
        return not (self._waiting or self._prefill or self._rows)

    def active_adapters(self) -> set[str | None]:
        out = {r.adapter for r in self._rows}
        out.update(q.item.adapter for q in self._waiting)
        if self._prefill is not None:
            out.update(q.item.adapter for q in self._prefill.reqs)
        return out

    def fits(self, item: SampleItem) -> bool:
        """Whether admitting ``item`` keeps the reserved KV tokens within the budget (always when idle)."""
        if self.kv_budget is None or self.reserved == 0:
            return True
        return self.reserved + request_cost(item, self.max_length) <= self.kv_budget

    def admit(self, key: Hashable, item: SampleItem) -> None:
        """Queue a validated request; it starts prefilling at the next step that has no prefill running."""
        cost = request_cost(item, self.max_length)
        self.reserved += cost
        self._waiting.append(_Req(key, item, cost))

    def abort(self, key: Hashable) -> None:
        """Drop request ``key`` (its caller left) at the start of the next step, wherever it is: waiting, in a
        prefill (its rows never join the batch) or decoding (its rows leave the batch, its KV budget is
        freed). It is then reported done with ``None`` for a response. Safe to call from any thread; a key
        that is not (or no longer) here is ignored."""
        self._aborts.append(key)

    def _take_aborts(self, done: list[tuple[Hashable, SampleResponse | None]]) -> None:
        keys: list[Hashable] = []
        while self._aborts:
            keys.append(self._aborts.pop())

        def hit(q: _Req) -> bool:
            return any(q.key is k for k in keys)

        for q in [q for q in self._waiting if hit(q)]:
            self._waiting.remove(q)
            self._dropped(q, done)
        if self._prefill is not None:
            for q in self._prefill.reqs:
                q.aborted = q.aborted or hit(q)
        cut = False
        for row in self._rows:
            if hit(row.req):
                row.req.aborted = True
                row.reason = "aborted"
                cut = True
        if cut:
            self._retire(done)

    def _dropped(self, q: _Req, done: list[tuple[Hashable, SampleResponse | None]]) -> None:
        self.reserved -= q.cost
        self.stats["aborted"] += 1
        done.append((q.key, None))

    # ---- one step ------------------------------------------------------------------------------------------
    def step(self) -> list[tuple[Hashable, SampleResponse | None]]:
        """One decode step of the batch and one prefill chunk; returns the requests that finished, each with
        its response (``None``: aborted)."""
        done: list[tuple[Hashable, SampleResponse | None]] = []
        if self._aborts:
            self._take_aborts(done)
        with torch.no_grad():
            if self._rows:
                self._decode_step(done)
            if self._prefill is None and self._waiting:
                self._start_prefill()
            if self._prefill is not None:
                self._prefill_chunk(done)
        self.stats["steps"] += 1
        return done

    def run_all(self) -> dict[Hashable, SampleResponse | None]:
        out: dict[Hashable, SampleResponse | None] = {}
        while not self.idle():
            out.update(self.step())
        return out

    def fail_all(self) -> list[Hashable]:
        """Drop every request (after an error); returns their keys."""
        keys = [q.key for q in self._waiting]
        if self._prefill is not None:
            keys += [q.key for q in self._prefill.reqs]
        seen: set[int] = set()
        for r in self._rows:
            if id(r.req) not in seen:
                seen.add(id(r.req))
                keys.append(r.req.key)
        self._waiting, self._prefill, self._rows = [], None, []
        self._cache = self._mask = self._pos = self._last = None
        self.reserved = 0
        return keys

    # ---- prefill -------------------------------------------------------------------------------------------
    def _start_prefill(self) -> None:
        waiting = self._waiting  # in admission order
        hits = self._prefix_hits(waiting)
        if hits:
            # Every row of a prefill runs the same last columns (see _reuse): this one takes the requests whose
            # uncached part is about as long as the oldest request's, the others wait for the next prefill (each
            # request is the oldest in turn, so none waits for ever).
            rest = [len(q.item.prompt) - (hits[id(q)][1] if id(q) in hits else 0) for q in waiting]
            low, high = rest[0] // 2 - BLOCK, 2 * rest[0] + BLOCK
            self._waiting = [q for q, n in zip(waiting, rest, strict=True) if not low <= n <= high]
            waiting = [q for q, n in zip(waiting, rest, strict=True) if low <= n <= high]
        else:
            self._waiting = []
        reqs = sorted(waiting, key=lambda q: _order_key(q.item.adapter))
        dev = self.device
        first: dict[tuple[str | None, str, tuple[int, ...]], int] = {}
        src: list[int] = []
        uniq: list[_Req] = []  # one request per prefill row, still sorted by adapter
        for q in reqs:
            u = first.setdefault((q.item.adapter, q.item.scope, tuple(q.item.prompt)), len(first))
            if u == len(uniq):
                uniq.append(q)
            src.append(u)
        lens = torch.tensor([len(q.item.prompt) for q in uniq])
        w = int(lens.max())
        ids = torch.zeros((len(uniq), w), dtype=torch.long)
        for r, q in enumerate(uniq):
            ids[r, w - len(q.item.prompt):] = torch.tensor(q.item.prompt, dtype=torch.long)
        padded = bool((lens != w).any())
        mask = (torch.arange(w)[None, :] >= (w - lens)[:, None]).long() if padded else None
        pos = (mask.cumsum(-1) - 1).clamp(min=0) if mask is not None else torch.arange(w)[None].expand(len(uniq), -1)
        segments: list[tuple[int, int, str | None]] = []
        for r, q in enumerate(uniq):
            if segments and segments[-1][2] == q.item.adapter:
                segments[-1] = (segments[-1][0], r + 1, q.item.adapter)
            else:
                segments.append((r, r + 1, q.item.adapter))
        self._prefill = _Prefill(reqs, src, ids.to(dev), mask.to(dev) if mask is not None else None, pos.to(dev),
                                 segments)
        if any(id(q) in hits for q in uniq) and not any(q.item.prompt_logprobs or q.item.topk_prompt_logprobs
                                                         for q in reqs):  # (those need every column's logits)
            self._reuse(self._prefill, [hits.get(id(q), (None, 0)) for q in uniq])

    def _prefix_hits(self, reqs: list[_Req]) -> dict[int, tuple[Any, int]]:
        """``id(request) -> (stored entry, reusable length)`` for the requests whose prompt starts with a stored
        sequence of the same adapter, weights and scope (the user: another user's prompts never speed one up, so
        timing tells nothing of them), not those asking for prompt logprobs (they need every position's logits)."""
        if self.prefix is None or self.weights_key is None:
            return {}
        keys: dict[str | None, Hashable] = {}
        hits: dict[int, tuple[Any, int]] = {}
        for q in reqs:
            if q.item.prompt_logprobs or q.item.topk_prompt_logprobs:
                continue
            a = q.item.adapter
            if a not in keys:
                keys[a] = self.weights_key(a)
            found = self.prefix.find((a, q.item.scope), keys[a], q.item.prompt)
            if found is not None:
                hits[id(q)] = found
        return hits

    def _reuse(self, p: _Prefill, found: list[tuple[Any, int]]) -> None:
        """Start prefill ``p`` (one row per entry of ``found``: a stored entry and its usable length, or
        ``(None, 0)``) from the stored caches: every row reuses as much of its match as lets all rows prefill
        the same last columns (the longest uncached part; rows with a shorter one recompute some cached
        positions, hence requests with alike uncached parts go together), so the prefill begins there."""
        b, w = p.ids.shape
        pads = [w - int(p.mask[r].sum()) if p.mask is not None else 0 for r in range(b)]  # each row's left padding
        rest = max(w - pad - n for pad, (_, n) in zip(pads, found, strict=True))  # columns every row prefills
        start = w - rest
        rows = [(ent.keys, ent.values, max(0, start - pad)) if ent is not None else ([], [], 0)
                for pad, (ent, _) in zip(pads, found, strict=True)]
        if start <= 0 or not any(n for _, _, n in rows):
            return
        p.cache = _kv.from_rows(rows, start)
        p.done = start
        self.stats["prefix_hits"] += sum(1 for _, _, n in rows if n)
        self.stats["prefix_tokens"] += sum(n for _, _, n in rows)

    def _prefill_chunk(self, done: list[tuple[Hashable, SampleResponse | None]]) -> None:
        p = self._prefill
        assert p is not None
        b, w = p.ids.shape
        cols = max(1, self.prefill_chunk // b)
        s, e = p.done, min(w, p.done + cols)
        mask = p.mask[:, :e] if p.mask is not None else None
        if any(q.item.prompt_logprobs or q.item.topk_prompt_logprobs for q in p.reqs):
            logits, p.cache = self.forward(p.ids[:, s:e], mask, p.pos[:, s:e], p.cache, p.segments)
        else:  # only the last position's logits are used
            logits, p.cache = self.forward(p.ids[:, s:e], mask, p.pos[:, s:e], p.cache, p.segments, last_only=True)
        self.stats["prefill_chunks"] += 1
        keep = {p.src[r] for r, q in enumerate(p.reqs) if q.item.prompt_logprobs or q.item.topk_prompt_logprobs}
        for u in sorted(keep):
            p.kept.setdefault(u, []).append(logits[u].float())
        p.done = e
        if e < w:
            return
        p.last = logits[:, -1].float()
        self._prefill = None
        self._finish_prefill(p, done)

    def _finish_prefill(self, p: _Prefill, done: list[tuple[Hashable, SampleResponse | None]]) -> None:
        w = p.ids.shape[1]
        for r, q in enumerate(p.reqs):
            if q.item.prompt_logprobs or q.item.topk_prompt_logprobs:
                q.prompt_lp, q.topk_lp = _prompt_logprobs(q.item, torch.cat(p.kept[p.src[r]], dim=0), w)
        idx: list[int] = []
        rows: list[_Row] = []
        for r, q in enumerate(p.reqs):
            if q.aborted:  # its caller left during the prefill: its rows never join
                self._dropped(q, done)
                continue
            it = q.item
            ids, strs = _stops(it, self.eos_ids, self.vocab_size)
            mt = _max_tokens(it, self.max_length)
            seed = it.params.seed if it.params.seed is not None else random.randrange(2**62)
            for j in range(max(1, it.num_samples)):
                gen = torch.Generator(device="cpu").manual_seed((int(seed) * 1_000_003 + j) % (2**63))
                q.rows.append(_Row(q, j, it.adapter, gen, ids, strs, mt, float(it.params.temperature),
                                   int(it.params.top_k), float(it.params.top_p), int(it.topk_logprobs)))
            q.left = len(q.rows)
            for row in q.rows:
                idx.append(p.src[r])
                rows.append(row)
        if not rows:
            return
        sel = torch.tensor(idx, device=self.device)
        if not _kv.supports(p.cache):
            raise RuntimeError("the model's KV cache cannot be batched continuously")
        if sel.numel() != p.ids.shape[0] or bool((sel != torch.arange(p.ids.shape[0], device=self.device)).any()):
            _kv.select(p.cache, sel)
        mask = p.mask[sel] if p.mask is not None else torch.ones((len(idx), w), dtype=torch.long, device=self.device)
        pos = p.pos[sel, -1:] + 1
        assert p.last is not None  # set by the last prefill chunk
        last = p.last[sel]
        self._join(rows, p.cache, mask, pos, last)
        self.stats["joins"] += 1
        # a row with no room for a token finishes at once
        if any(r.max_tokens <= 0 for r in rows):
            self._retire(done)

    def _join(self, rows: list[_Row], cache: Any, mask: torch.Tensor, pos: torch.Tensor, last: torch.Tensor) -> None:
        if not self._rows:
            self._rows, self._cache, self._mask, self._pos, self._last = rows, cache, mask, pos, last
        else:
            assert self._mask is not None and self._pos is not None and self._last is not None
            wr, wn = self._mask.shape[1], mask.shape[1]
            if wr < wn:
                _kv.left_pad(self._cache, wn - wr)
                self._mask = torch.nn.functional.pad(self._mask, (wn - wr, 0))
            elif wn < wr:
                _kv.left_pad(cache, wr - wn)
                mask = torch.nn.functional.pad(mask, (wr - wn, 0))
            _kv.concat(self._cache, cache)
            self._rows = self._rows + rows
            self._mask = torch.cat([self._mask, mask], dim=0)
            self._pos = torch.cat([self._pos, pos], dim=0)
            self._last = torch.cat([self._last, last], dim=0)
        order = sorted(range(len(self._rows)), key=lambda i: _order_key(self._rows[i].adapter))
        if order != list(range(len(self._rows))):
            self._select(order)
        self.stats["max_rows"] = max(self.stats["max_rows"], len(self._rows))

    def _select(self, keep: list[int]) -> None:
        idx = torch.tensor(keep, dtype=torch.long, device=self.device)
        assert self._mask is not None and self._pos is not None and self._last is not None
        _kv.select(self._cache, idx)
        self._rows = [self._rows[i] for i in keep]
        self._mask = self._mask.index_select(0, idx)
        self._pos = self._pos.index_select(0, idx)
        self._last = self._last.index_select(0, idx)

    # ---- decode --------------------------------------------------------------------------------------------
    def _decode_step(self, done: list[tuple[Hashable, SampleResponse | None]]) -> None:
        assert self._last is not None and self._mask is not None and self._pos is not None
        last = self._last
        tok = self._choose(last)
        lsm = torch.log_softmax(last, dim=-1)
        tok_lp = lsm.gather(-1, tok[:, None]).squeeze(-1)
        tok_l, lp_l = tok.tolist(), tok_lp.tolist()
        k = max(row.top for row in self._rows) if self.stream is not None else 0
        if k:  # one topk over the batch, only when some row asked
            top_v, top_i = lsm.topk(min(k, lsm.shape[-1]), dim=-1)
            tops_v, tops_i = top_v.tolist(), top_i.tolist()
        for r, row in enumerate(self._rows):
            if len(row.tokens) >= row.max_tokens:
                row.reason = "length"
                continue
            t = tok_l[r]
            row.tokens.append(t)
            row.logprobs.append(lp_l[r])
            if self.stream is not None:
                top = list(zip(tops_i[r][:row.top], tops_v[r][:row.top], strict=True)) if row.top else None
                self.stream(row.req.key, row.index, t, lp_l[r], top)
            if t in row.stop_ids or (row.stop_strs and self._hit_stop(row)):
                row.reason = "stop"
            elif len(row.tokens) >= row.max_tokens:
                row.reason = "length"
        keep = self._retire(done)
        if not self._rows:
            return
        tok_next = tok.index_select(0, torch.tensor(keep, dtype=torch.long, device=tok.device))[:, None]
        self._mask = torch.cat([self._mask, self._mask.new_ones((len(self._rows), 1))], dim=1)
        logits, self._cache = self.forward(tok_next, self._mask, self._pos, self._cache, self._segments())
        self._last = logits[:, -1].float()
        self._pos = self._pos + 1

    def _retire(self, done: list[tuple[Hashable, SampleResponse | None]]) -> list[int]:
        """Remove finished rows (completing requests whose rows all finished); returns the kept indices."""
        keep = [i for i, row in enumerate(self._rows) if row.reason is None and len(row.tokens) < row.max_tokens]
        for row in self._rows:
            if row.reason is None and len(row.tokens) >= row.max_tokens:
                row.reason = "length"
        if len(keep) == len(self._rows):
            return keep
        self._store_finished()
        for row in self._rows:
            if row.reason is not None:
                q = row.req
                q.left -= 1
                if q.left == 0:
                    if q.aborted:
                        self._dropped(q, done)
                    else:
                        self.reserved -= q.cost
                        done.append((q.key, _response(q)))
        if not keep:
            self._rows, self._cache, self._mask, self._pos, self._last = [], None, None, None, None
            return keep
        keep = _compact(keep, [_order_key(self._rows[i].adapter) for i in keep])
        self._select(keep)
        assert self._mask is not None
        used = self._mask.any(dim=0).nonzero()
        first = int(used[0]) if used.numel() else 0
        if first > 0:
            _kv.trim_left(self._cache, first)
            self._mask = self._mask[:, first:]
        return keep

    def _store_finished(self) -> None:
        """Hand the finished rows' caches to the prefix store (prompt + completion, less the last token)."""
        if self.prefix is None or self.weights_key is None or self._mask is None:
            return
        keys: dict[str | None, Hashable] = {}
        held = self._mask.sum(dim=1).tolist()
        for r, row in enumerate(self._rows):
            n = int(held[r])
            seq = row.req.item.prompt + row.tokens
            if row.reason is None or n > len(seq) or n < 2:
                continue
            if row.adapter not in keys:
                keys[row.adapter] = self.weights_key(row.adapter)
            k, v = _kv.row_suffix(self._cache, r, n)
            self.prefix.add((row.adapter, row.req.item.scope), keys[row.adapter], seq[:n], k, v)

    def _segments(self) -> list[tuple[int, int, str | None]]:
        segs: list[tuple[int, int, str | None]] = []
        for i, row in enumerate(self._rows):
            if segs and segs[-1][2] == row.adapter:
                segs[-1] = (segs[-1][0], i + 1, row.adapter)
            else:
                segs.append((i, i + 1, row.adapter))
        return segs

    def _hit_stop(self, row: _Row) -> bool:
        """Incremental stop-string check: only the tail that can contain a newly completed stop string."""
        if self.decode is None:
            return False
        span = max(len(s) for s in row.stop_strs) + 4
        tail = self.decode(row.tokens[-span:])
        return any(s in tail for s in row.stop_strs)

    def _choose(self, logits: torch.Tensor) -> torch.Tensor:
        rows = self._rows
        greedy = logits.argmax(dim=-1)
        hot = [i for i, r in enumerate(rows) if r.temp > 0 and len(r.tokens) < r.max_tokens]
        if not hot:
            return greedy
        out = greedy.clone()
        plain = [i for i in hot if rows[i].plain]
        fancy = [i for i in hot if not rows[i].plain]
        v = logits.shape[-1]
        for group, filtered in ((plain, False), (fancy, True)):
            if not group:
                continue
            ix = torch.tensor(group, dtype=torch.long, device=logits.device)
            temps = torch.tensor([rows[i].temp for i in group], dtype=torch.float32, device=logits.device)
            u = torch.tensor([float(torch.rand(1, generator=rows[i].gen)) for i in group], device=logits.device)
            scaled = logits.index_select(0, ix) / temps[:, None]
            if not filtered:
                probs = torch.softmax(scaled, dim=-1)
                cdf = probs.cumsum(dim=-1)
                pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).clamp(max=v - 1).squeeze(-1)
            else:
                top_k = torch.tensor([rows[i].top_k for i in group], device=logits.device)
                top_p = torch.tensor([rows[i].top_p for i in group], dtype=torch.float32, device=logits.device)
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
                j = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).clamp(max=v - 1)
                pick = sorted_ix.gather(-1, j).squeeze(-1)
            out[ix] = pick
        return out


def _compact(keep: list[int], keys: list[tuple[bool, str]]) -> list[int]:
    """An order of the rows ``keep`` (ascending indices of rows sorted by adapter; ``keys``: their sort keys)
    that keeps each adapter's rows together, in the same order of adapters, and moves the fewest of them: a row
    stays at its index when that index lies in its adapter's new range, the others fill the free slots of
    theirs. Each move goes to a lower index, so ``_kv.select`` applies it in place without a copy of the cache."""
    out: list[int] = []
    start = 0
    i = 0
    while i < len(keep):
        j = i
        while j < len(keep) and keys[j] == keys[i]:
            j += 1
        end = start + j - i
        stay = {r for r in keep[i:j] if start <= r < end}
        movers = iter(r for r in keep[i:j] if r not in stay)
        out.extend(slot if slot in stay else next(movers) for slot in range(start, end))
        start, i = end, j
    return out


def _response(q: _Req) -> SampleResponse:
    seqs = [SampledSequence(stop_reason=r.reason or "length", tokens=r.tokens, logprobs=r.logprobs)
            for r in sorted(q.rows, key=lambda r: r.index)]
    return SampleResponse(sequences=seqs, prompt_logprobs=q.prompt_lp, topk_prompt_logprobs=q.topk_lp)


def _prompt_logprobs(item: SampleItem, logits: torch.Tensor, width: int) -> tuple[Any, Any]:
    """``logits``: this row's prefill logits over the padded width (the prompt is right-aligned)."""
    p = item.prompt
    n = len(p)
    lg = torch.log_softmax(logits[width - n: width - 1], dim=-1)  # position j predicts token j+1
    tgt = torch.tensor(p[1:], dtype=torch.long, device=lg.device)
    lps = lg.gather(-1, tgt[:, None]).squeeze(-1).tolist() if n > 1 else []
    plp = [None, *lps] if item.prompt_logprobs else None
    topk: list[list[tuple[int, float]] | None] | None = None
    if item.topk_prompt_logprobs:
        k = min(item.topk_prompt_logprobs, lg.shape[-1])
        topk = [None]
        if n > 1:
            v, ix = lg.topk(k, dim=-1)
            topk += [list(zip(ix[j].tolist(), v[j].tolist(), strict=True)) for j in range(n - 1)]
    return plp, topk
