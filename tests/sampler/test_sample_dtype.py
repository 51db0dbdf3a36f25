"""``sample_dtype: bfloat16``: a float32 model samples with bfloat16 copies of its base weights (oneDNN on CPU).
Sampled and prompt logprobs are those of that pass, close to a float32 forward (about 1e-2), the adapter's update
is kept whole (its LoRA products stay float32: a bfloat16 merge would round it away), training and forward passes
stay float32 and exact, and a seed still decides the tokens. The default (float32) is exact: ``test_decode_kernels``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.live_lora import tiny_live_backend
from twinkle.model.base import BatchItem, SampleItem
from twinkle.model.transformers import TransformersBackend, _decode
from twinkle.model.transformers._random import tiny_model_path
from twinkle.types import Datum, InvalidInputError, ModelInput, SamplingParams

PROMPT = [5, 17, 42, 99, 7, 3, 11]
pytestmark = pytest.mark.skipif(not _decode.available(torch.device("cpu"), torch.bfloat16),
                                reason="this torch has no oneDNN bfloat16 linear")
TOL = 0.1  # bfloat16 weights: measured differences are 0.002-0.03 on the tiny model


_backend = tiny_live_backend


@pytest.fixture(scope="module")
def pair():
    torch.set_num_threads(1)
    fast, exact = _backend(sample_dtype="bfloat16"), _backend()
    yield fast, exact
    fast.close()
    exact.close()


def _sample(b, adapter="a", n=1, max_tokens=12, seed=3, prompt=PROMPT):
    sp = SamplingParams(max_tokens=max_tokens, stop=[], temperature=1.0, seed=seed)
    return b.sample([SampleItem(adapter, list(prompt), n, sp, True)])[0]


def _full(b, adapter, seq):
    d = Datum(model_input=ModelInput.from_ints(seq[:-1]), loss_fn_inputs={"target_tokens": np.asarray(seq[1:])})
    return b.run_batch([BatchItem(adapter, [d], forward_only=True)])[0].loss_fn_outputs[0]["logprobs"].to_numpy()


def _gap(b, out, adapter):
    """The largest difference of the sample's prompt and sampled logprobs from a float32 forward pass."""
    gaps = [np.abs(np.array(out.prompt_logprobs[1:]) - _full(b, adapter, PROMPT)).max()]
    for s in out.sequences:
        gaps.append(np.abs(np.array(s.logprobs) - _full(b, adapter, PROMPT + s.tokens)[len(PROMPT) - 1:]).max())
    return max(gaps)


@pytest.mark.parametrize("adapter", ["a", None])
def test_bfloat16_sampling_is_close_to_the_float32_forward_not_equal(pair, adapter):
    fast, _ = pair
    out = _sample(fast, adapter, n=3)
    assert all(m.packed is not None and m.packed.dtype == torch.bfloat16 for m in fast._layers.values())
    assert fast._merged is None  # no merges into bfloat16 weights
    gap = _gap(fast, out, adapter)
    assert 1e-6 < gap < TOL  # bfloat16 products really ran, and stayed close


def test_the_adapter_update_is_kept_whole(pair):
    fast, _ = pair
    out = _sample(fast, "a", n=2)
    base = _full(fast, None, PROMPT)
    moved = np.abs(_full(fast, "a", PROMPT) - base).max()
    assert moved > 10 * TOL  # the adapter moves the logprobs far more than bfloat16 rounding does
    assert _gap(fast, out, "a") < TOL  # and the bfloat16 sample follows the adapter, not the base model


def test_an_update_below_bfloat16_rounding_still_counts(pair):
    """An early-training adapter's update is far below half a bfloat16 step of its weights: merged into a bfloat16
    copy it would round away. The sampling pass adds it in float32, so a layer's output moves by exactly it."""
    from twinkle.model.transformers._lora import Routing

    fast, _ = pair
    _sample(fast)  # packed now
    name = next(n for n in fast._adapters["a"].modules if "q_proj" in n)
    layer, pair_ = fast._layers[name], fast._adapters["a"].pairs[name]
    with torch.no_grad():
        keep = pair_.lora_B.clone()
        pair_.lora_B.copy_(torch.randn(pair_.lora_B.shape, generator=torch.Generator().manual_seed(3)) * 1e-5)
    try:
        w = layer.base.weight
        delta_w = pair_.scale * pair_.lora_B.detach() @ pair_.lora_A.detach()
        ulp = torch.finfo(torch.bfloat16).eps * w.abs()
        assert (delta_w.abs() < ulp / 2).float().mean() > 0.9  # a bfloat16 merge would drop most of it
        x = torch.randn(3, w.shape[1], generator=torch.Generator().manual_seed(4))
        outs = {}
        with torch.no_grad():
            for adapter in ("a", None):
                fast._routing[0] = Routing([(0, 3, adapter)], infer=True)
                try:
                    outs[adapter] = layer(x)
                finally:
                    fast._routing[0] = None
            want = x @ delta_w.T
        assert want.abs().max() > 1e-6
        np.testing.assert_allclose((outs["a"] - outs[None]).numpy(), want.numpy(), atol=2e-7)
    finally:
        with torch.no_grad():
            pair_.lora_B.copy_(keep)


def test_training_and_forward_passes_stay_float32_exact(pair):
    fast, exact = pair
    _sample(fast)  # packed now
    seq = PROMPT + [8, 9, 10]
    for adapter in ("a", None):
        np.testing.assert_array_equal(_full(fast, adapter, seq), _full(exact, adapter, seq))


def test_a_seed_decides_the_tokens(pair):
    fast, _ = pair
    one = _sample(fast, seed=11, max_tokens=10)
    again = _sample(fast, seed=11, max_tokens=10)
    other = _sample(fast, seed=12, max_tokens=10)
    assert one.sequences[0].tokens == again.sequences[0].tokens
    assert one.sequences[0].tokens != other.sequences[0].tokens


def test_exact_by_default_and_bad_values_refused(pair):
    _, exact = pair
    _sample(exact)
    assert exact.sample_dtype is None
    assert all(m.packed is None or m.packed.dtype == torch.float32 for m in exact._layers.values())
    with pytest.raises(InvalidInputError, match="sample_dtype"):
        TransformersBackend(str(tiny_model_path()), device="cpu", sample_dtype="int4")
