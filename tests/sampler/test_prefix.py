"""Prompt-prefix reuse (``twinkle.sampler._prefix``): a later turn whose prompt starts with a finished sequence
prefills only the rest and samples exactly what a fresh prefill samples; a change of the adapter's weights
invalidates the stored caches; the store keeps to its token budget and never trusts a hash alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.live_lora import add_live_adapters
from twinkle.model.base import BatchItem, SampleItem
from twinkle.model.transformers import TransformersBackend
from twinkle.model.transformers._random import tiny_model_path
from twinkle.sampler._prefix import BLOCK, PrefixStore
from twinkle.types import Datum, ModelInput, SamplingParams

TURN1 = [5 + (7 * i) % 90 for i in range(21)]


@pytest.fixture(scope="module")
def backend():
    torch.set_num_threads(1)
    b = TransformersBackend(str(tiny_model_path()), device="cpu")
    add_live_adapters(b, ("a", "b"), seed=7, scale=0.2)
    yield b
    b.close()


def _item(adapter, prompt, **params):
    params.setdefault("stop", [])
    params.setdefault("max_tokens", 10)
    params.setdefault("temperature", 0.0)
    return SampleItem(adapter, list(prompt), 1, SamplingParams(**params))


def _engine(backend, calls=None, tokens=4096):
    eng = backend.sampler_engine(prefix_tokens=tokens)
    if calls is not None:
        inner = eng.forward

        def forward(ids, mask, pos, cache, segments, **kw):
            calls.append(tuple(ids.shape))
            return inner(ids, mask, pos, cache, segments, **kw)

        eng.forward = forward
    return eng


def _run(eng, items):
    for i, it in enumerate(items):
        eng.admit(i, it)
    out = eng.run_all()
    return [out[i] for i in range(len(items))]


def _full_logprobs(backend, adapter, seq):
    d = Datum(model_input=ModelInput.from_ints(seq[:-1]), loss_fn_inputs={"target_tokens": np.asarray(seq[1:])})
    return backend.run_batch([BatchItem(adapter, [d], forward_only=True)])[0].loss_fn_outputs[0]["logprobs"].to_numpy()


def _assert_fresh(backend, item, got):
    """``got`` (a SampleResponse) is what a fresh prefill samples, and its logprobs a full forward's."""
    alone = backend.sample([item])[0]
    assert [s.tokens for s in got.sequences] == [s.tokens for s in alone.sequences]
    for s, a in zip(got.sequences, alone.sequences, strict=True):
        np.testing.assert_allclose(s.logprobs, a.logprobs, atol=1e-4)
        lp = _full_logprobs(backend, item.adapter, item.prompt + s.tokens)[len(item.prompt) - 1:]
        np.testing.assert_allclose(s.logprobs, lp, atol=1e-4)


def test_next_turn_prefills_only_its_new_tokens(backend):
    calls: list[tuple[int, int]] = []
    eng = _engine(backend, calls)
    first = _run(eng, [_item("a", TURN1)])[0].sequences[0].tokens
    turn2 = TURN1 + first + [11, 12, 13, 14, 15]
    calls.clear()
    out = _run(eng, [_item("a", turn2, temperature=1.0, seed=5)])[0]
    held = len(TURN1) + len(first) - 1  # the last sampled token was never fed back
    assert eng.stats["prefix_hits"] == 1 and eng.stats["prefix_tokens"] == held
    assert calls[0] == (1, len(turn2) - held)  # the prefill ran the new columns only
    _assert_fresh(backend, _item("a", turn2, temperature=1.0, seed=5), out)


def test_hits_and_misses_together_stay_exact(backend):
    eng = _engine(backend)
    firsts = _run(eng, [_item("a", TURN1), _item("b", TURN1[::-1]), _item(None, TURN1[3:])])
    nexts = [_item("a", TURN1 + firsts[0].sequences[0].tokens + [3, 4]),
             _item("b", TURN1[::-1] + firsts[1].sequences[0].tokens[:4]),  # the match ends inside the completion
             _item(None, TURN1[3:] + firsts[2].sequences[0].tokens + [9] * 30),
             _item("a", TURN1[::-1] + [1, 2]),  # b's sequence, another adapter: no hit
             _item("b", [40 + i for i in range(25)])]  # nothing stored
    hits0 = eng.stats["prefix_hits"]
    outs = _run(eng, nexts)
    assert eng.stats["prefix_hits"] - hits0 == 3
    for it, out in zip(nexts, outs, strict=True):
        _assert_fresh(backend, it, out)


def test_changed_weights_are_never_reused(backend):
    eng = _engine(backend)
    first = _run(eng, [_item("b", TURN1)])[0].sequences[0].tokens
    turn2 = _item("b", TURN1 + first + [7])
    pair = next(iter(backend._adapters["b"].pairs.values()))
    saved = pair.lora_B.detach().clone()
    try:
        with torch.no_grad():
            pair.lora_B.add_(0.5)  # an in-place change the backend was not told about
        out = _run(eng, [turn2])[0]
        assert eng.stats["prefix_hits"] == 0
        _assert_fresh(backend, turn2, out)
        backend._weights_changed("b")  # what optim_step and load do
        first = _run(eng, [_item("b", TURN1)])[0].sequences[0].tokens
        backend._weights_changed("b")
        out = _run(eng, [_item("b", TURN1 + first + [7])])[0]
        assert eng.stats["prefix_hits"] == 0
    finally:
        with torch.no_grad():
            pair.lora_B.copy_(saved)
        backend._weights_changed("b")


def test_prompt_logprobs_requests_prefill_everything(backend):
    eng = _engine(backend)
    first = _run(eng, [_item("a", TURN1)])[0].sequences[0].tokens
    item = SampleItem("a", TURN1 + first + [5], 1, SamplingParams(max_tokens=4, temperature=0.0, stop=[]), True, 2)
    out = _run(eng, [item])[0]
    assert eng.stats["prefix_hits"] == 0
    np.testing.assert_allclose(out.prompt_logprobs[1:], _full_logprobs(backend, "a", item.prompt), atol=1e-4)
    # in one prefill with a request that could reuse, it still gets every column's logits (nothing is reused)
    short = SampleItem("b", TURN1[:12], 1, SamplingParams(max_tokens=3, temperature=0.0, stop=[]), True, 0)
    hit, other = _run(eng, [_item("a", TURN1 + first + [6]), short])
    assert eng.stats["prefix_hits"] == 0
    np.testing.assert_allclose(other.prompt_logprobs[1:], _full_logprobs(backend, "b", short.prompt), atol=1e-4)
    _assert_fresh(backend, _item("a", TURN1 + first + [6]), hit)


def test_store_keeps_its_budget_and_checks_tokens():
    def kv(n):
        return [torch.zeros(2, n, 4)], [torch.zeros(2, n, 4)]

    store = PrefixStore(max_tokens=100)
    seqs = [[i] * 40 for i in range(1, 5)]
    for s in seqs:
        assert store.add("a", 1, s, *kv(len(s)))
        assert store.held <= 100
    assert store.held == 80  # the two oldest went
    assert store.find("a", 1, seqs[0] + [9]) is None
    ent, n = store.find("a", 1, seqs[3] + [9])
    assert n == 40 and ent.tokens == seqs[3]
    assert store.find("a", 1, seqs[3]) [1] == 39  # the last prompt token is always prefilled
    assert store.find("b", 1, seqs[3] + [9]) is None  # another owner (adapter or user)
    # a forged index entry (a hash collision) is not a hit: the tokens are compared
    other = [77] * BLOCK + [1]
    store._index[("a", BLOCK, hash(tuple(other[:BLOCK])))] = next(iter(store._entries))
    assert store.find("a", 1, other) is None
    # a conversation's next turn extends its last one: the store keeps the newer only
    assert store.add("a", 1, seqs[3] + [5] * 10, *kv(50)) and store.held == 40 + 50
    assert store.find("a", 1, seqs[3] + [5] * 10 + [9])[1] == 50
    assert store.find("a", 2, seqs[3] + [9]) is None and store.held == 0  # new weights: the old entries go
    assert not store.add("a", 2, [1] * 101, *kv(101))  # larger than the whole budget


def test_scheduler_setting_turns_it_off(backend):
    from twinkle.server.scheduler import SchedulerConfig

    assert SchedulerConfig.from_dict({"scheduler": {"prefix_cache_tokens": 0}}).prefix_cache_tokens == 0
    assert backend.sampler_engine(prefix_tokens=0).prefix is None
    assert SchedulerConfig().prefix_cache_tokens > 0
    from twinkle.types import InvalidInputError

    for bad in ({"prefix_cache_tokens": -1}, {"prefill_chunk": 0}):  # the schema's lower bounds hold here too
        with pytest.raises(InvalidInputError, match="must be at least"):
            SchedulerConfig.from_dict({"scheduler": bad})


def test_another_users_sequences_are_never_reused(backend):
    """Prompt caches are per user (the scope the gateway sets): the base model's cache of one user's
    conversation does not speed up another user's identical prompt."""
    eng = _engine(backend)
    first = _run(eng, [SampleItem(None, TURN1, 1, SamplingParams(max_tokens=8, temperature=0.0, stop=[]),
                                  scope="alice")])[0].sequences[0].tokens
    nxt = TURN1 + first + [3]
    bob = SampleItem(None, nxt, 1, SamplingParams(max_tokens=4, temperature=0.0, stop=[]), scope="bob")
    _assert_fresh(backend, bob, _run(eng, [bob])[0])
    assert eng.stats["prefix_hits"] == 0
    alice = SampleItem(None, nxt, 1, SamplingParams(max_tokens=4, temperature=0.0, stop=[]), scope="alice")
    _run(eng, [alice])
    assert eng.stats["prefix_hits"] == 1


def test_the_oldest_request_prefills_first_and_alike_ones_with_it(backend):
    """A prefill takes the requests whose uncached part is about as long as the oldest one's: a long new prompt
    admitted first is not overtaken by cheap next turns arriving after it (they prefill next), and all stay exact."""
    calls: list[tuple[int, int]] = []
    eng = _engine(backend, calls)
    first = _run(eng, [_item("a", TURN1)])[0].sequences[0].tokens
    long_new = _item("b", [60 + i % 30 for i in range(70)])
    nxt = _item("a", TURN1 + first + [4, 5])
    calls.clear()
    outs = _run(eng, [long_new, nxt])
    assert calls[0] == (1, 70) and calls[1][0] == 1  # the long prompt alone; then, with its first decode step...
    assert (1, 3) in calls[1:3] and eng.stats["prefix_hits"] == 1  # ...the next turn's 3 new columns
    for it, out in zip([long_new, nxt], outs, strict=True):
        _assert_fresh(backend, it, out)
