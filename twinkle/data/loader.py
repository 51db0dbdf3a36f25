"""A minimal DataLoader: batches (lists of rows) from a dataset, reshuffled each epoch by a seed."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from twinkle.types import InvalidInputError


class DataLoader:
    """Iterate over ``dataset`` in batches of ``batch_size`` rows.

    With ``shuffle=True`` epoch ``e`` uses the order given by ``seed + e`` (deterministic, and different each
    epoch). A batch is a list of rows unless ``collate_fn`` turns it into something else. ``drop_last``
    drops a final short batch. ``cycle()`` yields batches forever (epoch after epoch).
    """

    def __init__(self, dataset: Sequence[Any], batch_size: int = 1, shuffle: bool = False, seed: int = 0,
                 drop_last: bool = False, collate_fn: Callable[[list[Any]], Any] | None = None):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidInputError("batch_size must be a positive integer", field="batch_size")
        if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            raise InvalidInputError("dataset must support len() and indexing", field="dataset")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.collate_fn = collate_fn
        self.epoch = 0

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self, epoch: int) -> list[int]:
        idx = list(range(len(self.dataset)))
        if self.shuffle:
            random.Random(self.seed + epoch).shuffle(idx)
        return idx

    def _batches(self, epoch: int) -> Iterator[Any]:
        order = self._order(epoch)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            if self.drop_last and len(chunk) < self.batch_size:
                break
            batch = [self.dataset[i] for i in chunk]
            yield self.collate_fn(batch) if self.collate_fn else batch

    def __iter__(self) -> Iterator[Any]:
        epoch = self.epoch
        self.epoch += 1
        return self._batches(epoch)

    def cycle(self) -> Iterator[Any]:
        """Batches forever; stops only if an epoch yields none (an empty dataset)."""
        while True:
            produced = False
            for b in self:
                produced = True
                yield b
            if not produced:
                return
