"""Sampling on its own thread, beside training (the scheduler's ``concurrent_sampling``, builtin tiny model):
decode steps really run while a training pass runs; seeded samples and the training batch's gradients are
exactly those of each alone; a run's sample submitted behind its optim_step sees the new weights."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
import torch

from twinkle.model.transformers import TransformersBackend, _decode
from twinkle.model.transformers._random import tiny_model_path
from twinkle.server.ops import ForwardBackwardOp, OptimStepOp, SampleOp
from twinkle.server.scheduler import Scheduler, SchedulerConfig
from twinkle.types import AdamParams, LoraConfig, SamplingParams, datum_from_tokens

PROMPT = [5, 17, 42, 99, 7, 3, 11, 12, 13]


@pytest.fixture(scope="module")
def backend():
    torch.set_num_threads(1)
    b = TransformersBackend(str(tiny_model_path()), device="cpu")
    b.add_adapter("s", LoraConfig(rank=4, seed=1))
    b.add_adapter("t", LoraConfig(rank=4, seed=7))
    with torch.no_grad():  # B starts at zero: give both adapters a visible effect on the logits
        for name in ("s", "t"):
            for pair in b._adapters[name].pairs.values():
                pair.lora_B.normal_(0, 0.05, generator=torch.Generator().manual_seed(3))
    yield b
    b.close()


def _data(n: int = 24) -> list:
    rng = np.random.default_rng(0)
    return [datum_from_tokens(rng.integers(5, 200, size=40).tolist()) for _ in range(n)]


def _sample_op(seed: int, max_tokens: int = 48) -> SampleOp:
    return SampleOp(prompt=list(PROMPT), num_samples=2, prompt_logprobs=True,
                    params=SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed, stop=[]))


def _seqs(out) -> list:
    return [(list(s.tokens), list(s.logprobs)) for s in out.sequences]


def test_concurrent_sampling_matches_alone_and_overlaps_training(backend):
    # alone: the samples, then the training batch's gradients
    async def alone():
        sched = Scheduler(backend, SchedulerConfig())
        outs = [await sched.submit_sample(_sample_op(seed), adapter="s") for seed in (1, 2, 3)]
        fb = await sched.submit("t", ForwardBackwardOp(data=_data(), loss_fn="cross_entropy"), tokens=24 * 39)
        await sched.close()
        return outs, fb

    outs1, fb1 = asyncio.run(alone())
    g1 = [g.clone() for g in backend.grad_snapshot("t")]
    for p in backend._adapters["t"].pairs.values():
        p.lora_A.grad = None
        p.lora_B.grad = None

    training = threading.Event()
    overlapped: list[bool] = []
    inner_run = backend.run_batch

    def run_batch(items):
        training.set()
        try:
            return inner_run(items)
        finally:
            training.clear()

    async def together():
        sched = Scheduler(backend, SchedulerConfig())
        fb = sched.submit("t", ForwardBackwardOp(data=_data(), loss_fn="cross_entropy"), tokens=24 * 39)
        while not training.is_set():
            await asyncio.sleep(0.001)
        futs = [sched.submit_sample(_sample_op(seed), adapter="s") for seed in (1, 2, 3)]
        while sched._engine is None:  # made on the sampler thread with the first request
            await asyncio.sleep(0.001)
        inner_step = sched._engine.step

        def step():
            overlapped.append(training.is_set())
            return inner_step()

        sched._engine.step = step
        outs = [await f for f in futs]
        out = await fb
        assert sched.stats["concurrent_sampling"] is True
        await sched.close()
        return outs, out

    backend.run_batch = run_batch
    try:
        outs2, fb2 = asyncio.run(together())
    finally:
        backend.run_batch = inner_run
    g2 = [g.clone() for g in backend.grad_snapshot("t")]
    for p in backend._adapters["t"].pairs.values():
        p.lora_A.grad = None
        p.lora_B.grad = None
    assert any(overlapped), "no decode step ran while the training pass ran"
    for a, b in zip(outs1, outs2, strict=True):  # same seed, same tokens and logprobs as alone
        assert [t for t, _ in _seqs(a)] == [t for t, _ in _seqs(b)]
        for (_, la), (_, lb) in zip(_seqs(a), _seqs(b), strict=True):
            np.testing.assert_allclose(la, lb, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.array(a.prompt_logprobs[1:]), np.array(b.prompt_logprobs[1:]), rtol=1e-5,
                                   atol=1e-6)
    assert fb2.metrics["loss:sum"] == pytest.approx(fb1.metrics["loss:sum"], rel=1e-6)
    for a, b in zip(g1, g2, strict=True):  # the sampling thread's routing never leaked into training
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-7)


def test_sample_behind_optim_step_sees_new_weights(backend, monkeypatch):
    monkeypatch.setattr(_decode, "MERGE_AFTER_TOKENS", 1)  # "u" is merged for sampling at once (a stale merge
    backend.add_adapter("u", LoraConfig(rank=4, seed=9))  # would give "behind" the old weights)
    builds = backend._merged.builds if backend._merged is not None else 0
    try:
        async def main():
            sched = Scheduler(backend, SchedulerConfig())
            before = await sched.submit_sample(_sample_op(5, 4), adapter="u")
            await sched.submit("u", ForwardBackwardOp(data=_data(8), loss_fn="cross_entropy"), tokens=8 * 39)
            step = sched.submit("u", OptimStepOp(adam_params=AdamParams(learning_rate=0.05)))
            behind = sched.submit_sample(_sample_op(5, 4), adapter="u")  # queued behind the step
            await step
            got = await behind
            after = await sched.submit_sample(_sample_op(5, 4), adapter="u")  # surely after the step
            await sched.close()
            return before, got, after

        before, got, after = asyncio.run(main())
        if backend._merged is not None:  # CPU with oneDNN: both samples of "u" used a merge of their weights
            assert backend._merged.builds >= builds + 2 and "u" in backend._merged.adapters()
    finally:
        backend.remove_adapter("u")
    np.testing.assert_allclose(np.array(got.prompt_logprobs[1:]), np.array(after.prompt_logprobs[1:]), rtol=1e-6)
    assert np.abs(np.array(got.prompt_logprobs[1:]) - np.array(before.prompt_logprobs[1:])).max() > 1e-3
