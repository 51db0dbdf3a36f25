"""Sampling's inference kernels (``twinkle.model.transformers._decode``): base weights packed for oneDNN and one
adapter's merged weights. Sampled logprobs stay exact against a full forward, a merge never outlives the
weights it was built from (optim_step, load, any in-place change), and training never sees either."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.live_lora import tiny_live_backend
from twinkle.model.base import BatchItem, SampleItem
from twinkle.model.transformers import _decode
from twinkle.types import AdamParams, Datum, LoraConfig, ModelInput, SamplingParams

PROMPT = [5, 17, 42, 99, 7, 3, 11]
pytestmark = pytest.mark.skipif(not _decode.available(torch.device("cpu"), torch.float32),
                                reason="this torch has no oneDNN packed linear")


_backend = tiny_live_backend


@pytest.fixture(scope="module")
def backend():
    torch.set_num_threads(1)
    mp = pytest.MonkeyPatch()
    mp.setattr(_decode, "MERGE_AFTER_TOKENS", 16)  # tiny requests here: merge after a few decode steps
    b = _backend()
    yield b
    b.close()
    mp.undo()


def _sample(backend, adapter="a", n=1, max_tokens=12, **params):
    params.setdefault("temperature", 1.0)
    params.setdefault("seed", 3)
    sp = SamplingParams(max_tokens=max_tokens, stop=[], **params)
    return backend.sample([SampleItem(adapter, list(PROMPT), n, sp, True)])[0]


def _full_logprobs(backend, adapter, seq):
    d = Datum(model_input=ModelInput.from_ints(seq[:-1]), loss_fn_inputs={"target_tokens": np.asarray(seq[1:])})
    return backend.run_batch([BatchItem(adapter, [d], forward_only=True)])[0].loss_fn_outputs[0]["logprobs"].to_numpy()


def _assert_exact(backend, out, adapter="a"):
    """Prompt and sampled logprobs equal a full forward pass (the training path: nn.Linear + LoRA)."""
    np.testing.assert_allclose(out.prompt_logprobs[1:], _full_logprobs(backend, adapter, PROMPT), atol=1e-4)
    for s in out.sequences:
        lp = _full_logprobs(backend, adapter, PROMPT + s.tokens)[len(PROMPT) - 1:]
        np.testing.assert_allclose(s.logprobs, lp, atol=1e-4)


def test_packed_linear_is_the_default_product_up_to_rounding():
    g = torch.Generator().manual_seed(0)
    for out_f, in_f in ((64, 64), (128, 64), (64, 128)):
        w, b = torch.randn(out_f, in_f, generator=g), torch.randn(out_f, generator=g)
        x = torch.randn(9, in_f, generator=g)
        packed = _decode.pack(w)
        np.testing.assert_allclose(_decode.linear(x, packed, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(_decode.linear(x[:, None], packed, None)[:, 0], x @ w.T, rtol=1e-5, atol=1e-5)


def test_packed_layouts_by_dtype():
    w = torch.randn(24, 16)
    packed = _decode.pack(w)  # float32: the transposed weight, contiguous (the BLAS's fast layout for few rows)
    assert packed.shape == (16, 24) and packed.is_contiguous() and torch.equal(packed, w.T)
    x = torch.randn(2, 16, dtype=torch.bfloat16)
    wb = w.to(torch.bfloat16)
    np.testing.assert_allclose(_decode.linear(x, _decode.pack(wb), None).float(), F.linear(x, wb).float(),
                               rtol=2e-2, atol=2e-2)


def test_onednn_float32_layout_is_the_default_product_up_to_rounding():
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(48, 32, generator=g), torch.randn(48, generator=g)
    packed = _decode.pack(w, dnn=True)
    assert packed.is_mkldnn and packed.dtype == torch.float32
    for rows in (1, 8, 33):
        x = torch.randn(rows, 32, generator=g)
        np.testing.assert_allclose(_decode.linear(x, packed, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("slow", [True, False])
def test_the_float32_layout_is_the_one_that_timed_faster(monkeypatch, slow):
    """``faster_layout`` keeps whichever layout its timed passes found faster: slow one down and the other wins."""
    b = _backend()
    real = _decode.linear

    def linear(x, packed, bias):
        if packed.is_mkldnn == slow:
            torch.matmul(x, torch.zeros(x.shape[-1], 2048))  # extra work for that layout only
        return real(x, packed, bias)

    monkeypatch.setattr(_decode, "linear", linear)
    try:
        layers = list(b._layers.values())
        dnn, packed = _decode.faster_layout(layers)
        assert dnn is not slow
        assert packed and all(p.is_mkldnn is dnn for p in packed)
    finally:
        b.close()


@pytest.mark.parametrize("dnn", [True, False])
def test_sampling_is_exact_with_either_float32_layout(monkeypatch, dnn):
    monkeypatch.setattr(_decode, "faster_layout", lambda layers: (dnn, []))
    monkeypatch.setattr(_decode, "MERGE_AFTER_TOKENS", 16)
    b = _backend()
    try:
        out = _sample(b, n=2, max_tokens=12)
        assert all(m.packed.is_mkldnn is dnn for m in b._layers.values())
        assert "a" in b._merged.adapters()  # the merge is laid out like the base weights
        assert all(m.merged["a"].is_mkldnn is dnn for m in b._layers.values() if "a" in m.merged)
        _assert_exact(b, out)
        _assert_exact(b, _sample(b, n=1, max_tokens=10))
    finally:
        b.close()


def test_sampling_packs_and_merges_and_stays_exact(backend):
    out = _sample(backend, n=3, max_tokens=12)
    assert all(m.packed is not None for m in backend._layers.values())
    merged = backend._merged
    assert merged is not None and "a" in merged.adapters() and merged.builds >= 1
    adapted = [backend._layers[m] for m in backend._adapters["a"].modules]
    assert all("a" in m.merged for m in adapted)
    _assert_exact(backend, out)
    # the merged weights are what the sampling passes multiply by: spoil one and the logprobs move
    layer = adapted[0]
    good = layer.merged["a"]
    zeros = torch.zeros_like(layer.base.weight)
    layer.merged["a"] = _decode.pack(zeros)
    try:
        spoiled = _sample(backend, max_tokens=6)
    finally:
        layer.merged["a"] = good
    assert np.abs(np.array(spoiled.prompt_logprobs[1:]) - np.array(out.prompt_logprobs[1:])).max() > 1e-2
    # one sequence decodes one row a step: a matrix-vector product by the merged weights
    _assert_exact(backend, _sample(backend, n=1, max_tokens=12))
    # the same request on a backend without decode kernels: the same tokens (greedy and seeded)
    plain = _backend(decode_kernels=False)
    try:
        for params in ({"temperature": 0.0}, {"temperature": 1.0, "seed": 9}):
            assert [s.tokens for s in _sample(plain, **params).sequences] == \
                [s.tokens for s in _sample(backend, **params).sequences]
        assert plain._merged is None and all(m.packed is None for m in plain._layers.values())
    finally:
        plain.close()


def test_a_merge_never_outlives_its_weights(backend, tmp_path):
    backend.add_adapter("u", LoraConfig(rank=4, seed=5))
    try:
        before = _sample(backend, "u")
        assert "u" in backend._merged.adapters()
        backend.save("u", tmp_path / "ckpt")
        # a training step changes the weights: the merge is dropped at once, and sampling sees the new weights
        d = Datum(model_input=ModelInput.from_ints(PROMPT[:-1]), loss_fn_inputs={"target_tokens": np.asarray(PROMPT[1:])})
        backend.run_batch([BatchItem("u", [d])])
        backend.optim_step("u", AdamParams(learning_rate=0.05))
        assert "u" not in backend._merged.adapters()
        assert all("u" not in m.merged for m in backend._layers.values())
        after = _sample(backend, "u")
        assert "u" in backend._merged.adapters()
        assert np.abs(np.array(after.sequences[0].logprobs) - np.array(before.sequences[0].logprobs)).max() > 1e-3
        _assert_exact(backend, after, "u")
        # an in-place change outside optim_step (no explicit drop) is caught by the parameters' versions
        with torch.no_grad():
            for pair in backend._adapters["u"].pairs.values():
                pair.lora_B.mul_(-1.0)
        _assert_exact(backend, _sample(backend, "u"), "u")
        # loading a checkpoint into the adapter: the old weights come back exactly
        backend.load("u", tmp_path / "ckpt")
        again = _sample(backend, "u")
        assert again.sequences[0].tokens == before.sequences[0].tokens
        np.testing.assert_allclose(again.sequences[0].logprobs, before.sequences[0].logprobs, atol=1e-5)
        _assert_exact(backend, again, "u")
    finally:
        backend.remove_adapter("u")
    assert "u" not in backend._merged.adapters()
    assert all("u" not in m.merged for m in backend._layers.values())


def test_training_never_uses_the_inference_weights(backend):
    """Gradients and loss of a training pass are bit-identical with or without packed/merged weights around."""
    _sample(backend)  # packed and merged
    assert "a" in backend._merged.adapters()
    plain = _backend(decode_kernels=False)
    try:
        d = Datum(model_input=ModelInput.from_ints(PROMPT + [1, 2, 3]),
                  loss_fn_inputs={"target_tokens": np.asarray(PROMPT[1:] + [1, 2, 3, 4])})
        grads = []
        for b in (backend, plain):
            out = b.run_batch([BatchItem("a", [d])])[0]
            grads.append((out.metrics["loss:sum"], [p.grad.clone() for p in b._adapters["a"].parameters()]))
            for p in b._adapters["a"].parameters():
                p.grad = None
        assert grads[0][0] == grads[1][0]
        for ga, gb in zip(grads[0][1], grads[1][1], strict=True):
            assert torch.equal(ga, gb)
    finally:
        plain.close()


def test_bf16_models_pack_but_never_merge():
    b = _backend(dtype="bfloat16")
    try:
        _sample(b, max_tokens=8)
        assert b._packed and b._merged is None
        assert all(not m.merged for m in b._layers.values())
    finally:
        b.close()


def test_merges_are_bought_after_enough_tokens_and_evicted_least_recent_first(backend, monkeypatch):
    assert backend._decode_kernels() and backend._merged is not None  # whichever test of the module ran first
    backend._merged.drop()
    monkeypatch.setattr(_decode, "MERGE_AFTER_TOKENS", 40)
    monkeypatch.setattr(_decode, "MAX_MERGED", 2)
    names = ["m0", "m1", "m2"]
    for i, name in enumerate(names):
        backend.add_adapter(name, LoraConfig(rank=4, seed=20 + i))
    try:
        _sample(backend, "m0", max_tokens=4)  # 7 + 3 tokens: a short decode pays no merge
        assert backend._merged.adapters() == []
        _sample(backend, "m0", max_tokens=30)  # 40 tokens of the same weights in all: merged
        assert backend._merged.adapters() == ["m0"]
        for name in ("m1", "m2"):
            _sample(backend, name, max_tokens=40)
        assert backend._merged.adapters() == ["m1", "m2"]  # at most 2; m0 went first
        assert all("m0" not in m.merged for m in backend._layers.values())
        _assert_exact(backend, _sample(backend, "m1", max_tokens=8), "m1")
        # a batch of two adapters never uses a merge (and counts towards none)
        sp = SamplingParams(max_tokens=6, stop=[], temperature=0.0)
        mixed = backend.sample([SampleItem("m0", list(PROMPT), 1, sp), SampleItem("m1", list(PROMPT), 1, sp)])
        alone = [_sample(backend, n, max_tokens=6, temperature=0.0).sequences[0] for n in ("m0", "m1")]
        assert [r.sequences[0].tokens for r in mixed] == [s.tokens for s in alone]
        assert backend._merged.adapters() == ["m2", "m1"]
    finally:
        for name in names:
            backend.remove_adapter(name)
    assert backend._merged.adapters() == []
