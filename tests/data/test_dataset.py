from __future__ import annotations

import json

import pytest

from twinkle.data import DataLoader, Dataset, load_dataset
from twinkle.types import InvalidInputError

ROWS = [{"q": f"question {i}", "a": str(i)} for i in range(10)]


def test_load_jsonl_json_csv_and_lists_agree(tmp_path):
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS) + "\n")
    (tmp_path / "d.json").write_text(json.dumps(ROWS))
    (tmp_path / "cols.json").write_text(json.dumps({"data": {"q": [r["q"] for r in ROWS], "a": [r["a"] for r in ROWS]}}))
    (tmp_path / "d.csv").write_text("q,a\n" + "".join(f"{r['q']},{r['a']}\n" for r in ROWS))
    want = Dataset.from_list(ROWS).to_list()
    assert load_dataset(tmp_path / "d.jsonl").to_list() == want
    assert load_dataset(str(tmp_path / "d.json")).to_list() == want
    assert load_dataset(tmp_path / "cols.json", field="data").to_list() == want
    assert load_dataset(tmp_path / "d.csv").to_list() == want
    assert load_dataset(ROWS).to_list() == want
    assert load_dataset({"q": [r["q"] for r in ROWS], "a": [r["a"] for r in ROWS]}).to_list() == want


def test_load_errors_name_the_field(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n{oops\n')
    with pytest.raises(InvalidInputError) as e:
        load_dataset(tmp_path / "bad.jsonl")
    assert e.value.field == "path" and ":2" in str(e.value)
    with pytest.raises(InvalidInputError) as e:
        load_dataset(tmp_path / "missing.jsonl")
    assert e.value.field == "path"
    with pytest.raises(InvalidInputError) as e:
        load_dataset(tmp_path / "x.parquet")
    assert e.value.field == "source"
    with pytest.raises(InvalidInputError):
        Dataset([{"a": 1}, 5])


def test_transforms():
    ds = Dataset(ROWS)
    assert len(ds) == 10 and ds[3] == ROWS[3]
    doubled = ds.map(lambda r: {**r, "n": int(r["a"]) * 2})
    assert doubled.column("n") == [2 * i for i in range(10)]
    assert ds.column("a") == [str(i) for i in range(10)]  # the original is unchanged
    assert len(ds.filter(lambda r: int(r["a"]) % 2 == 0)) == 5
    assert ds.select([9, 0]).column("a") == ["9", "0"]
    assert [r["a"] for r in ds] == [str(i) for i in range(10)]
    assert len(ds.map(lambda r: [r, r], flatten=True)) == 20
    assert len(ds.map(lambda r: None if r["a"] == "0" else r)) == 9
    assert "a" not in ds.map(lambda r: r, remove_columns=["a"])[0]
    train, test = ds.train_test_split(0.3, seed=1)
    assert len(train) == 7 and len(test) == 3
    assert sorted(train.column("a") + test.column("a")) == sorted(ds.column("a"))
    with pytest.raises(InvalidInputError) as e:
        ds.select([10])
    assert e.value.field == "indices"


def test_shuffle_is_a_function_of_the_seed():
    ds = Dataset(ROWS)
    a, b, c = ds.shuffle(seed=3), ds.shuffle(seed=3), ds.shuffle(seed=4)
    assert a.to_list() == b.to_list()
    assert a.to_list() != c.to_list()
    assert sorted(a.column("a")) == sorted(ds.column("a"))


def test_dataloader_batches_and_drop_last():
    ds = Dataset(ROWS)
    batches = list(DataLoader(ds, batch_size=4))
    assert [len(b) for b in batches] == [4, 4, 2] and len(DataLoader(ds, batch_size=4)) == 3
    assert [len(b) for b in DataLoader(ds, batch_size=4, drop_last=True)] == [4, 4]
    assert len(DataLoader(ds, batch_size=4, drop_last=True)) == 2
    assert batches[0][0] == ROWS[0]


def test_dataloader_shuffle_is_seeded_and_changes_per_epoch():
    ds = Dataset(ROWS)

    def order(loader):
        return [r["a"] for b in loader for r in b]

    l1, l2 = DataLoader(ds, 3, shuffle=True, seed=5), DataLoader(ds, 3, shuffle=True, seed=5)
    e1, e2 = order(l1), order(l1)
    assert e1 == order(l2)  # same seed, same first epoch
    assert e1 != e2  # next epoch reshuffles
    assert sorted(e1) == sorted(e2) == sorted(r["a"] for r in ROWS)
    it = DataLoader(ds, 4, shuffle=True, seed=0).cycle()
    sizes = [len(next(it)) for _ in range(6)]
    assert sizes == [4, 4, 2, 4, 4, 2]  # epoch after epoch


def test_dataloader_collate_and_bad_batch_size():
    loader = DataLoader(Dataset(ROWS), 5, collate_fn=lambda rows: [r["a"] for r in rows])
    assert next(iter(loader)) == ["0", "1", "2", "3", "4"]
    with pytest.raises(InvalidInputError) as e:
        DataLoader(Dataset(ROWS), 0)
    assert e.value.field == "batch_size"
