"""Continuous batching: joins mid-decode, shared prefill, chunked prefill, exact logprobs, seeds, the
scheduler's decode slices and KV-cache budget (builtin tiny model, two adapters with non-zero LoRA B)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from tests.live_lora import add_live_adapters
from twinkle.model.base import BatchItem, SampleItem
from twinkle.model.transformers import TransformersBackend
from twinkle.model.transformers._random import tiny_model_path
from twinkle.server.ops import SampleOp
from twinkle.server.scheduler import Scheduler, SchedulerConfig
from twinkle.types import CapacityError, Datum, ModelInput, SamplingParams

PROMPT = [5, 17, 42, 99, 7, 3, 11, 12, 13]


@pytest.fixture(scope="module")
def backend():
    torch.set_num_threads(1)
    b = TransformersBackend(str(tiny_model_path()), device="cpu")
    add_live_adapters(b, ("a", "b"), seed=100, scale=0.2)
    yield b
    b.close()


def _item(adapter, prompt=PROMPT, n=1, **params):
    params.setdefault("stop", [])
    return SampleItem(adapter, list(prompt), n, SamplingParams(**params))


def _full_logprobs(backend, adapter, seq):
    d = Datum(model_input=ModelInput.from_ints(seq[:-1]), loss_fn_inputs={"target_tokens": np.asarray(seq[1:])})
    out = backend.run_batch([BatchItem(adapter, [d], forward_only=True)])[0]
    return out.loss_fn_outputs[0]["logprobs"].to_numpy()


def _recording_engine(backend, **kw):
    calls: list[tuple[int, int]] = []
    eng = backend.sampler_engine(**kw)
    inner = eng.forward

    def forward(ids, mask, pos, cache, segments, **kw):
        calls.append(tuple(ids.shape))
        return inner(ids, mask, pos, cache, segments, **kw)

    eng.forward = forward
    return eng, calls


def test_join_mid_decode_and_leave_early(backend):
    eng, _ = _recording_engine(backend)
    eng.admit("long", _item("a", max_tokens=20, temperature=0.0))
    finished: list[str] = []
    for _ in range(4):
        finished += [k for k, _ in eng.step()]
    eng.admit("short", _item("b", PROMPT[:4], max_tokens=3, temperature=0.0))
    results = {}
    order = []
    while not eng.idle():
        for k, r in eng.step():
            order.append(k)
            results[k] = r
    assert order == ["short", "long"]  # the short request left as soon as its own sequence finished
    assert eng.stats["max_rows"] == 2 and eng.reserved == 0
    alone_short = backend.sample([_item("b", PROMPT[:4], max_tokens=3, temperature=0.0)])[0]
    alone_long = backend.sample([_item("a", max_tokens=20, temperature=0.0)])[0]
    assert results["short"].sequences[0].tokens == alone_short.sequences[0].tokens
    assert results["long"].sequences[0].tokens == alone_long.sequences[0].tokens
    np.testing.assert_allclose(results["long"].sequences[0].logprobs, alone_long.sequences[0].logprobs, atol=1e-4)


def test_shared_prefill_forks_one_row_and_logprobs_are_exact(backend):
    eng, calls = _recording_engine(backend, prefill_chunk=4)  # a 9-token prompt: prefilled in 3 chunks
    eng.admit(0, SampleItem("a", PROMPT, 4, SamplingParams(max_tokens=6, temperature=1.0, seed=3, stop=[]), True, 2))
    out = eng.run_all()[0]
    assert calls[:3] == [(1, 4), (1, 4), (1, 1)]  # one row, chunked; never once per sample
    assert all(c[0] == 4 for c in calls[3:])  # then the 4 forked rows decode together
    full = _full_logprobs(backend, "a", PROMPT)
    np.testing.assert_allclose(out.prompt_logprobs[1:], full, atol=1e-4)
    assert out.prompt_logprobs[0] is None and len(out.topk_prompt_logprobs) == len(PROMPT)
    for s in out.sequences:
        lp = _full_logprobs(backend, "a", PROMPT + s.tokens)[len(PROMPT) - 1:]
        np.testing.assert_allclose(s.logprobs, lp, atol=1e-4)
    assert len({tuple(s.tokens) for s in out.sequences}) > 1  # each sample has its own random stream


def test_requests_with_one_prompt_share_its_prefill(backend):
    """A GRPO group sent as one request per sample (the Tinker cookbook's way): requests of one adapter with the
    same prompt are prefilled in one row, each still gets its own seeded tokens and exact (prompt) logprobs;
    the same prompt for another adapter is a row of its own."""
    group = [SampleItem("a", PROMPT, 1, SamplingParams(max_tokens=5, temperature=1.0, seed=s, stop=[]), s == 0, 0)
             for s in range(4)]
    other = SampleItem("b", PROMPT, 2, SamplingParams(max_tokens=5, temperature=1.0, seed=9, stop=[]), False, 2)
    eng, calls = _recording_engine(backend)
    for i, it in enumerate([*group, other]):
        eng.admit(i, it)
    out = eng.run_all()
    assert calls[0] == (2, len(PROMPT))  # one prefill row for the group, one for adapter b
    assert all(c[0] == 6 for c in calls[1:])  # then 4 + 2 sequences decode together
    for i, it in enumerate([*group, other]):
        assert [s.tokens for s in out[i].sequences] == [s.tokens for s in backend.sample([it])[0].sequences]
        for seq in out[i].sequences:
            lp = _full_logprobs(backend, it.adapter, PROMPT + seq.tokens)[len(PROMPT) - 1:]
            np.testing.assert_allclose(seq.logprobs, lp, atol=1e-4)
    np.testing.assert_allclose(out[0].prompt_logprobs[1:], _full_logprobs(backend, "a", PROMPT), atol=1e-4)
    assert out[1].prompt_logprobs is None and len(out[4].topk_prompt_logprobs) == len(PROMPT)
    assert len({tuple(out[i].sequences[0].tokens) for i in range(4)}) > 1  # own seeds, own streams


def test_seeded_sample_is_the_same_alone_or_batched(backend):
    mine = _item("a", n=2, max_tokens=12, temperature=1.0, seed=42)
    alone = backend.sample([mine])[0]
    others = [_item("b", [3, 4, 5], n=3, max_tokens=7, temperature=0.9, seed=1),
              _item(None, [9] * 14, max_tokens=15, temperature=1.0, top_k=5),
              _item("a", [1, 2], max_tokens=4, temperature=0.7, top_p=0.8)]
    batched = backend.sample([others[0], mine, *others[1:]])[1]
    assert [s.tokens for s in batched.sequences] == [s.tokens for s in alone.sequences]
    # and joining a batch that is already decoding changes nothing either
    eng, _ = _recording_engine(backend)
    for i, o in enumerate(others):
        eng.admit(i, o)
    eng.step()
    eng.step()
    eng.admit("mine", mine)
    assert [s.tokens for s in eng.run_all()["mine"].sequences] == [s.tokens for s in alone.sequences]


def test_stop_strings_are_checked_incrementally(backend):
    greedy = backend.sample([_item("a", max_tokens=12, temperature=0.0)])[0].sequences[0].tokens
    text = backend._decode_text(greedy)
    stop = text[len(backend._decode_text(greedy[:5])):][:2]
    if not stop.strip():
        pytest.skip("the tiny model's 6th token decodes to whitespace")
    seq = backend.sample([_item("a", max_tokens=12, temperature=0.0, stop=[stop])])[0].sequences[0]
    assert seq.stop_reason == "stop" and stop in backend._decode_text(seq.tokens)
    assert len(seq.tokens) < 12 and seq.tokens == greedy[: len(seq.tokens)]


def _op(prompt, max_tokens, **kw):
    return SampleOp(prompt=list(prompt), num_samples=kw.pop("n", 1),
                    params=SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=[], **kw))


def test_scheduler_joins_running_batch_and_respects_kv_budget(backend):
    budget = 3 * (len(PROMPT) + 40) + 20  # the long request and a short one; three of the burst
    sched = Scheduler(backend, SchedulerConfig(sample_token_budget=budget, max_pending_total=120))
    peak = {"reserved": 0}

    async def main():
        long = sched.submit_sample(_op(PROMPT, 150), adapter="a")
        while sched._engine is None or sched._engine.stats["steps"] < 3:
            await asyncio.sleep(0.005)
        short = sched.submit_sample(_op(PROMPT[:3], 2), adapter="b")
        done, _ = await asyncio.wait([long, short], return_when=asyncio.FIRST_COMPLETED)
        assert short in done and not long.done()  # joined the running batch and left first
        await long
        eng = sched._engine
        inner = eng.step

        def step():
            peak["reserved"] = max(peak["reserved"], eng.reserved)
            return inner()

        eng.step = step
        burst, refused = [], []
        for i in range(200):  # a burst of 200: the first 120 queue (max_pending_total), the rest get 429
            try:
                burst.append(sched.submit_sample(_op(PROMPT, 40 if i < 9 else 3), adapter="ab"[i % 2]))
            except CapacityError as e:
                refused.append(e)
        assert len(burst) == 120 and len(refused) == 80
        assert all(e.status == 429 and e.retry_after > 0 for e in refused)
        outs = await asyncio.gather(*burst)
        assert [len(o.sequences[0].tokens) for o in outs] == [40] * 9 + [3] * 111
        await sched.close()

    asyncio.run(main())
    assert 2 * (len(PROMPT) + 40) < peak["reserved"] <= budget


def test_rows_leaving_and_joining_in_churn_keep_every_result_exact(backend):
    """Requests of two adapters and the base model with different lengths join and leave a running batch (rows
    move inside the cache's buffers as others finish): each gets the tokens and logprobs it gets alone."""
    eng, _ = _recording_engine(backend)
    reqs = {f"r{i}": _item(("a", "b", None)[i % 3], PROMPT[: 3 + i % 6], max_tokens=2 + (5 * i) % 11,
                           temperature=0.0) for i in range(12)}
    results = {}
    pending = list(reqs.items())
    while pending or not eng.idle():
        if pending and eng.stats["steps"] % 2 == 0:
            for _ in range(min(len(pending), 1 + eng.stats["steps"] % 3)):
                key, item = pending.pop(0)
                eng.admit(key, item)
        results.update(eng.step())
    assert eng.stats["joins"] > 3 and eng.stats["max_rows"] > 3
    for key, item in reqs.items():
        alone = backend.sample([item])[0].sequences[0]
        got = results[key].sequences[0]
        assert got.tokens == alone.tokens, key
        np.testing.assert_allclose(got.logprobs, alone.logprobs, atol=1e-4)
        lp = _full_logprobs(backend, item.adapter, item.prompt + got.tokens)[len(item.prompt) - 1:]
        np.testing.assert_allclose(got.logprobs, lp, atol=1e-4)


def test_aborted_requests_leave_wherever_they_are(backend):
    """``abort``: a waiting request never runs, one in a chunked prefill never joins the batch, a decoding one
    leaves at the next step; each is reported done with no response, its KV budget comes back at once, and the
    others' seeded tokens are the same as without it."""
    keep = _item("a", max_tokens=12, temperature=1.0, seed=5)
    alone = backend.sample([keep])[0]
    eng = backend.sampler_engine(prefill_chunk=4)
    eng.admit("keep", keep)
    eng.admit("queued", _item("b", [3, 4, 5], max_tokens=50, temperature=1.0))
    eng.abort("queued")  # never starts: the next step drops it before any prefill
    assert eng.step() == [("queued", None)] and eng.stats["aborted"] == 1
    eng.admit("decoding", _item("b", [9] * 6, n=3, max_tokens=200, temperature=1.0))
    while len(eng._rows) < 4:  # "keep" and the 3 rows of "decoding" in one batch
        assert not eng.step()
    reserved = eng.reserved
    eng.abort("decoding")
    assert eng.step() == [("decoding", None)] and len(eng._rows) == 1
    assert eng.reserved == reserved - _item("b", [9] * 6, n=3, max_tokens=200).num_samples * (6 + 200)
    eng.admit("prefilling", _item("b", list(range(3, 15)), max_tokens=40, temperature=1.0))
    eng.step()  # its 12-token prompt takes 3 chunks of 4: one is done
    assert eng._prefill is not None and eng._prefill.done == 4
    eng.abort("prefilling")
    rest = {}
    while not eng.idle():
        rest.update(eng.step())
        assert len(eng._rows) <= 1  # the aborted prefill's row never joins "keep"'s batch
    assert rest == {"prefilling": None, "keep": rest["keep"]} and rest["keep"] is not None
    assert [s.tokens for s in rest["keep"].sequences] == [s.tokens for s in alone.sequences]
    assert eng.reserved == 0 and eng.stats["aborted"] == 3 and eng.idle()
    eng.abort("gone")  # a key that is not there: ignored
    assert eng.step() == [] and eng.idle()


def test_ranked_tokens_need_the_continuous_sampler(backend, monkeypatch):
    """``topk_logprobs`` (the OpenAI route's top logprobs) is listed by the continuous sampler only: a backend
    that samples whole batches (megatron: ``sampler_engine()`` is None) fails such a request by name instead
    of answering without them, and the other requests of the same tick are served."""
    from twinkle.types import UnsupportedError

    monkeypatch.setattr(backend, "sampler_engine", lambda **kw: None)
    sched = Scheduler(backend, SchedulerConfig())

    async def main():
        ranked = sched.submit_sample(SampleOp(prompt=PROMPT, params=SamplingParams(max_tokens=3), topk_logprobs=2))
        plain = sched.submit_sample(_op(PROMPT, 3))
        with pytest.raises(UnsupportedError) as e:
            await ranked
        assert e.value.field == "topk_logprobs"
        assert len((await plain).sequences[0].tokens) == 3
        await sched.close()

    asyncio.run(main())
