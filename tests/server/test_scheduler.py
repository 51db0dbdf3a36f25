"""Scheduler rules: seq_id order, grace, exactly-once, per-adapter barriers, mixed batches, fairness,
back-pressure, error isolation, one backend thread. Driven with a small fake backend (no torch)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from twinkle.server.ops import ForwardBackwardOp, OptimStepOp, SampleOp, SetOptimizerOp
from twinkle.server.scheduler import Scheduler, SchedulerConfig
from twinkle.types import (
    AdamParams,
    CapacityError,
    ForwardBackwardOutput,
    InvalidInputError,
    LoraConfig,
    OptimizerConfig,
    OptimStepResponse,
    datum_from_tokens,
)

try:
    from ._fake_backend import POISON, FakeBackend
except ImportError:  # tests/ is not a package
    from _fake_backend import POISON, FakeBackend


def fb(*tokens: int, forward_only: bool = False) -> ForwardBackwardOp:
    return ForwardBackwardOp(data=[datum_from_tokens(list(tokens))], forward_only=forward_only)


def make(*adapters: str, **cfg) -> tuple[Scheduler, FakeBackend]:
    backend = FakeBackend()
    for a in adapters:
        backend.add_adapter(a, LoraConfig(rank=4))
    backend.calls.clear()
    backend.threads.clear()
    return Scheduler(backend, SchedulerConfig(**cfg)), backend


async def hold(sched: Scheduler, backend: FakeBackend) -> asyncio.Future:
    """Occupy the backend thread with a blocking call on adapter '_blocker'; returns its future."""
    if "_blocker" not in backend.adapters:
        backend.add_adapter("_blocker", LoraConfig(rank=1))
        backend.calls.clear()
        backend.threads.clear()
    backend.pause()
    fut = sched.submit("_blocker", SetOptimizerOp(OptimizerConfig(lr=0.5)))
    await asyncio.to_thread(backend.entered.wait, 5)
    return fut


def compute_calls(backend: FakeBackend) -> list[list[tuple[str, list[list[int]]]]]:
    return [c[1] for c in backend.calls if c[0] == "run_batch"]


def ops_log(backend: FakeBackend) -> list[tuple]:
    """(kind, adapter, first-token) per executed request, in execution order, skipping the blocker."""
    out = []
    for c in backend.calls:
        if c[0] == "run_batch":
            out.extend(("fb", a, rows[0][0]) for a, rows in c[1])
        elif c[1] != "_blocker":
            out.append((c[0], c[1]))
    return out


def test_requests_run_in_seq_order_even_when_they_arrive_reversed():
    async def main():
        sched, backend = make("a")
        blocker = await hold(sched, backend)
        futs = [sched.submit("a", fb(s, 1), seq_id=s) for s in (3, 2)]
        assert not any(f.done() for f in futs)
        opt = sched.submit("a", OptimStepOp(), seq_id=4)
        first = sched.submit("a", fb(1, 1), seq_id=1)
        backend.resume()
        await asyncio.gather(blocker, first, opt, *futs)
        assert ops_log(backend) == [("fb", "a", 1), ("fb", "a", 2), ("fb", "a", 3), ("optim_step", "a")]
        # the optimizer step saw the gradients of all three requests
        assert opt.result().metrics["grad_norm:mean"] == pytest.approx(1 + 2 + 3)

    asyncio.run(main())


def test_a_missing_seq_id_is_skipped_after_the_grace_period():
    async def main():
        sched, backend = make("a", seq_grace_s=0.05)
        await sched.submit("a", fb(5, 5), seq_id=1)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        late = sched.submit("a", fb(7, 7), seq_id=3)  # seq 2 never comes
        await asyncio.sleep(0.01)
        assert not late.done()  # waits for seq 2 ...
        out = await asyncio.wait_for(late, 5)  # ... but not forever
        assert loop.time() - t0 >= 0.05
        assert isinstance(out, ForwardBackwardOutput)
        assert sched.stats["seq_skips"] == 1
        # the sequence continues after the jump without waiting
        nxt = sched.submit("a", fb(8, 8), seq_id=4)
        await asyncio.wait_for(nxt, 1)

    asyncio.run(main())


def test_unsequenced_requests_run_in_arrival_order():
    async def main():
        sched, backend = make("a")
        blocker = await hold(sched, backend)
        futs = [sched.submit("a", fb(t, 1)) for t in (9, 4, 6)]
        backend.resume()
        await asyncio.gather(blocker, *futs)
        assert [x[2] for x in ops_log(backend)] == [9, 4, 6]

    asyncio.run(main())


def test_repeated_seq_id_is_answered_from_the_first_execution():
    async def main():
        sched, backend = make("a")
        blocker = await hold(sched, backend)
        f1 = sched.submit("a", fb(2, 3, 9), seq_id=1)
        f1_again = sched.submit("a", fb(2, 3, 9), seq_id=1)  # retry while in flight
        assert f1_again is f1
        backend.resume()
        await blocker
        r1 = await f1
        r1_late = await sched.submit("a", fb(2, 3, 9), seq_id=1)  # retry after completion
        assert r1_late is r1
        step = await sched.submit("a", OptimStepOp(AdamParams(learning_rate=0.1)), seq_id=2)
        retried_step = await sched.submit("a", OptimStepOp(AdamParams(learning_rate=0.1)), seq_id=2)
        assert retried_step is step
        # one forward_backward's gradient (2 + 3), applied once
        assert step.metrics["grad_norm:mean"] == pytest.approx(5.0)
        assert backend.adapters["a"]["w"] == pytest.approx(1.0 - 0.1 * 5.0)
        assert backend.adapters["a"]["steps"] == 1
        assert sum(1 for c in backend.calls if c[0] == "run_batch") == 1
        assert sched.stats["dedup_hits"] == 3

    asyncio.run(main())


def test_result_memory_is_bounded():
    async def main():
        sched, backend = make("a", result_memory=3)
        for s in range(1, 8):
            await sched.submit("a", fb(s, 1), seq_id=s)
        assert sched.known("a", 7) is not None
        assert sched.known("a", 2) is None
        assert len(sched._queues["a"].memory) <= 3

    asyncio.run(main())


def test_barrier_holds_back_its_adapter_only_and_work_of_different_adapters_is_batched():
    async def main():
        sched, backend = make("a", "b", "c")
        blocker = await hold(sched, backend)
        a1 = sched.submit("a", fb(11, 1), seq_id=1)
        a2 = sched.submit("a", OptimStepOp(), seq_id=2)
        a3 = sched.submit("a", fb(12, 1), seq_id=3)
        b1 = sched.submit("b", fb(21, 1), seq_id=1)
        b2 = sched.submit("b", fb(22, 1), seq_id=2)
        c1 = sched.submit("c", fb(31, 1))
        backend.resume()
        await asyncio.gather(blocker, a1, a2, a3, b1, b2, c1)
        batches = compute_calls(backend)
        first = [(a, rows[0][0]) for a, rows in batches[0]]
        # a's fwd/bwd before its optimizer step went with b's and c's work in ONE mixed call ...
        assert sorted(first) == [("a", 11), ("b", 21), ("b", 22), ("c", 31)]
        # ... a's request after the barrier ran after the optimizer step, in a later call
        log = ops_log(backend)
        assert log.index(("optim_step", "a")) < log.index(("fb", "a", 12))
        assert log.index(("optim_step", "a")) > log.index(("fb", "a", 11))
        assert a2.result().metrics["grad_norm:mean"] == pytest.approx(11)  # only seq 1's gradient
        assert sched.stats["mixed_batches"] >= 1
        assert sched.stats["max_adapters_in_batch"] == 3

    asyncio.run(main())


def test_status_reports_the_composition_of_the_last_batch():
    async def main():
        sched, backend = make("a", "b")
        blocker = await hold(sched, backend)
        fa = sched.submit("a", fb(1, 2, 3))
        fbb = sched.submit("b", fb(4, 5))
        backend.resume()
        await asyncio.gather(blocker, fa, fbb)
        last = sched.last_batch
        assert last is not None and last["mixed"] is True
        assert sorted(last["adapters"]) == ["a", "b"]
        assert last["rows"] == 2
        assert sched.stats["batches_run"] == 1
        await sched.submit("a", fb(1, 2))
        assert sched.last_batch["mixed"] is False and sched.last_batch["adapters"] == ["a"]
        assert sched.stats["batches_run"] == 2 and sched.stats["mixed_batches"] == 1
        assert len(sched.recent_batches) == 2

    asyncio.run(main())


def test_token_budget_splits_batches_and_adapters_are_served_round_robin():
    async def main():
        sched, backend = make("a", "b", batch_token_budget=4)
        blocker = await hold(sched, backend)
        fa = [sched.submit("a", fb(20 + i, 1, 1), seq_id=i + 1, tokens=2) for i in range(4)]
        fbb = sched.submit("b", fb(50, 1, 1), seq_id=1, tokens=2)
        backend.resume()
        await asyncio.gather(blocker, fbb, *fa)
        batches = [[(a, rows[0][0]) for a, rows in c] for c in compute_calls(backend)]
        assert all(len(b) <= 2 for b in batches)
        # b is not starved behind a's four requests: it is in the first batch
        assert ("b", 50) in batches[0]
        assert [t for b in batches for a, t in b if a == "a"] == [20, 21, 22, 23]

    asyncio.run(main())


def test_an_oversized_request_still_runs_alone():
    async def main():
        sched, backend = make("a", batch_token_budget=2)
        out = await sched.submit("a", fb(1, 2, 3, 4, 5, 6), tokens=5)
        assert isinstance(out, ForwardBackwardOutput)

    asyncio.run(main())


def test_full_queue_raises_capacity_error_with_retry_after():
    async def main():
        sched, backend = make("a", "b", max_pending_per_adapter=2, max_pending_total=3)
        blocker = await hold(sched, backend)  # 1 pending (blocker)
        f1 = sched.submit("a", fb(1, 1))
        f2 = sched.submit("a", fb(2, 1))
        with pytest.raises(CapacityError) as e:
            sched.submit("a", fb(3, 1))
        assert e.value.status == 429 and e.value.retry_after > 0
        with pytest.raises(CapacityError):  # total limit: blocker + 2
            sched.submit("b", fb(4, 1))
        assert sched.stats["rejected_capacity"] == 2
        backend.resume()
        await asyncio.gather(blocker, f1, f2)
        await sched.submit("a", fb(3, 1))  # accepted again once drained
        assert sched.queue_depth() == 0

    asyncio.run(main())


def test_a_failing_item_fails_only_its_own_future():
    async def main():
        sched, backend = make("a", "b")
        blocker = await hold(sched, backend)
        good = sched.submit("a", fb(3, 4))
        bad = sched.submit("b", fb(POISON, 4))
        backend.resume()
        await blocker
        assert isinstance(await good, ForwardBackwardOutput)
        with pytest.raises(InvalidInputError) as e:
            await bad
        assert e.value.field == "data"
        assert sched.stats["errors"] == 1
        assert backend.adapters["a"]["grad"] == pytest.approx(3.0)  # applied exactly once
        # keeps serving, including the adapter whose request failed
        assert isinstance(await sched.submit("b", fb(5, 6)), ForwardBackwardOutput)

    asyncio.run(main())


def test_unexpected_backend_exceptions_become_internal_errors_without_details():
    class Boom(FakeBackend):
        def optim_step(self, adapter, params=None):
            raise RuntimeError("CUDA exploded at 0xdeadbeef")

    async def main():
        backend = Boom()
        backend.add_adapter("a", LoraConfig(rank=2))
        sched = Scheduler(backend)
        with pytest.raises(Exception) as e:
            await sched.submit("a", OptimStepOp())
        assert e.value.status == 500 and "deadbeef" not in str(e.value)
        assert isinstance(await sched.submit("a", fb(1, 2)), ForwardBackwardOutput)

    asyncio.run(main())


def test_backend_runs_on_one_thread_and_never_blocks_the_event_loop():
    async def main():
        sched, backend = make("a", "b")
        blocker = await hold(sched, backend)
        # the loop still runs while the backend thread is busy
        ticks = 0
        for _ in range(5):
            await asyncio.sleep(0)
            ticks += 1
        assert ticks == 5 and not blocker.done()
        futs = [sched.submit(a, fb(1, 2)) for a in ("a", "b")]
        futs.append(sched.submit("a", OptimStepOp()))
        futs.append(sched.submit_sample(SampleOp(prompt=[1, 2], num_samples=2)))
        backend.resume()
        await asyncio.gather(blocker, *futs)
        assert len(backend.threads) == 1
        assert backend.threads != {threading.current_thread().name}

    asyncio.run(main())


def test_samples_are_batched_into_one_backend_call():
    async def main():
        sched, backend = make("a")
        blocker = await hold(sched, backend)
        s1 = sched.submit_sample(SampleOp(prompt=[1, 2], num_samples=2), adapter="a")
        s2 = sched.submit_sample(SampleOp(prompt=[3]))
        backend.resume()
        await blocker
        r1, r2 = await asyncio.gather(s1, s2)
        assert len(r1.sequences) == 2 and len(r2.sequences) == 1
        sample_calls = [c for c in backend.calls if c[0] == "sample"]
        assert sample_calls == [("sample", [("a", [1, 2]), (None, [3])])]
        assert sched.stats["samples_run"] == 2 and sched.stats["sample_batches"] == 1

    asyncio.run(main())


def test_drop_adapter_fails_its_queued_requests_and_spares_others():
    async def main():
        sched, backend = make("a", "b")
        blocker = await hold(sched, backend)
        fa = sched.submit("a", fb(1, 1), seq_id=1)
        fa_held = sched.submit("a", fb(1, 1), seq_id=5)
        fbb = sched.submit("b", fb(2, 2))
        assert sched.drop_adapter("a") == 2
        backend.resume()
        await blocker
        assert isinstance(await fbb, ForwardBackwardOutput)
        for f in (fa, fa_held):
            with pytest.raises(Exception) as e:
                await f
            assert e.value.status == 404
        assert sched.queue_depth() == 0

    asyncio.run(main())


def test_optimizer_step_results_are_typed():
    async def main():
        sched, backend = make("a")
        await sched.submit("a", fb(1, 2), seq_id=1)
        out = await sched.submit("a", OptimStepOp(AdamParams(learning_rate=0.5)), seq_id=2)
        assert isinstance(out, OptimStepResponse) and out.metrics["lr:mean"] == 0.5

    asyncio.run(main())


def test_config_from_dict_reads_sections_and_aliases_and_rejects_bad_values():
    c = SchedulerConfig.from_dict({"batch_token_budget": 100, "max_queue": 7, "sampler": {"max_batch_size": 3},
                                   "scheduler": {"seq_grace_s": 0.5}, "model_id": "x"})
    assert (c.batch_token_budget, c.max_pending_total, c.max_sample_batch, c.seq_grace_s) == (100, 7, 3, 0.5)
    with pytest.raises(InvalidInputError) as e:
        SchedulerConfig.from_dict({"batch_token_budget": 0})
    assert e.value.field == "batch_token_budget"
    with pytest.raises(InvalidInputError):
        SchedulerConfig.from_dict({"seq_grace_s": "soon"})


def test_counters_stay_right_when_an_adapter_is_dropped_and_recreated_mid_flight():
    async def main():
        sched, backend = make("a")
        backend.pause()
        running = sched.submit("a", fb(1, 2), seq_id=1)
        await asyncio.to_thread(backend.entered.wait, 5)
        assert sched.drop_adapter("a") == 0  # nothing queued: the running request finishes
        fresh = sched.submit("a", fb(3, 4), seq_id=1)  # a new life of the same adapter id
        assert fresh is not running
        backend.resume()
        await asyncio.gather(running, fresh)
        assert sched.queue_depth() == 0 and sched.adapter_queue_depth("a") == 0

    asyncio.run(main())


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="per-thread priorities: Linux")
@pytest.mark.parametrize("concurrent", [True, False])
def test_the_training_thread_yields_the_cpu_to_sampling(concurrent):
    """With sampling on its own thread, the backend (training) thread lowers its OS priority by
    ``training_nice`` steps, that thread only; without concurrent sampling nothing changes."""
    import os

    backend = FakeBackend()
    backend.concurrent_sampling = lambda: concurrent  # type: ignore[attr-defined]
    sched = Scheduler(backend, SchedulerConfig(training_nice=3))
    out: dict[str, int | bool] = {}

    def probe() -> None:
        tid = threading.get_native_id()
        before = os.getpriority(os.PRIO_PROCESS, tid)
        out["concurrent"] = sched._probe_concurrent()
        out["delta"] = os.getpriority(os.PRIO_PROCESS, tid) - before
        out["expected"] = min(19, before + 3) - before

    main_before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    t = threading.Thread(target=probe)
    t.start()
    t.join()
    assert out["concurrent"] is concurrent
    assert out["delta"] == (out["expected"] if concurrent else 0)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == main_before  # other threads unchanged
