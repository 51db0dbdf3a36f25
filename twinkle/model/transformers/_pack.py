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
