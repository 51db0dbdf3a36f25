"""The lean sampling forward (``twinkle.model.transformers._lean``): for every family it serves, its logits equal
the Hugging Face forward's (the same packed/merged linears, per-segment LoRA of two adapters and base rows in one
batch, left padding, a prefill in chunks and decode steps on the same cache); families it does not reproduce keep
the HF forward; a model whose probe disagrees keeps it too, and samples the same."""

from __future__ import annotations

import pytest
import torch

from tests.live_lora import add_live_adapters
from twinkle.model.base import SampleItem
from twinkle.model.transformers import TransformersBackend, _decode, _lean
from twinkle.model.transformers._families import FAMILIES, build_family
from twinkle.sampler.engine import kv_append
from twinkle.types import SamplingParams

pytestmark = pytest.mark.skipif(not _decode.available(torch.device("cpu"), torch.float32),
                                reason="this torch has no oneDNN packed linear")


def _backend(family: str, tmp_path) -> TransformersBackend:
    torch.set_num_threads(1)
    b = TransformersBackend(str(build_family(family, tmp_path / family)), device="cpu")
    add_live_adapters(b, ("a", "b"), seed=3, scale=0.3)
    return b


def _passes(b: TransformersBackend, lean: bool) -> list[torch.Tensor]:
    """Logits of a mixed batch (rows: a, a, b, base; left-padded) prefilled in two chunks, then 3 decode steps."""
    g = torch.Generator().manual_seed(1)
    rows, w = 4, 9
    ids = torch.randint(3, b.vocab_size, (rows, w), generator=g)
    mask = torch.ones((rows, w), dtype=torch.long)
    mask[1, :4] = 0
    mask[3, :2] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    segs = [(0, 2, "a"), (2, 3, "b"), (3, 4, None)]
    fwd = b._forward_logits
    kw = dict(train=False, use_cache=True, infer=True, lean=lean)
    out = []
    logits, cache = fwd(ids[:, :5], segs, mask=mask[:, :5], pos=pos[:, :5], cache=None, **kw)
    out.append(logits[mask[:, :5].bool()])
    logits, cache = fwd(ids[:, 5:], segs, mask=mask, pos=pos[:, 5:], cache=cache, **kw)
    out.append(logits[mask[:, 5:].bool()])
    nxt, p, m = logits[:, -1].argmax(-1, keepdim=True), pos[:, -1:] + 1, mask
    for _ in range(3):
        m = torch.cat([m, m.new_ones((rows, 1))], dim=1)
        logits, cache = fwd(nxt, segs, mask=m, pos=p, cache=cache, **kw)
        out.append(logits[:, -1])
        nxt, p = logits[:, -1].argmax(-1, keepdim=True), p + 1
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_lean_forward_equals_the_models_own(family, tmp_path):
    b = _backend(family, tmp_path)
    with torch.no_grad():
        assert b._decode_kernels()
        lean = b._lean_decoder()
        assert (lean is not None) == (family in _lean.FAMILIES)
        if lean is None:
            b.close()
            return
        mine, ref = _passes(b, True), _passes(b, False)
    for x, y in zip(mine, ref, strict=True):
        torch.testing.assert_close(x, y, atol=2e-5, rtol=1e-4)
    assert float((mine[0] - mine[0].mean()).abs().max()) > 0.1  # not a degenerate model
    b.close()


def test_merged_adapter_through_the_lean_forward(tmp_path, monkeypatch):
    """A single-adapter batch on merged weights: the lean forward's greedy tokens and logprobs equal the HF
    forward's on the same merge (and the merge was used)."""
    monkeypatch.setattr(_decode, "MERGE_AFTER_TOKENS", 8)
    b = _backend("qwen3", tmp_path)
    sp = SamplingParams(max_tokens=10, temperature=0.0, stop=[])
    item = SampleItem("a", [5, 17, 42, 99, 7], 1, sp)
    with_lean = b.sample([item])[0].sequences[0]
    assert b._lean_decoder() is not None and b._merged is not None and b._merged.adapters() == ["a"]
    b._lean = None  # the HF forward from here on
    without = b.sample([item])[0].sequences[0]
    assert with_lean.tokens == without.tokens
    torch.testing.assert_close(torch.tensor(with_lean.logprobs), torch.tensor(without.logprobs), atol=1e-5, rtol=0)
    b.close()


def test_a_disagreeing_lean_forward_is_not_used(tmp_path, monkeypatch, caplog):
    """The probe compares with the HF forward before first use: a lean forward that computes something else
    (here a wrong norm epsilon) is refused, and sampling goes on with the HF forward, unchanged."""
    b = _backend("llama", tmp_path)
    sp = SamplingParams(max_tokens=6, temperature=0.0, stop=[])
    item = SampleItem("a", [5, 17, 42, 99], 1, sp)
    expected = b.sample([item])[0].sequences[0].tokens
    assert b._lean_decoder() is not None
    b._lean = False  # probe again, with a broken norm
    monkeypatch.setattr(_lean, "_eps", lambda norm: 0.5)
    with caplog.at_level("WARNING"):
        assert b._lean_decoder() is None
    assert "differs from the model's own" in caplog.text
    assert b.sample([item])[0].sequences[0].tokens == expected
    b.close()


def test_cache_grows_in_place_and_survives_row_surgery():
    """``kv_append`` writes each step's columns into spare room (no copy of the layer) and, after the
    continuous sampler's row surgery replaced the tensors, starts a new buffer: the cached keys/values always
    equal plain concatenation."""
    from transformers import DynamicCache

    from twinkle.sampler import _kv

    g = torch.Generator().manual_seed(0)
    cache = DynamicCache()
    ref: list[torch.Tensor] = []

    def step(n: int, rows: int = 3) -> None:
        k, v = torch.randn(rows, 2, n, 4, generator=g), torch.randn(rows, 2, n, 4, generator=g)
        keys, values = kv_append(cache, 0, k, v)
        ref[:] = [k, v] if not ref else [torch.cat([ref[0], k], 2), torch.cat([ref[1], v], 2)]
        assert torch.equal(keys, ref[0]) and torch.equal(values, ref[1])
        assert keys is cache.layers[0].keys and _kv.supports(cache)

    step(5)
    step(1)
    buf = cache.layers[0]._twinkle_buf[0]
    step(1)
    assert cache.layers[0]._twinkle_buf[0] is buf and cache.layers[0].keys.data_ptr() == buf.data_ptr()  # in place
    idx = torch.tensor([2, 0, 0])
    _kv.select(cache, idx)
    ref[:] = [t.index_select(0, idx) for t in ref]
    step(1)
    assert cache.layers[0]._twinkle_buf[0] is not buf  # a repeated row: copied, then into a new buffer
    _kv.trim_left(cache, 2)
    ref[:] = [t[:, :, 2:] for t in ref]
    step(1)
    _kv.left_pad(cache, 3)
    ref[:] = [torch.nn.functional.pad(t, (0, 0, 3, 0)) for t in ref]
    for _ in range(80):  # past the spare room: a bigger buffer
        step(1)
    assert cache.layers[0].keys.shape[2] == ref[0].shape[2] == 5 + 3 - 2 + 1 + 3 + 80


def test_partial_rotary_phi3(tmp_path, monkeypatch):
    """Phi-3 with rotary on half of each head: the lean forward rotates those dims only and matches HF."""
    from twinkle.model.transformers import _families

    make = _families._config

    def half_rotary(name, vocab, eos, pad):
        cfg = make(name, vocab, eos, pad)
        cfg.rope_parameters = {**cfg.rope_parameters, "partial_rotary_factor": 0.5}
        return cfg

    monkeypatch.setattr(_families, "_config", half_rotary)
    b = _backend("phi3", tmp_path)
    with torch.no_grad():
        assert b._decode_kernels() and b._lean_decoder() is not None
        cos, _ = b.model.model.rotary_emb(torch.zeros(1, 1, 1), torch.zeros((1, 1), dtype=torch.long))
        assert cos.shape[-1] < b.model.config.hidden_size // b.model.config.num_attention_heads
        for x, y in zip(_passes(b, True), _passes(b, False), strict=True):
            torch.testing.assert_close(x, y, atol=2e-5, rtol=1e-4)
    b.close()


def test_a_lean_forward_that_raises_in_its_probe_is_not_used(tmp_path, monkeypatch, caplog):
    """A layout the lean forward misreads may raise instead of differing: the backend keeps the HF forward."""
    b = _backend("qwen2", tmp_path)
    sp = SamplingParams(max_tokens=5, temperature=0.0, stop=[])
    item = SampleItem("a", [5, 17, 42, 99], 1, sp)

    def broken(*args, **kwargs):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(_lean.LeanDecoder, "forward", broken)
    with caplog.at_level("WARNING"):
        out = b.sample([item])[0].sequences[0].tokens
    assert b._lean_decoder() is None and "failed its probe (RuntimeError: shape mismatch)" in caplog.text
    monkeypatch.undo()
    b._lean = False
    assert b.sample([item])[0].sequences[0].tokens == out and b._lean_decoder() is not None
    b.close()
