"""Training interleaved with sampling: while samples run, a training batch runs in time-bounded slices with
decode steps between them, a sample request that arrives mid-batch is answered before the batch ends, and the
gradients and loss are those of the unsplit batch (builtin tiny model)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from twinkle.model.transformers import TransformersBackend
from twinkle.model.transformers._random import tiny_model_path
from twinkle.server.ops import ForwardBackwardOp, SampleOp
from twinkle.server.scheduler import Scheduler, SchedulerConfig
from twinkle.types import ForwardBackwardOutput, LoraConfig, SamplingParams, datum_from_tokens

PROMPT = [5, 17, 42, 99, 7, 3, 11, 12, 13]


@pytest.fixture(scope="module")
def backend():
    torch.set_num_threads(1)
    b = TransformersBackend(str(tiny_model_path()), device="cpu")
    b.add_adapter("s", LoraConfig(rank=4, seed=1))
    yield b
    b.close()


def _data() -> list:
    rng = np.random.default_rng(0)
    return [datum_from_tokens(rng.integers(5, 200, size=n + 1).tolist()) for n in (30, 12, 41, 25, 9, 33)]


def _op(max_tokens: int) -> SampleOp:
    return SampleOp(prompt=list(PROMPT), num_samples=1,
                    params=SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=[]))


def _train(backend, *, interleave: bool) -> tuple[ForwardBackwardOutput, list, list, Scheduler, dict]:
    backend.add_adapter("t", LoraConfig(rank=4, seed=7))
    data = _data()
    tokens = sum(d.model_input.length for d in data)
    events: list = []
    sched = Scheduler(backend, SchedulerConfig(train_slice_s=1e-6 if interleave else 0.0, concurrent_sampling=False))
    inner_run = backend.run_batch
    state: dict = {}

    def run_batch(items):
        if any(it.adapter == "t" and not it.forward_only for it in items):
            events.append(("train", sum(len(it.data) for it in items)))
            if interleave and "short" not in state:  # a request arriving while the batch runs
                state["short"] = True
                sched._loop.call_soon_threadsafe(lambda: state.__setitem__("fut", sched.submit_sample(
                    _op(1), adapter="s")))
        return inner_run(items)

    try:
        backend.run_batch = run_batch

        async def main():
            warm = datum_from_tokens(list(range(5, 30)))
            await sched.submit("t", ForwardBackwardOp(data=[warm], loss_fn="cross_entropy", forward_only=True),
                               tokens=24)
            long = None
            if interleave:
                long = sched.submit_sample(_op(400), adapter="s")
                while sched._engine is None or sched._engine.stats["steps"] < 2:
                    await asyncio.sleep(0.005)
                eng = sched._engine
                inner_step = eng.step

                def step():
                    done = inner_step()
                    events.append(("step", [k.future for k, _ in done]))
                    return done

                eng.step = step
            out = await sched.submit("t", ForwardBackwardOp(data=data, loss_fn="cross_entropy"), tokens=tokens)
            if interleave:
                await state["fut"]
                await long
            await sched.close()
            return out

        out = asyncio.run(main())
        grads = [g.clone() for g in backend.grad_snapshot("t")]
        return out, grads, events, sched, state
    finally:
        backend.run_batch = inner_run
        backend.remove_adapter("t")


@pytest.mark.slow
def test_interleaved_training_equals_unsplit_and_lets_samples_in(backend):
    whole, g1, ev1, s1, _ = _train(backend, interleave=False)
    split, g2, ev2, s2, state = _train(backend, interleave=True)
    assert s1.stats["interleaved_batches"] == 0 and [e for e in ev1 if e[0] == "train"] == [("train", 6)]
    assert s2.stats["interleaved_batches"] == 1 and s2.stats["sample_slices_between"] >= 5
    trains = [i for i, e in enumerate(ev2) if e[0] == "train"]
    assert len(trains) == 6  # one datum per slice (the slice is shorter than any datum)
    # decode steps ran between every two training slices
    assert all(any(e[0] == "step" for e in ev2[a + 1:b]) for a, b in zip(trains, trains[1:], strict=False))
    # the request that arrived during the first slice finished before the batch's last slice
    short_done = [i for i, e in enumerate(ev2) if e[0] == "step" and any(f is state["fut"] for f in e[1])]
    assert short_done and short_done[0] < trains[-1]
    assert split.metrics["loss:sum"] == pytest.approx(whole.metrics["loss:sum"], rel=1e-6)
    for a, b in zip(whole.loss_fn_outputs, split.loss_fn_outputs, strict=True):
        np.testing.assert_allclose(a["logprobs"].to_numpy(), b["logprobs"].to_numpy(), rtol=1e-5, atol=1e-6)
    assert all(g is not None for g in g1)
    for a, b in zip(g1, g2, strict=True):  # the sum over the slices: equal up to float32 rounding
        a, b = a.numpy(), b.numpy()
        assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max(), (np.abs(a - b).max(), np.abs(a).max())
