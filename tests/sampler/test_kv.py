"""KV-cache row surgery (``twinkle.sampler._kv``) on buffered layers: every operation keeps the cached keys and
values equal to plain tensor operations, and the ones the continuous sampler does most (rows leaving, columns
trimmed, rows joining into spare room) work inside the layer's buffer instead of copying the cache."""

from __future__ import annotations

import random

import torch
from transformers import DynamicCache

from twinkle.sampler import _kv
from twinkle.sampler._continuous import _compact


class _Ref:
    """A one-layer cache and the same keys/values kept as plain tensors."""

    def __init__(self, rows: int, seed: int) -> None:
        self.g = torch.Generator().manual_seed(seed)
        self.cache = DynamicCache()
        self.k = self.v = None
        self.append(rows, 5)

    def new(self, rows: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(rows, 2, n, 4, generator=self.g), torch.randn(rows, 2, n, 4, generator=self.g)

    def append(self, rows: int, n: int = 1) -> None:
        k, v = self.new(rows, n)
        _kv.append(self.cache, 0, k, v)
        self.k = k if self.k is None else torch.cat([self.k, k], 2)
        self.v = v if self.v is None else torch.cat([self.v, v], 2)

    def check(self) -> None:
        la = self.cache.layers[0]
        assert torch.equal(la.keys, self.k) and torch.equal(la.values, self.v)
        assert _kv.supports(self.cache)

    def buffer(self) -> torch.Tensor:
        return self.cache.layers[0]._twinkle_buf[0]


def test_surgery_equals_plain_tensor_operations():
    rng = random.Random(0)
    in_place = 0
    for seed in range(20):
        ref = _Ref(rows=rng.randrange(1, 7), seed=seed)
        for _ in range(60):
            rows = ref.k.shape[0]
            op = rng.choice(["append", "append", "leave", "fork", "trim", "pad", "join"])
            viewed = _kv._view(ref.cache.layers[0]) is not None
            if op == "append":
                ref.append(rows, rng.choice([1, 1, 1, 3]))
            elif op == "leave" and rows > 1:
                keep = sorted(rng.sample(range(rows), rng.randrange(1, rows)))
                groups = sorted(rng.choice([(False, "a"), (False, "b"), (True, "")]) for _ in keep)
                idx = torch.tensor(_compact(keep, groups))
                _kv.select(ref.cache, idx)
                ref.k, ref.v = ref.k.index_select(0, idx), ref.v.index_select(0, idx)
                assert (_kv._view(ref.cache.layers[0]) is not None) == viewed  # moved inside the buffer
                in_place += viewed
            elif op == "fork":
                idx = torch.tensor(sorted(rng.choices(range(rows), k=rng.randrange(1, 5))))
                _kv.select(ref.cache, idx)
                ref.k, ref.v = ref.k.index_select(0, idx), ref.v.index_select(0, idx)
            elif op == "trim" and ref.k.shape[2] > 2:
                n = rng.randrange(1, ref.k.shape[2] - 1)
                _kv.trim_left(ref.cache, n)
                ref.k, ref.v = ref.k[:, :, n:], ref.v[:, :, n:]
                assert (_kv._view(ref.cache.layers[0]) is not None) == viewed
            elif op == "pad":
                n = rng.randrange(1, 6)
                _kv.left_pad(ref.cache, n)
                ref.k, ref.v = (torch.nn.functional.pad(t, (0, 0, n, 0)) for t in (ref.k, ref.v))
            elif op == "join":
                other = DynamicCache()
                k, v = ref.new(rng.randrange(1, 4), ref.k.shape[2])
                other.update(k, v, 0)
                _kv.concat(ref.cache, other)
                ref.k, ref.v = torch.cat([ref.k, k], 0), torch.cat([ref.v, v], 0)
            ref.check()
    assert in_place > 20


def test_leaving_trimming_and_joining_stay_in_the_buffer():
    ref = _Ref(rows=6, seed=1)
    ref.append(6)
    buf = ref.buffer()
    keep = [0, 2, 3, 5]  # rows 1 and 4 finished: row 5 moves into slot 1, the rest stay
    idx = _compact(keep, [(False, "a")] * 4)
    assert idx == [0, 5, 2, 3]
    _kv.select(ref.cache, torch.tensor(idx))
    ref.k, ref.v = ref.k[idx], ref.v[idx]
    _kv.trim_left(ref.cache, 2)
    ref.k, ref.v = ref.k[:, :, 2:], ref.v[:, :, 2:]
    ref.append(4)
    ref.check()
    assert ref.buffer() is buf  # no copy so far
    other = DynamicCache()
    k, v = ref.new(2, ref.k.shape[2])
    other.update(k, v, 0)
    _kv.concat(ref.cache, other)  # two rows join into the two spare rows
    ref.k, ref.v = torch.cat([ref.k, k], 0), torch.cat([ref.v, v], 0)
    _kv.left_pad(ref.cache, 2)  # the trimmed columns are room on the left
    ref.k, ref.v = (torch.nn.functional.pad(t, (0, 0, 2, 0)) for t in (ref.k, ref.v))
    ref.append(6)
    ref.check()
    assert ref.buffer() is buf
    assert ref.cache.layers[0].keys.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
