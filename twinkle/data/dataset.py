"""A small in-memory dataset of dict rows: load from jsonl/json/csv/lists, then map/filter/shuffle/select."""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from twinkle.types import InvalidInputError

Row = dict[str, Any]


class Dataset(Sequence[Row]):
    """An immutable list of rows (dicts). Every transform returns a new ``Dataset``."""

    def __init__(self, rows: Iterable[Mapping[str, Any]] = ()):
        self._rows: list[Row] = []
        for i, r in enumerate(rows):
            if not isinstance(r, Mapping):
                raise InvalidInputError(f"row {i} must be a mapping, got {type(r).__name__}", field=f"rows[{i}]")
            self._rows.append(dict(r))

    # -- constructors ------------------------------------------------------------------------------
    @classmethod
    def from_list(cls, rows: Iterable[Mapping[str, Any]]) -> Dataset:
        return cls(rows)

    @classmethod
    def from_dict(cls, columns: Mapping[str, Sequence[Any]]) -> Dataset:
        """Columns of equal length → rows."""
        lengths = {k: len(v) for k, v in columns.items()}
        if len(set(lengths.values())) > 1:
            raise InvalidInputError(f"columns differ in length: {lengths}", field="columns")
        n = next(iter(lengths.values()), 0)
        return cls({k: v[i] for k, v in columns.items()} for i in range(n))

    @classmethod
    def from_jsonl(cls, path: str | Path) -> Dataset:
        rows = []
        with open(_existing(path), encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise InvalidInputError(f"{path}:{n} is not valid JSON: {e.msg}", field="path") from None
        return cls(rows)

    @classmethod
    def from_json(cls, path: str | Path, field: str | None = None) -> Dataset:
        """A JSON list of rows, a mapping of columns, or (with ``field``) either of those under a key."""
        try:
            data = json.loads(_existing(path).read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise InvalidInputError(f"{path} is not valid JSON: {e.msg}", field="path") from None
        if field is not None:
            if not isinstance(data, Mapping) or field not in data:
                raise InvalidInputError(f"{path} has no key {field!r}", field="field")
            data = data[field]
        if isinstance(data, Mapping):
            return cls.from_dict(data)
        if not isinstance(data, list):
            raise InvalidInputError(f"{path} must hold a list of rows or a mapping of columns", field="path")
        return cls(data)

    @classmethod
    def from_csv(cls, path: str | Path, delimiter: str = ",") -> Dataset:
        with open(_existing(path), encoding="utf-8", newline="") as f:
            return cls(csv.DictReader(f, delimiter=delimiter))

    # -- sequence protocol -------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._rows)

    def __iter__(self) -> Iterator[Row]:
        return (dict(r) for r in self._rows)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return Dataset(self._rows[index])
        if isinstance(index, str):
            return self.column(index)
        try:
            return dict(self._rows[index])
        except IndexError:
            raise InvalidInputError(f"index {index} out of range for {len(self)} rows", field="index") from None

    def __repr__(self) -> str:
        cols = sorted(self._rows[0]) if self._rows else []
        return f"Dataset(num_rows={len(self)}, columns={cols})"

    # -- transforms --------------------------------------------------------------------------------
    def map(self, fn: Callable[[Row], Mapping[str, Any] | Iterable[Mapping[str, Any]] | None],
            *, remove_columns: Sequence[str] | None = None, flatten: bool = False) -> Dataset:
        """Apply ``fn`` to each row; the new row is what ``fn`` returns (without ``remove_columns``).
        ``fn`` returning None drops the row; with ``flatten=True`` it may return a list of rows."""
        out: list[Row] = []
        for r in self._rows:
            res = fn(dict(r))
            if res is None:
                continue
            results = list(res) if flatten else [res]
            for new in results:
                if not isinstance(new, Mapping):
                    raise InvalidInputError("map function must return a mapping", field="fn")
                row = dict(new)
                if remove_columns:
                    row = {k: v for k, v in row.items() if k not in remove_columns}
                out.append(row)
        return Dataset(out)

    def filter(self, fn: Callable[[Row], bool]) -> Dataset:
        return Dataset(r for r in self._rows if fn(dict(r)))

    def shuffle(self, seed: int = 0) -> Dataset:
        """A new dataset in a random order that depends only on ``seed`` (same seed, same order)."""
        rows = list(self._rows)
        random.Random(seed).shuffle(rows)
        return Dataset(rows)

    def select(self, indices: Iterable[int]) -> Dataset:
        idx = list(indices)
        for i in idx:
            if not -len(self) <= i < len(self):
                raise InvalidInputError(f"index {i} out of range for {len(self)} rows", field="indices")
        return Dataset(self._rows[i] for i in idx)

    def take(self, n: int) -> Dataset:
        return Dataset(self._rows[: max(0, n)])

    def repeat(self, times: int) -> Dataset:
        if times < 1:
            raise InvalidInputError("times must be at least 1", field="times")
        return Dataset(self._rows * times)

    def concat(self, other: Iterable[Mapping[str, Any]]) -> Dataset:
        return Dataset([*self._rows, *other])

    def train_test_split(self, test_size: float | int, seed: int = 0) -> tuple[Dataset, Dataset]:
        n_test = int(round(test_size * len(self))) if isinstance(test_size, float) else int(test_size)
        if not 0 <= n_test <= len(self):
            raise InvalidInputError(f"test_size {test_size} does not fit {len(self)} rows", field="test_size")
        shuffled = self.shuffle(seed)
        return shuffled[n_test:], shuffled[:n_test]

    def column(self, name: str) -> list[Any]:
        try:
            return [r[name] for r in self._rows]
        except KeyError:
            raise InvalidInputError(f"no column {name!r}", field=name) from None

    def to_list(self) -> list[Row]:
        return [dict(r) for r in self._rows]

    def to_jsonl(self, path: str | Path) -> Path:
        p = Path(path)
        with open(p, "w", encoding="utf-8") as f:
            for r in self._rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        return p


def load_dataset(source: str | Path | Iterable[Mapping[str, Any]] | Mapping[str, Sequence[Any]], **kw: Any) -> Dataset:
    """A ``Dataset`` from a ``.jsonl``/``.json``/``.csv`` file, a list of rows, a column mapping, or an HF
    ``datasets.Dataset`` (anything iterable over mappings)."""
    if isinstance(source, Dataset):
        return source
    if isinstance(source, (str, Path)):
        suffix = Path(source).suffix.lower()
        if suffix == ".jsonl":
            return Dataset.from_jsonl(source)
        if suffix == ".json":
            return Dataset.from_json(source, **kw)
        if suffix in (".csv", ".tsv"):
            return Dataset.from_csv(source, delimiter="\t" if suffix == ".tsv" else kw.get("delimiter", ","))
        raise InvalidInputError(f"unknown data file type {suffix!r} (use .jsonl, .json or .csv)", field="source")
    if isinstance(source, Mapping):
        return Dataset.from_dict(source)
    if isinstance(source, Iterable):
        return Dataset(source)
    raise InvalidInputError(f"cannot load a dataset from {type(source).__name__}", field="source")


def _existing(path: str | Path) -> Path:
    p = Path(path)
    if not p.is_file():
        raise InvalidInputError(f"data file {str(p)!r} does not exist", field="path")
    return p
