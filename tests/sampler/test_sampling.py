"""KV-cache sampling on the transformers backend: greedy, seeds, stops, logprobs, mixed-adapter batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.live_lora import add_live_adapters
from twinkle.model.base import BatchItem, SampleItem
from twinkle.model.transformers import TransformersBackend
from twinkle.model.transformers._random import tiny_model_path
from twinkle.types import Datum, InvalidInputError, ModelInput, NotFoundError, SamplingParams

PROMPT = [5, 17, 42, 99, 7, 3]


@pytest.fixture(scope="module")
def backend():
    torch.set_num_threads(1)
    b = TransformersBackend(str(tiny_model_path()), device="cpu")
    add_live_adapters(b, ("a", "b"), seed=100, scale=0.2)
    yield b
    b.close()


def _one(backend, adapter="a", prompt=PROMPT, n=1, **params):
    return backend.sample([SampleItem(adapter, list(prompt), n, SamplingParams(**params))])[0]


def _forward_logprobs(backend, adapter, prompt, tokens):
    seq = list(prompt) + list(tokens)
    d = Datum(model_input=ModelInput.from_ints(seq[:-1]), loss_fn_inputs={"target_tokens": np.asarray(seq[1:])})
    out = backend.run_batch([BatchItem(adapter, [d], forward_only=True)])[0]
    return out.loss_fn_outputs[0]["logprobs"].to_numpy()


def test_greedy_is_deterministic_and_equals_argmax(backend):
    r1 = _one(backend, max_tokens=8, temperature=0.0, stop=[])
    r2 = _one(backend, max_tokens=8, temperature=0.0, stop=[])
    assert r1.sequences[0].tokens == r2.sequences[0].tokens and len(r1.sequences[0].tokens) == 8
    assert r1.sequences[0].stop_reason == "length"
    # top_k=1 or a tiny top_p at temperature 1 is greedy too
    assert _one(backend, max_tokens=8, temperature=1.0, top_k=1, seed=5, stop=[]).sequences[0].tokens == r1.sequences[0].tokens
    assert _one(backend, max_tokens=8, temperature=1.0, top_p=1e-6, seed=5, stop=[]).sequences[0].tokens == r1.sequences[0].tokens


def test_same_seed_same_samples(backend):
    a = _one(backend, n=3, max_tokens=10, temperature=1.0, seed=11, stop=[])
    b = _one(backend, n=3, max_tokens=10, temperature=1.0, seed=11, stop=[])
    c = _one(backend, n=3, max_tokens=10, temperature=1.0, seed=12, stop=[])
    toks = [s.tokens for s in a.sequences]
    assert toks == [s.tokens for s in b.sequences]
    assert toks != [s.tokens for s in c.sequences]
    assert len({tuple(t) for t in toks}) > 1  # the samples of one request differ


def test_sampled_logprobs_match_forward_pass(backend):
    resp = _one(backend, n=2, max_tokens=12, temperature=1.0, seed=3, stop=[])
    for s in resp.sequences:
        lp = _forward_logprobs(backend, "a", PROMPT, s.tokens)
        np.testing.assert_allclose(s.logprobs, lp[-len(s.tokens):], atol=1e-4)


def test_prompt_logprobs_and_topk(backend):
    resp = backend.sample([SampleItem("a", PROMPT, 1, SamplingParams(max_tokens=1, temperature=0.0),
                                      prompt_logprobs=True, topk_prompt_logprobs=3)])[0]
    assert resp.prompt_logprobs[0] is None and resp.topk_prompt_logprobs[0] is None
    lp = _forward_logprobs(backend, "a", PROMPT[:1], PROMPT[1:])
    np.testing.assert_allclose(resp.prompt_logprobs[1:], lp, atol=1e-4)
    for j, top in enumerate(resp.topk_prompt_logprobs[1:]):
        vals = [v for _, v in top]
        assert len(top) == 3 and vals == sorted(vals, reverse=True) and vals[0] >= lp[j] - 1e-5


def test_stop_strings_and_tokens(backend):
    tok = backend.tokenizer()
    free = _one(backend, max_tokens=16, temperature=0.0, stop=[]).sequences[0].tokens
    text = tok.decode(free)
    # a stop string completed by the 4th generated token
    prefix3, prefix4 = tok.decode(free[:3]), tok.decode(free[:4])
    stop_str = prefix4[len(prefix3) - 1:] if len(prefix4) > len(prefix3) else prefix4
    assert stop_str in text
    got = _one(backend, max_tokens=16, temperature=0.0, stop=stop_str).sequences[0]
    assert got.stop_reason == "stop" and stop_str in tok.decode(got.tokens)
    assert stop_str not in tok.decode(got.tokens[:-1]) and len(got.tokens) < 16
    # a stop token is included at the end
    t = free[5]
    got = _one(backend, max_tokens=16, temperature=0.0, stop=[t]).sequences[0]
    assert got.stop_reason == "stop" and got.tokens[-1] == t and got.tokens == free[: free.index(t) + 1]


def test_eos_is_the_default_stop_and_empty_list_disables_it():
    from twinkle.sampler import generate

    def forward(ids, mask, pos, cache, segments):  # a fake model whose favourite next token is always 7
        logits = torch.zeros(ids.shape[0], ids.shape[1], 10)
        logits[..., 7] = 5.0
        return logits, cache

    def run(stop):
        item = SampleItem(None, [1, 2], 1, SamplingParams(max_tokens=4, temperature=0.0, stop=stop))
        return generate(forward, [item], eos_ids=[7], vocab_size=10, max_length=32, device=torch.device("cpu"))[0]

    seq = run(None).sequences[0]
    assert seq.tokens == [7] and seq.stop_reason == "stop"
    seq = run([]).sequences[0]
    assert seq.tokens == [7, 7, 7, 7] and seq.stop_reason == "length"
    assert seq.logprobs == pytest.approx([float(torch.log_softmax(torch.tensor([0.0] * 7 + [5.0] + [0.0] * 2), 0)[7])] * 4)


def test_mixed_adapter_batch_equals_separate(backend):
    items = [SampleItem("a", PROMPT, 2, SamplingParams(max_tokens=6, temperature=0.0, stop=[])),
             SampleItem("b", PROMPT[:3], 1, SamplingParams(max_tokens=6, temperature=0.0, stop=[])),
             SampleItem(None, [8, 9, 10, 11], 1, SamplingParams(max_tokens=4, temperature=0.0, stop=[])),
             SampleItem("b", [1, 2, 3, 4, 5, 6, 7, 8], 1, SamplingParams(max_tokens=5, temperature=1.0, seed=4, stop=[]))]
    together = backend.sample(items)
    for it, resp in zip(items, together, strict=True):
        alone = backend.sample([it])[0]
        assert [s.tokens for s in resp.sequences] == [s.tokens for s in alone.sequences]
        for s, t in zip(resp.sequences, alone.sequences, strict=True):
            np.testing.assert_allclose(s.logprobs, t.logprobs, atol=1e-4)
            assert len(s.tokens) == it.params.max_tokens
    a_alone = backend.sample([SampleItem("a", PROMPT[:3], 1, SamplingParams(max_tokens=6, temperature=0.0, stop=[]))])[0]
    base = backend.sample([SampleItem(None, PROMPT[:3], 1, SamplingParams(max_tokens=6, temperature=0.0, stop=[]))])[0]
    lp_b = together[1].sequences[0].logprobs
    assert not np.allclose(lp_b, a_alone.sequences[0].logprobs, atol=1e-4)  # adapters really differ
    assert not np.allclose(lp_b, base.sequences[0].logprobs, atol=1e-4)


def test_sampling_validation(backend):
    with pytest.raises(NotFoundError):
        _one(backend, adapter="ghost", max_tokens=2)
    with pytest.raises(InvalidInputError) as e:
        _one(backend, prompt=[1, backend.vocab_size], max_tokens=2)
    assert e.value.field == "prompt"
    with pytest.raises(InvalidInputError):
        _one(backend, prompt=[], max_tokens=2)
