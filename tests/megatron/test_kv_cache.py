"""Sampling with the megatron KV cache (``_kv_cache``) against the whole-sequence path and the transformers backend.

builtin://tiny (fp32, CPU); two LoRA adapters trained a few steps on megatron and loaded into the transformers
backend, so both backends hold the same weights. The batch mixes prompt lengths (left padding) and rows with
and without adapters.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("megatron.core")

from twinkle.model.base import BatchItem, SampleItem  # noqa: E402
from twinkle.types import AdamParams, LoraConfig, SamplingParams, datum_from_tokens  # noqa: E402


@pytest.fixture(scope="module")
def backends(tmp_path_factory):
    from twinkle.model.megatron import MegatronBackend
    from twinkle.model.transformers import TransformersBackend

    mg = MegatronBackend("builtin://tiny")
    hf = TransformersBackend("builtin://tiny")
    rng = np.random.default_rng(0)
    for name, seed in (("k1", 1), ("k2", 2)):
        mg.add_adapter(name, LoraConfig(rank=4, seed=seed))
        for _ in range(3):
            data = [datum_from_tokens(rng.integers(0, mg.vocab_size, 12).tolist()) for _ in range(2)]
            mg.run_batch([BatchItem(name, data)])
            mg.optim_step(name, AdamParams(learning_rate=5e-2, eps=1e-8))
        path = tmp_path_factory.mktemp("kv") / name
        mg.save(name, path, optimizer=False)
        hf.load(name, path, optimizer=False)
    return mg, hf


@pytest.fixture
def counted(monkeypatch):
    """Counts the cached forward calls (prefill + decode steps)."""
    from twinkle.model.megatron import _kv_cache

    calls = {"n": 0}
    real = _kv_cache.forward

    def spy(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(_kv_cache, "forward", spy)
    return calls


def _items(temperature: float, max_tokens: int = 10) -> list[SampleItem]:
    p = dict(max_tokens=max_tokens, temperature=temperature, seed=11, stop=[])
    return [SampleItem("k1", [5, 6, 7, 8, 9, 10, 11], 1, SamplingParams(**p)),
            SampleItem(None, [20, 21, 22], 1, SamplingParams(**p)),
            SampleItem("k2", [30, 31, 32], 2, SamplingParams(**{**p, "seed": 12}))]


def _no_cache(mg, items):
    mg.kv_cache = False
    try:
        return mg.sample(items)
    finally:
        mg.kv_cache = True


def _flat(responses):
    return [(s.tokens, s.logprobs) for r in responses for s in r.sequences]


def _assert_same(a, b, atol=1e-4):
    for (ta, la), (tb, lb) in zip(_flat(a), _flat(b), strict=True):
        assert ta == tb
        np.testing.assert_allclose(la, lb, atol=atol)


def test_greedy_with_cache_matches_no_cache_and_transformers(backends, counted):
    mg, hf = backends
    items = _items(0.0)
    cached = mg.sample(items)
    assert counted["n"] == 10 and mg.kv_cache  # one prefill + 9 decode steps, no fallback
    _assert_same(cached, _no_cache(mg, items))
    _assert_same(cached, hf.sample(items))
    rows = [t for t, _ in _flat(cached)]
    assert all(len(t) == 10 for t in rows)
    assert rows[0] != rows[1] != rows[2] and rows[2] == rows[3]  # adapters/prompts matter; greedy repeats


def test_seeded_sampling_same_with_and_without_cache(backends, counted):
    mg, _ = backends
    items = _items(1.0, max_tokens=12)
    cached = mg.sample(items)
    assert counted["n"] == 12
    _assert_same(cached, _no_cache(mg, items))
    rows = [t for t, _ in _flat(cached)]
    assert rows[2] != rows[3]  # two samples of one request differ


def test_cache_grows_past_its_first_allocation(backends, counted, monkeypatch):
    from twinkle.model.megatron import _kv_cache

    mg, _ = backends
    monkeypatch.setattr(_kv_cache, "_FIRST_ROOM", 1)  # prompt + 1, then doubling: several reallocations
    items = _items(0.0, max_tokens=16)
    _assert_same(mg.sample(items), _no_cache(mg, items))
    assert counted["n"] == 16


def test_cache_failure_falls_back_to_whole_sequence(backends, monkeypatch):
    from twinkle.model.megatron import _kv_cache

    mg, _ = backends
    items = _items(0.0, max_tokens=4)
    ref = _no_cache(mg, items)

    def broken(*args, **kwargs):
        raise AssertionError("not supported here")

    monkeypatch.setattr(_kv_cache, "forward", broken)
    try:
        _assert_same(mg.sample(items), ref, atol=1e-6)
        assert mg.kv_cache is False  # and later requests no longer try
    finally:
        mg.kv_cache = True
    monkeypatch.setattr(_kv_cache, "supported", lambda model: False)
    monkeypatch.setattr(_kv_cache, "forward", lambda *a, **k: pytest.fail("cache used on an unsupported model"))
    _assert_same(mg.sample(items), ref, atol=1e-6)


def test_step_mask_is_causal_over_new_tokens_and_masks_padding():
    from twinkle.model.megatron import _kv_cache

    cache = _kv_cache.KVCache(_kv_cache.start(2, 3).context, 2)
    cache.context.sequence_len_offset = 3
    key_mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    m = _kv_cache.step_mask(cache, 2, key_mask, torch.device("cpu"))
    assert m.shape == (2, 1, 2, 5)
    assert m[0, 0].tolist() == [[True, False, False, False, True], [True, False, False, False, False]]
    assert m[1, 0].tolist() == [[False, False, False, False, True], [False] * 5]
    with pytest.raises(ValueError):
        _kv_cache.step_mask(cache, 1, key_mask, torch.device("cpu"))
