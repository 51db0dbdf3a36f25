"""Row surgery on a Hugging Face ``DynamicCache``: select/repeat rows, left-pad, concatenate, trim; and growth
in place (:func:`append`).

The continuous sampler keeps ONE cache for all running rows, left-padded to a common width (an attention
mask marks the padding). Rows join (concatenate after left-padding the narrower side), fork (repeat a
prompt's row ``n`` times) and leave (select the remaining rows, then drop columns that are padding in
every row). Only plain full-attention layers are supported (``supports``); other cache kinds (sliding
window, static, hybrid) make the backend fall back to whole-batch generation.

**Buffers.** A forward that appends through :func:`append` (the lean sampling forward) keeps each layer's keys
and values as views ``buf[:rows, :, off:off + width]`` of buffers with spare columns, so a decode step writes
its new column in place instead of copying the whole layer. The surgery keeps those views where it can: rows
leaving move the fewest kept rows into the holes inside the buffer (:func:`select` with a move-safe index),
trimming columns moves the view's offset, and joining rows writes them into spare rows. A layer's whole cache
is copied only when a buffer runs out of room or the index cannot be applied in place. Rows that left stay
allocated as spare rows until then (or until the batch empties), so the cache holds the memory of the most rows
that decoded together since, which the sampler's KV budget bounded. Measured on
builtin://small, 32 rows, ~170 columns (85 MB of cache): a row leaving cost 12-66 ms (a copy of every layer into
fresh memory, more than a decode step) before; in place it moves one row.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

SLACK = 64  # spare cache columns allocated ahead: at least this many, an eighth of the width for long sequences


def _layers(cache: Any) -> list[Any]:
    return list(getattr(cache, "layers", []) or [])


def supports(cache: Any) -> bool:
    """True when every layer of ``cache`` is a plain ``DynamicLayer`` holding its tensors."""
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:  # pragma: no cover - very old transformers
        return False
    layers = _layers(cache)
    if not layers:
        return False
    return all(type(la) is DynamicLayer and la.keys is not None and la.keys.dim() == 4 for la in layers)


def width(cache: Any) -> int:
    la = _layers(cache)[0]
    return int(la.keys.shape[-2])


def _offset(t: torch.Tensor, buf: torch.Tensor) -> int | None:
    """The column where ``t`` starts if ``t`` is ``buf[:rows, :, off:off + width]``, else None."""
    if (t.untyped_storage().data_ptr() != buf.untyped_storage().data_ptr() or t.stride() != buf.stride()
            or t.shape[1] != buf.shape[1] or t.shape[3] != buf.shape[3] or t.shape[0] > buf.shape[0]):
        return None
    rel = t.storage_offset() - buf.storage_offset()
    step = buf.stride(2)
    if rel < 0 or rel % step or rel // step + t.shape[2] > buf.shape[2]:
        return None
    return rel // step


def _view(la: Any) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """``(key buffer, value buffer, column offset)`` when the layer's tensors are views of its buffers."""
    buf = getattr(la, "_twinkle_buf", None)
    if buf is None or la.keys is None:
        return None
    off = _offset(la.keys, buf[0])
    if off is None or _offset(la.values, buf[1]) != off:
        return None
    return buf[0], buf[1], off


def _show(la: Any, kb: torch.Tensor, vb: torch.Tensor, rows: int, start: int, end: int) -> None:
    """Make the layer's keys and values the views ``buf[:rows, :, start:end]`` of its buffers."""
    la.keys, la.values = kb[:rows, :, start:end], vb[:rows, :, start:end]


def _rebuffer(la: Any, extra: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Copy the layer's tensors into new buffers with room for ``extra`` more columns and some slack."""
    w = la.keys.shape[2]
    cap = w + extra + max(SLACK, (w + extra) // 8)  # <= 1/8 more memory; a copy per w/8 steps
    kb, vb = (t.new_empty((*t.shape[:2], cap, t.shape[3])) for t in (la.keys, la.values))
    kb[:, :, :w] = la.keys
    vb[:, :, :w] = la.values
    la._twinkle_buf = (kb, vb)
    return kb, vb, 0


def append(cache: Any, i: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``cache.update(k, v, i)`` without copying the whole layer each step: the new columns are written into the
    layer's buffers (see the module docstring). The layer stays a plain ``DynamicLayer`` whose ``keys`` and
    ``values`` hold exactly the cached positions."""
    la = cache.layers[i] if i < len(cache.layers) else None
    if la is None or not getattr(la, "is_initialized", False) or la.keys is None or la.keys.numel() == 0:
        return cache.update(k, v, i)  # the first chunk: HF's own initialisation
    rows, w, n = la.keys.shape[0], la.keys.shape[2], k.shape[2]
    view = _view(la)
    if view is None or view[2] + w + n > view[0].shape[2]:
        view = _rebuffer(la, n)
    kb, vb, off = view
    kb[:rows, :, off + w:off + w + n] = k
    vb[:rows, :, off + w:off + w + n] = v
    _show(la, kb, vb, rows, off, off + w + n)
    return la.keys, la.values


def _moves(idx: list[int], rows: int) -> list[tuple[int, int]] | None:
    """``(destination, source)`` row copies that turn rows ``0..rows-1`` into rows ``idx`` in place, applied in
    order; None when ``idx`` repeats a row or a copy would read a row already overwritten."""
    if len(set(idx)) != len(idx) or any(not 0 <= s < rows for s in idx):
        return None
    moves, written = [], set()
    for d, s in enumerate(idx):
        if d == s:
            continue
        if s in written:
            return None
        moves.append((d, s))
        written.add(d)
    return moves


def select(cache: Any, idx: torch.Tensor) -> None:
    """Keep (or repeat) rows ``idx`` in place: buffered layers move only the rows that change place when
    ``idx`` allows it (:func:`_moves`), others take ``index_select`` copies."""
    layers = _layers(cache)
    if not layers:
        return
    moves = _moves(idx.tolist(), int(layers[0].keys.shape[0]))
    for la in layers:
        view = _view(la) if moves is not None else None
        if view is None or moves is None:
            la.keys = la.keys.index_select(0, idx)
            la.values = la.values.index_select(0, idx)
            continue
        kb, vb, off = view
        w = la.keys.shape[2]
        for d, s in moves:
            kb[d, :, off:off + w] = kb[s, :, off:off + w]
            vb[d, :, off:off + w] = vb[s, :, off:off + w]
        _show(la, kb, vb, idx.numel(), off, off + w)


def left_pad(cache: Any, n: int) -> None:
    """Add ``n`` zero columns on the left of every row."""
    if n <= 0:
        return
    for la in _layers(cache):
        view = _view(la)
        if view is not None and view[2] >= n:  # room on the left of the view: zero it and widen
            kb, vb, off = view
            rows, w = la.keys.shape[0], la.keys.shape[2]
            kb[:rows, :, off - n:off] = 0
            vb[:rows, :, off - n:off] = 0
            _show(la, kb, vb, rows, off - n, off + w)
            continue
        la.keys = F.pad(la.keys, (0, 0, n, 0))
        la.values = F.pad(la.values, (0, 0, n, 0))


def trim_left(cache: Any, n: int) -> None:
    """Drop the first ``n`` columns (a view of the buffer moves its offset; other layers are copied)."""
    if n <= 0:
        return
    for la in _layers(cache):
        if _view(la) is not None:
            la.keys, la.values = la.keys[:, :, n:], la.values[:, :, n:]
            continue
        la.keys = la.keys[:, :, n:].contiguous()
        la.values = la.values[:, :, n:].contiguous()


def concat(into: Any, other: Any) -> None:
    """Append ``other``'s rows to ``into`` (both already the same width): into spare buffer rows when there are
    enough, else by concatenation."""
    for a, b in zip(_layers(into), _layers(other), strict=True):
        view = _view(a)
        rows, extra = a.keys.shape[0], b.keys.shape[0]
        if view is not None and rows + extra <= view[0].shape[0]:
            kb, vb, off = view
            w = a.keys.shape[2]
            kb[rows:rows + extra, :, off:off + w] = b.keys
            vb[rows:rows + extra, :, off:off + w] = b.values
            _show(a, kb, vb, rows + extra, off, off + w)
            continue
        a.keys = torch.cat([a.keys, b.keys], dim=0)
        a.values = torch.cat([a.values, b.values], dim=0)


def row_suffix(cache: Any, r: int, n: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Copies of row ``r``'s last ``n`` cached positions, every layer (``[heads, n, dim]`` each)."""
    keys, values = [], []
    for la in _layers(cache):
        w = la.keys.shape[2]
        keys.append(la.keys[r, :, w - n:].clone())
        values.append(la.values[r, :, w - n:].clone())
    return keys, values


def from_rows(rows: list[tuple[list[torch.Tensor], list[torch.Tensor], int]], width: int) -> Any:
    """A cache of ``len(rows)`` rows and ``width`` columns: row ``i`` holds the first ``n`` positions of its
    ``(keys, values, n)`` right-aligned (left-padded with zeros; ``n`` may be 0)."""
    from transformers import DynamicCache

    ref_k, ref_v = next((k, v) for k, v, n in rows if n > 0)
    cache = DynamicCache()
    for i in range(len(ref_k)):
        kk = ref_k[i].new_zeros((len(rows), ref_k[i].shape[0], width, ref_k[i].shape[2]))
        vv = ref_v[i].new_zeros((len(rows), ref_v[i].shape[0], width, ref_v[i].shape[2]))
        for r, (k, v, n) in enumerate(rows):
            if n > 0:
                kk[r, :, width - n:] = k[i][:, :n]
                vv[r, :, width - n:] = v[i][:, :n]
        cache.update(kk, vv, i)
    return cache
