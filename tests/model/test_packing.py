"""Sequence packing (``_pack``): the packed layout gives the padded layout's logprobs, losses and gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.live_lora import add_live_adapters
from twinkle.loss import get_loss, list_losses
from twinkle.model.base import BatchItem
from twinkle.model.transformers import TransformersBackend
from twinkle.model.transformers._pack import pack, padding_fraction
from twinkle.model.transformers._random import tiny_model_path
from twinkle.types import Datum, ModelInput


def test_pack_layout_keeps_adapters_apart_and_positions_per_datum():
    lengths = [5, 3, 2, 4, 1, 6]
    tokens = [np.arange(100 * i, 100 * i + n) for i, n in enumerate(lengths)]
    segments = [(0, 4, "a"), (4, 6, "b")]  # datums 0-3 adapter a, 4-5 adapter b
    lay = pack(tokens, segments)
    assert lay.ids.shape[1] == 6  # never wider than the longest datum
    # a: 5+... first-fit decreasing over width 6 -> [5], [4, 2], [3]; b: [6], [1]
    assert lay.rows == 5 and lay.segments == [(0, 3, "a"), (3, 5, "b")]
    for i, (r, off) in enumerate(lay.place):
        n = lengths[i]
        np.testing.assert_array_equal(lay.ids[r, off:off + n], tokens[i])
        np.testing.assert_array_equal(lay.pos[r, off:off + n], np.arange(n))
        seg = next(s for s in lay.segments if s[0] <= r < s[1])
        assert seg[2] == ("a" if i < 4 else "b")
    assert padding_fraction(lengths, len(lengths), 6) == pytest.approx(1 - 21 / 36)
    assert padding_fraction(lengths, lay.rows, 6) == pytest.approx(1 - 21 / 30)


@pytest.fixture(scope="module")
def backend():
    torch.set_num_threads(1)
    b = TransformersBackend(str(tiny_model_path()), device="cpu", max_adapters=8)
    add_live_adapters(b, ("a", "b", "c"), seed=20, scale=0.05)
    yield b
    b.close()


def _datums(n: int, seed: int, lo: int = 3, hi: int = 20, groups: int = 0) -> list[Datum]:
    """``n`` random datums of lo..hi tokens; with ``groups``, GRPO-like: ``groups`` prompts of 10-14 tokens,
    each datum one of them plus a completion of 1..hi-lo tokens (shared prefixes)."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, 300, size=int(rng.integers(10, 15))) for _ in range(groups)]
    out = []
    for i in range(n):
        k = int(rng.integers(lo, hi))
        toks = rng.integers(0, 300, size=k + 1)
        if groups:
            toks = np.concatenate([prompts[i % groups], toks[: int(rng.integers(1, hi - lo + 1))]])
            k = toks.size - 1
        out.append(Datum(model_input=ModelInput.from_ints(toks[:-1].tolist()), loss_fn_inputs={
            "target_tokens": toks[1:], "weights": rng.uniform(0.5, 1.5, size=k).astype(np.float32),
            "logprobs": rng.uniform(-6, -4, size=k).astype(np.float32),
            "advantages": rng.normal(size=k).astype(np.float32)}))
    return out


def _run(b: TransformersBackend, items: list[BatchItem], packing: bool):
    b.packing = packing
    try:
        out = b.run_batch(items)
    finally:
        b.packing = True
    grads = {}
    for name, st in b._adapters.items():
        grads[name] = [None if p.grad is None else p.grad.clone() for p in st.parameters()]
        for p in st.parameters():
            p.grad = None
    return out, grads


def _assert_same(b: TransformersBackend, items: list[BatchItem]) -> None:
    packed, gp = _run(b, items, True)
    padded, gq = _run(b, items, False)
    for x, y in zip(packed, padded, strict=True):
        assert x.metrics.keys() == y.metrics.keys()
        for k in x.metrics:
            assert x.metrics[k] == pytest.approx(y.metrics[k], rel=1e-5, abs=1e-5), k
        for ox, oy in zip(x.loss_fn_outputs, y.loss_fn_outputs, strict=True):
            for k in ox:
                np.testing.assert_allclose(ox[k].to_numpy(), oy[k].to_numpy(), atol=1e-5, rtol=1e-5)
    trained = {it.adapter for it in items if not it.forward_only}
    for name in gp:
        if name not in trained:
            assert all(g is None for g in gp[name]) and all(g is None for g in gq[name])
            continue
        for x, y in zip(gp[name], gq[name], strict=True):
            assert x is not None and y is not None and float(y.abs().max()) > 0
            # float32 sums run in another order (shared prefixes: one gradient summed over its uses)
            assert float((x - y).abs().max()) <= 2e-5 * float(y.abs().max()) + 1e-7


def test_packing_is_used_and_exact_for_one_adapter(backend, monkeypatch):
    data = _datums(9, seed=1)
    rows: list[int] = []
    real = backend._forward_logits

    def spy(ids, *a, **k):
        rows.append(int(ids.shape[0]))
        return real(ids, *a, **k)

    monkeypatch.setattr(backend, "_forward_logits", spy)
    _assert_same(backend, [BatchItem("a", data)])
    assert backend._pack_ok is True
    assert rows[-2] < 9 and rows[-1] == 9  # packed pass used fewer rows than the padded one


def test_packing_is_exact_for_a_mixed_batch(backend):
    items = [BatchItem("a", _datums(4, seed=2)), BatchItem("b", _datums(5, seed=3, lo=1, hi=6)),
             BatchItem("c", _datums(3, seed=4)), BatchItem(None, _datums(3, seed=5), forward_only=True),
             BatchItem("b", _datums(2, seed=6), forward_only=True)]
    _assert_same(backend, items)


def test_shared_prefixes_are_used_and_exact(backend, monkeypatch):
    """GRPO-like groups (one prompt, several completions) share the prompt's pass: same results."""
    seen: list[bool] = []
    real = backend._forward_logits

    def spy(ids, *a, mask=None, **k):
        seen.append(mask is not None)
        return real(ids, *a, mask=mask, **k)

    monkeypatch.setattr(backend, "_forward_logits", spy)
    dup = _datums(3, seed=14)  # identical datums share all their tokens (an empty remainder each)
    items = [BatchItem("a", _datums(12, seed=11, groups=3)), BatchItem("b", _datums(8, seed=12, groups=2)),
             BatchItem("c", _datums(4, seed=13) + dup + dup[:2])]
    _assert_same(backend, items)
    assert backend._share_ok is True and seen[-2] is True and seen[-1] is False


def test_shared_prefix_layout_shares_each_prompt_once():
    from twinkle.model.transformers._pack import share_prefixes

    rng = np.random.default_rng(0)
    header = rng.integers(1, 300, size=8)  # every prompt starts alike (a chat template): not a group of its own
    prompts = [np.concatenate([header, rng.integers(1, 300, size=12)]) for _ in range(2)]
    tokens = [np.concatenate([prompts[i % 2], rng.integers(1, 300, size=3 + i)]) for i in range(6)]
    lay = share_prefixes(tokens, [(0, 6, "a")])
    assert lay is not None
    flat_ids = lay.ids.reshape(-1)
    for t, ix in zip(tokens, lay.index, strict=True):
        np.testing.assert_array_equal(flat_ids[ix], t)  # each datum reads back in order
        np.testing.assert_array_equal(lay.pos.reshape(-1)[ix], np.arange(t.size))
        r, cols = ix[0] // lay.ids.shape[1], ix % lay.ids.shape[1]
        sub = lay.allow[r][np.ix_(cols, cols)]
        np.testing.assert_array_equal(sub, np.tril(np.ones_like(sub)))  # causal over its own tokens
        assert lay.allow[r][cols].sum() == sub.sum()  # and nothing else
    # two prompts of 20 tokens laid out once each, not six times (nor one group for the shared header)
    assert (lay.ids != 0).sum() == 2 * 20 + sum(3 + i for i in range(6))
    assert share_prefixes([np.arange(5), np.arange(10, 16)], [(0, 2, None)]) is None  # nothing shared


# twinkle's own losses (another test module may have a toy loss registered while this one is collected)
@pytest.mark.parametrize("loss", [n for n in list_losses() if get_loss(n).numpy_fn.__module__.startswith("twinkle.")])
def test_packing_is_exact_for_every_loss(backend, loss):
    data = _datums(6, seed=7, groups=2)
    spec = get_loss(loss)
    cfg = {"beta": 0.2} if loss == "dpo" else None
    if spec.needs_reference:  # reference logprobs come from a (packed) base-model pass too
        data = [Datum(model_input=d.model_input, loss_fn_inputs={"target_tokens": d.loss_fn_inputs["target_tokens"]})
                for d in data]
    _assert_same(backend, [BatchItem("a", data, loss_fn=loss, loss_fn_config=cfg),
                           BatchItem("b", _datums(3, seed=8)), BatchItem("c", _datums(5, seed=9, groups=1))])


def test_two_dimensional_targets_are_packed_exactly(backend):
    rng = np.random.default_rng(9)
    data = []
    for k in (4, 7, 2, 9):
        toks = rng.integers(0, 300, size=k)
        data.append(Datum(model_input=ModelInput.from_ints(toks.tolist()),
                          loss_fn_inputs={"target_tokens": rng.integers(0, 300, size=(k, 3))}))
    _assert_same(backend, [BatchItem("a", data, forward_only=True)])


def test_packing_off_option_and_a_failed_probe_keep_the_padded_layout(monkeypatch):
    torch.set_num_threads(1)
    b = TransformersBackend(str(tiny_model_path()), device="cpu", packing=False)
    assert b._can_pack() is False and b._pack_ok is None  # no probe when off
    b.packing = True
    monkeypatch.setattr("twinkle.model.transformers.backend.packing_is_exact", lambda *a, **k: False)
    assert b._can_pack() is False and b._pack_ok is False
    b.close()
