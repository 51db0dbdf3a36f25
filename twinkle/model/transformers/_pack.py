"""Sequence packing of a training batch: several datums of one adapter share a row.

The padded layout puts one datum per row, right-padded to the longest datum of the batch. The packed layout
fills rows of the same width with as many datums of the *same adapter* as fit (first-fit decreasing), so the
rows still route to one LoRA each (``_lora`` segments count rows). Each datum keeps its own position ids
(``0..n-1``); transformers turns position ids that restart inside a row into a block-diagonal causal mask
(``masking_utils.find_packed_sequence_indices``; flash-attention kernels use them as varlen boundaries), so
no datum attends to another and every datum's logits equal the padded layout's.

Whether a model's attention honours that is checked once per model with a tiny forward
(``packing_is_exact``): a family whose mask code ignores position ids keeps the padded layout.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

Segment = tuple[int, int, "str | None"]


@dataclass
class Layout:
    """Where each datum lies in the packed rows."""

    ids: np.ndarray  # (rows, width) int64 token ids, zero in the unused tail of a row
    pos: np.ndarray  # (rows, width) int64 position ids: 0..n-1 per datum, the row's last one runs on to the end
    place: list[tuple[int, int]]  # per datum: (row, offset)
    segments: list[Segment]  # row segments per adapter (for the LoRA routing)

    @property
    def rows(self) -> int:
        return int(self.ids.shape[0])


def _bins(lengths: list[int], members: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing of datums ``members`` (indices into ``lengths``) into rows of ``capacity`` tokens."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(members, key=lambda k: -lengths[k]):
        n = lengths[i]
        for r, f in enumerate(free):
            if n <= f:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(capacity - n)
    return rows


def pack(tokens: list[np.ndarray], segments: list[Segment], capacity: int | None = None) -> Layout:
    """Pack datums (``tokens``, in the order of ``segments``, which cover them by adapter) into rows of
    ``capacity`` tokens (default: the longest datum, so no row is wider than the padded layout's)."""
    lengths = [int(t.size) for t in tokens]
    width = max(max(lengths), capacity or 0)
    rows: list[list[int]] = []
    row_segs: list[Segment] = []
    for start, end, name in segments:
        group = _bins(lengths, list(range(start, end)), width)
        row_segs.append((len(rows), len(rows) + len(group), name))
        rows.extend(group)
    ids = np.zeros((len(rows), width), dtype=np.int64)
    pos = np.zeros((len(rows), width), dtype=np.int64)
    place: list[tuple[int, int]] = [(0, 0)] * len(tokens)
    for r, members in enumerate(rows):
        off = 0
        for i in members:
            n = lengths[i]
            ids[r, off:off + n] = tokens[i]
            place[i] = (r, off)
            # the last datum's positions run on through the unused tail (as in a padded row: causal attention
            # keeps the datum from seeing it), so a row of one datum is exactly a padded row
            pos[r, off:off + n if i != members[-1] else width] = np.arange(n if i != members[-1] else width - off)
            off += n
    return Layout(ids, pos, place, row_segs)


def padding_fraction(lengths: list[int], rows: int, width: int) -> float:
    """Share of the token slots a forward pass computes that hold no datum token."""
    total = rows * width
    return 0.0 if total == 0 else 1.0 - sum(lengths) / total


def packing_is_exact(forward: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
                     device: torch.device, tol: float = 1e-4) -> bool:
    """Run two short sequences packed in one row and each alone; equal logits (relative to their scale) mean
    the model's attention keeps packed datums apart. ``forward(ids, pos)`` returns logits (base model)."""
    a = torch.tensor([[3, 7, 11, 5]], device=device)
    b = torch.tensor([[9, 2, 6]], device=device)
    ids = torch.cat([a, b], dim=1)
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2]], device=device)
    with torch.no_grad():
        packed = forward(ids, pos).float()
        alone = torch.cat([forward(a, None).float(), forward(b, None).float()], dim=1)
    scale = float(alone.abs().max()) or 1.0
    return bool((packed - alone).abs().max() <= tol * scale)


# -- shared prefixes ----------------------------------------------------------------------------------------
# GRPO-style batches hold groups of datums that start with the same prompt. A *group* is laid out once as its
# shared prefix (the trunk) followed by each datum's own remainder (a branch); an explicit attention mask lets
# a branch see the trunk and itself only, and branch position ids continue from the trunk's. Every datum's
# logits are those of the datum alone (the trunk's are shared: autograd sums the gradients of its uses).


@dataclass
class SharedLayout:
    ids: np.ndarray  # (rows, width) int64
    pos: np.ndarray  # (rows, width) int64
    allow: np.ndarray  # (rows, width, width) bool: query q may attend key k
    index: list[np.ndarray]  # per datum: flat positions (row * width + column) of its tokens, in order
    segments: list[Segment]

    @property
    def rows(self) -> int:
        return int(self.ids.shape[0])


def _lcp(a: np.ndarray, b: np.ndarray) -> int:
    n = min(a.size, b.size)
    diff = np.nonzero(a[:n] != b[:n])[0]
    return int(diff[0]) if diff.size else n


def _groups(tokens: list[np.ndarray], members: list[int], min_shared: int, cap: int) -> list[tuple[int, list[int]]]:
    """``(trunk length, datums)`` groups: datums of ``members`` that share a prefix of ``min_shared`` tokens or
    more (sorted order puts them side by side); a datum joins while the shared prefix keeps 3/4 of its length
    (so datums of one prompt group together, not every datum that shares a chat template header) and the
    group's tokens stay within ``cap``."""
    order = sorted(members, key=lambda i: tuple(tokens[i].tolist()))
    out: list[tuple[int, list[int]]] = []
    for i in order:
        if out:
            trunk, group = out[-1]
            first = tokens[group[0]]
            shared = min(trunk, _lcp(first, tokens[i]))
            size = shared + sum(tokens[j].size - shared for j in group) + tokens[i].size - shared
            if shared >= min_shared and 4 * shared >= 3 * trunk and size <= cap:
                out[-1] = (shared, group + [i])
                continue
        out.append((int(tokens[i].size), [i]))
    return out


def share_prefixes(tokens: list[np.ndarray], segments: list[Segment], min_shared: int = 8,
                   max_mask: int = 1 << 26) -> SharedLayout | None:
    """The shared-prefix layout, or ``None`` when no two datums of one adapter share ``min_shared`` leading
    tokens (or its mask would exceed ``max_mask`` entries). Groups are at most twice the longest datum."""
    longest = max(int(t.size) for t in tokens)
    cap = 2 * longest
    seg_groups = [(_groups(tokens, list(range(s, e)), min_shared, cap), name) for s, e, name in segments]
    if all(len(g) == 1 for gs, _ in seg_groups for _, g in gs):
        return None
    sizes: dict[tuple[int, int], int] = {}
    for k, (gs, _) in enumerate(seg_groups):
        for j, (trunk, group) in enumerate(gs):
            sizes[k, j] = trunk + sum(int(tokens[i].size) - trunk for i in group)
    width = max(sizes.values())
    rows: list[list[tuple[int, int]]] = []
    row_segs: list[Segment] = []
    for k, (gs, name) in enumerate(seg_groups):
        start, free = len(rows), list[int]()  # first-fit decreasing of this adapter's groups
        for j in sorted(range(len(gs)), key=lambda j: -sizes[k, j]):
            r = next((r for r, f in enumerate(free) if sizes[k, j] <= f), None)
            if r is None:
                rows.append([])
                free.append(width)
                r = len(free) - 1
            rows[start + r].append((k, j))
            free[r] -= sizes[k, j]
        row_segs.append((start, len(rows), name))
    if len(rows) * width * width > max_mask:
        return None
    ids = np.zeros((len(rows), width), dtype=np.int64)
    pos = np.zeros((len(rows), width), dtype=np.int64)
    allow = np.zeros((len(rows), width, width), dtype=bool)
    index: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * len(tokens)
    causal = np.tril(np.ones((width, width), dtype=bool))
    for r, placed in enumerate(rows):
        off = 0
        for k, j in placed:
            trunk, group = seg_groups[k][0][j]
            t0 = off
            ids[r, t0:t0 + trunk] = tokens[group[0]][:trunk]
            pos[r, t0:t0 + trunk] = np.arange(trunk)
            allow[r, t0:t0 + trunk, t0:t0 + trunk] = causal[:trunk, :trunk]
            off += trunk
            for i in group:
                n = int(tokens[i].size) - trunk
                ids[r, off:off + n] = tokens[i][trunk:]
                pos[r, off:off + n] = np.arange(trunk, trunk + n)
                allow[r, off:off + n, t0:t0 + trunk] = True
                allow[r, off:off + n, off:off + n] = causal[:n, :n]
                cols = np.concatenate([np.arange(t0, t0 + trunk), np.arange(off, off + n)])
                index[i] = r * width + cols
                off += n
        for q in range(off, width):  # unused tail: each slot sees itself (no fully masked query row)
            allow[r, q, q] = True
    return SharedLayout(ids, pos, allow, index, row_segs)
