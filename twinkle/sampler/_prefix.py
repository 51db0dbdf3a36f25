"""Prompt-prefix reuse across requests: the KV cache of finished sequences, for prompts that start with them.

Multi-turn RL (the Tinker cookbook's ``guess_number``, tool use, any chat rollout) sends each turn's prompt as
the previous turn's prompt + its completion + the new message: without reuse every turn prefills the whole
conversation again. The continuous sampler hands every finished sequence's cache (its prompt and completion but
the last token, which was never fed back) to :class:`PrefixStore`; a later request of the same adapter, with the
same weights and from the same user, whose prompt starts with one of them prefills only the rest. (Per user: a
cache shared across users would let one tell from a faster first token whether another sent a prompt, on the
base model or a published checkpoint.)

Lookups hash the prompt's prefixes at every ``BLOCK`` tokens (one dict probe per block, longest first), then
compare the tokens themselves (a hash collision is never a hit) and extend the match token by token. At least
the prompt's last token is always prefilled (its logits choose the first sampled token). Entries are keyed on the
owner (adapter and user) and a weights key from the backend (it changes with every ``optim_step``, ``load`` or in-place change),
so a changed adapter never reuses its old cache: its entries are dropped at the next add or lookup. The store
holds at most ``max_tokens`` cached positions (least recently used go first; an entry that a new one extends, the
previous turn of a conversation, goes when the new one comes); 0 turns it off.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import torch

BLOCK = 16  # prefixes are indexed and looked up at multiples of this many tokens
MIN_REUSE = 16  # a shorter common prefix is not worth reusing


@dataclass
class _Entry:
    owner: Hashable  # the adapter and scope (user) it serves
    tokens: list[int]
    keys: list[torch.Tensor]  # one [kv_heads, len(tokens), head_dim] a layer
    values: list[torch.Tensor]
    eid: int = -1  # its id in PrefixStore._entries
    index: list[tuple[Any, int, int]] = field(default_factory=list)  # its keys in PrefixStore._index


class PrefixStore:
    """See the module docstring."""

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max(0, int(max_tokens))
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._index: dict[tuple[Any, int, int], int] = {}  # (owner, length, hash of prefix) -> entry
        self._weights: dict[Hashable, Hashable] = {}  # owner -> the weights key its entries were made with
        self._next = 0
        self.held = 0  # cached positions held

    def _check_weights(self, owner: Hashable, wkey: Hashable) -> None:
        if owner in self._weights and self._weights[owner] != wkey:
            for eid in [e for e, ent in self._entries.items() if ent.owner == owner]:
                self._remove(eid)
        self._weights[owner] = wkey

    def _remove(self, eid: int) -> None:
        ent = self._entries.pop(eid)
        self.held -= len(ent.tokens)
        for k in ent.index:
            if self._index.get(k) == eid:
                del self._index[k]

    def add(self, owner: Hashable, wkey: Hashable, tokens: list[int], keys: list[torch.Tensor],
            values: list[torch.Tensor]) -> bool:
        """Keep a finished sequence's cache (``tokens``: the positions it holds) for ``owner`` (an adapter and
        the user, or any key: only lookups of the same owner find it); False when not kept."""
        n = len(tokens)
        if n < MIN_REUSE or n > self.max_tokens:
            return False
        self._check_weights(owner, wkey)
        covered = self.find(owner, wkey, [*tokens, -1])  # an entry the new one extends (the last turn's) goes
        if covered is not None and covered[1] == len(covered[0].tokens):
            self._remove(covered[0].eid)
        while self._entries and self.held + n > self.max_tokens:
            self._remove(next(iter(self._entries)))
        eid, self._next = self._next, self._next + 1
        ent = _Entry(owner, list(tokens), keys, values, eid)
        for m in range(BLOCK, n + 1, BLOCK):
            key = (owner, m, hash(tuple(tokens[:m])))
            self._index[key] = eid
            ent.index.append(key)
        self._entries[eid] = ent
        self.held += n
        return True

    def find(self, owner: Hashable, wkey: Hashable, prompt: list[int]) -> tuple[_Entry, int] | None:
        """The entry sharing the longest prefix with ``prompt`` and that prefix's length (at least
        ``MIN_REUSE``, at most ``len(prompt) - 1``), or None."""
        if not self._entries:
            return None
        self._check_weights(owner, wkey)
        limit = len(prompt) - 1
        for m in range(limit // BLOCK * BLOCK, MIN_REUSE - 1, -BLOCK):
            if m <= 0:
                break
            eid = self._index.get((owner, m, hash(tuple(prompt[:m]))))
            if eid is None:
                continue
            ent = self._entries.get(eid)
            if ent is None or ent.tokens[:m] != prompt[:m]:
                continue
            n, top = m, min(len(ent.tokens), limit)
            while n < top and ent.tokens[n] == prompt[n]:
                n += 1
            self._entries.move_to_end(eid)
            return ent, n
        return None
