"""ModelWorker: limits, validation before queuing, checkpoints (atomic save, load-creates, sampler cache),
unload, status — with the fake backend, then end to end on the real mock backend (numpy, fast)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from twinkle.server.backends import backend_kwargs, build_backend, load_backend_class
from twinkle.server.ops import ForwardBackwardOp, LoadOp, OptimStepOp, SampleOp, SaveOp, SetOptimizerOp
from twinkle.server.worker import ModelWorker
from twinkle.types import (
    AdamParams,
    ForwardBackwardOutput,
    InvalidInputError,
    LimitExceededError,
    LoraConfig,
    NotFoundError,
    OptimizerConfig,
    OptimStepResponse,
    SampleResponse,
    SamplingParams,
    UnsupportedError,
    datum_from_tokens,
)

try:
    from ._fake_backend import FakeBackend
except ImportError:  # tests/ is not a package
    from _fake_backend import FakeBackend


def fb(*tokens: int) -> ForwardBackwardOp:
    return ForwardBackwardOp(data=[datum_from_tokens(list(tokens))])


def fake_worker(**cfg) -> tuple[ModelWorker, FakeBackend]:
    backend = FakeBackend(vocab_size=300, max_length=64)
    return ModelWorker({"backend": "fake", "model_id": "fake", **cfg}, backend=backend), backend


def test_adapter_limits_and_idempotent_create():
    async def main():
        w, backend = fake_worker(max_adapters=2, max_lora_rank=8)
        with pytest.raises(LimitExceededError) as e:
            await w.create_adapter("big", LoraConfig(rank=16))
        assert e.value.field == "lora.rank"
        await w.create_adapter("a", LoraConfig(rank=8))
        await w.create_adapter("a", LoraConfig(rank=8))  # same config again: no-op
        with pytest.raises(InvalidInputError):
            await w.create_adapter("a", LoraConfig(rank=4))
        await w.create_adapter("b", LoraConfig(rank=2))
        with pytest.raises(LimitExceededError) as e:
            await w.create_adapter("c", LoraConfig(rank=2))
        assert e.value.field == "max_adapters"
        assert [c for c in backend.calls if c[0] == "add_adapter"] == [("add_adapter", "a"), ("add_adapter", "b")]
        await w.remove_adapter("a")  # frees the slot
        assert not await w.has_adapter("a") and "a" not in backend.adapters
        await w.create_adapter("c", LoraConfig(rank=2))
        assert sorted(await w.list_adapters()) == ["b", "c"]
        await w.close()

    asyncio.run(main())


def test_invalid_ops_are_refused_before_queuing_and_do_not_stall_the_sequence():
    async def main():
        w, backend = fake_worker(max_tokens_per_request=10, seq_grace_s=30)
        await w.create_adapter("a", LoraConfig(rank=4))
        with pytest.raises(NotFoundError):
            await w.execute("nope", fb(1, 2))
        with pytest.raises(InvalidInputError) as e:
            await w.execute("a", ForwardBackwardOp(data=[]), seq_id=1)
        assert e.value.field == "data"
        with pytest.raises(InvalidInputError) as e:
            await w.execute("a", fb(999, 1), seq_id=2)  # token outside the vocabulary
        assert e.value.field == "data[0].model_input"
        with pytest.raises(InvalidInputError) as e:
            await w.execute("a", fb(1, 999), seq_id=2)  # a repeat of a refused seq_id is checked again
        assert e.value.field == "data[0].loss_fn_inputs.target_tokens"
        with pytest.raises(LimitExceededError) as e:
            await w.execute("a", ForwardBackwardOp(data=[datum_from_tokens(list(range(1, 8)))] * 2), seq_id=3)
        assert e.value.field == "data"
        with pytest.raises(InvalidInputError) as e:
            await w.execute("a", fb(1, 2), seq_id=-1)
        assert e.value.field == "seq_id"
        with pytest.raises(InvalidInputError) as e:
            await w.execute("a", SaveOp(name="x"), seq_id=4, path="relative/dir")
        assert e.value.field == "path"
        # seq 1..4 were refused: seq 5 runs at once (the grace period is 30 s)
        out = await asyncio.wait_for(w.execute("a", fb(3, 4), seq_id=5), 5)
        assert isinstance(out, ForwardBackwardOutput)
        assert sum(1 for c in backend.calls if c[0] == "run_batch") == 1
        # seq 6 was answered by the gateway itself: it says so, and seq 7 does not wait for it
        await w.skip("a", 6)
        await asyncio.wait_for(w.execute("a", fb(5, 6), seq_id=7), 5)
        # without that notice seq 9 waits for seq 8
        pending = asyncio.ensure_future(w.execute("a", fb(5, 6), seq_id=9))
        await asyncio.sleep(0.05)
        assert not pending.done()
        await w.execute("a", fb(1, 1), seq_id=8)
        await asyncio.wait_for(pending, 5)
        await w.close()

    asyncio.run(main())


def test_sample_validation():
    async def main():
        w, _ = fake_worker()
        with pytest.raises(InvalidInputError) as e:
            await w.sample(SampleOp(prompt=[]))
        assert e.value.field == "prompt"
        with pytest.raises(LimitExceededError) as e:
            await w.sample(SampleOp(prompt=[1] * 10, params=SamplingParams(max_tokens=60)))
        assert e.value.field == "sampling_params.max_tokens"
        ctx = w._info.max_length
        with pytest.raises(LimitExceededError) as e:  # the prompt alone leaves no room: the prompt is named
            await w.sample(SampleOp(prompt=[1] * ctx, params=SamplingParams(max_tokens=1)))
        assert e.value.field == "prompt"
        with pytest.raises(NotFoundError):
            await w.sample(SampleOp(prompt=[1]), adapter_id="ghost")
        with pytest.raises(NotFoundError):
            await w.sample(SampleOp(prompt=[1]), checkpoint_path="/nonexistent/ckpt")
        with pytest.raises(InvalidInputError):
            await w.sample(SampleOp(prompt=[1]), adapter_id="x", checkpoint_path="/y")
        await w.close()

    asyncio.run(main())


def test_save_is_atomic_and_load_creates_the_adapter(tmp_path: Path):
    async def main():
        w, backend = fake_worker()
        await w.create_adapter("a", LoraConfig(rank=4))
        await w.execute("a", fb(2, 5), seq_id=1)
        await w.execute("a", OptimStepOp(AdamParams(learning_rate=0.1)), seq_id=2)
        ck = tmp_path / "runs" / "a" / "weights" / "s1"
        res = await w.execute("a", SaveOp(name="s1"), seq_id=3, path=str(ck))
        assert res["path"] == str(ck) and res["step"] == 1 and res["size_bytes"] > 0
        assert sorted(p.name for p in ck.parent.iterdir()) == ["s1"]  # no temp dirs left behind
        saved_w = json.loads((ck / "adapter_model.safetensors").read_text())["w"]
        assert saved_w == pytest.approx(1.0 - 0.1 * 2)
        # a second save under the same name without overwrite is refused; the first one is intact
        await w.execute("a", fb(7, 1), seq_id=4)
        await w.execute("a", OptimStepOp(AdamParams(learning_rate=0.1)), seq_id=5)
        with pytest.raises(InvalidInputError):
            await w.execute("a", SaveOp(name="s1"), seq_id=6, path=str(ck))
        assert json.loads((ck / "adapter_model.safetensors").read_text())["w"] == pytest.approx(saved_w)
        await w.execute("a", SaveOp(name="s1", overwrite=True), seq_id=7, path=str(ck))
        assert json.loads((ck / "adapter_model.safetensors").read_text())["w"] == pytest.approx(saved_w - 0.7)
        # load into an adapter this worker does not hold: created from the checkpoint
        res = await w.execute("restored", LoadOp(checkpoint="s1"), path=str(ck))
        assert await w.has_adapter("restored") and res["lora"]["rank"] == 4
        assert backend.adapters["restored"]["w"] == pytest.approx(saved_w - 0.7)
        # a failed load of a new adapter leaves no half-registered adapter behind
        with pytest.raises(NotFoundError):
            await w.execute("ghost", LoadOp(checkpoint="x"), path=str(tmp_path / "missing"))
        assert not await w.has_adapter("ghost")
        await w.close()

    asyncio.run(main())


def test_load_refuses_a_checkpoint_above_the_rank_limit(tmp_path: Path):
    async def main():
        w, _ = fake_worker(max_lora_rank=8)
        ck = tmp_path / "big"
        ck.mkdir()
        (ck / "adapter_config.json").write_text(json.dumps({"r": 64}))
        with pytest.raises(LimitExceededError) as e:
            await w.execute("x", LoadOp(checkpoint="big"), path=str(ck))
        assert e.value.field == "lora.rank"
        await w.close()

    asyncio.run(main())


def test_sampling_from_checkpoints_uses_a_bounded_cache(tmp_path: Path):
    async def main():
        w, backend = fake_worker(sampler_cache_size=1)
        await w.create_adapter("a", LoraConfig(rank=4))
        c1, c2 = tmp_path / "c1", tmp_path / "c2"
        await w.execute("a", SaveOp(name="c1", kind="sampler"), path=str(c1))
        await w.execute("a", fb(3, 3), seq_id=1)
        await w.execute("a", OptimStepOp(AdamParams(learning_rate=0.1)), seq_id=2)
        await w.execute("a", SaveOp(name="c2", kind="sampler"), path=str(c2))
        op = SampleOp(prompt=[1, 2], params=SamplingParams(max_tokens=2))
        r1 = await w.sample(op, checkpoint_path=str(c1))
        r1b = await w.sample(op, checkpoint_path=str(c1))
        loads = [c for c in backend.calls if c[0] == "load"]
        assert len(loads) == 1  # second sample reused the cached adapter
        assert r1.sequences[0].tokens == r1b.sequences[0].tokens == [10, 0]  # w = 1.0
        r2 = await w.sample(op, checkpoint_path=str(c2))
        assert r2.sequences[0].tokens[0] == int((1.0 - 0.3) * 10)  # w = 0.7
        # cache size 1: c1 was evicted, only one cached sampler adapter lives in the backend
        cached = [a for a in backend.adapters if a.startswith("__sampler__")]
        assert len(cached) == 1
        assert [c[0] for c in backend.calls].count("remove_adapter") == 1
        live = await w.sample(op, adapter_id="a")
        base = await w.sample(op)
        assert live.sequences[0].tokens[0] == 7 and base.sequences[0].tokens[0] == 0
        st = await w.status()
        assert st["adapters"] == 1  # cached sampler adapters do not count as runs
        await w.close()

    asyncio.run(main())


def test_remove_adapter_fails_its_queued_requests():
    async def main():
        w, backend = fake_worker()
        await w.create_adapter("a", LoraConfig(rank=4))
        await w.create_adapter("b", LoraConfig(rank=4))
        backend.pause()
        running = asyncio.ensure_future(w.execute("b", SetOptimizerOp(OptimizerConfig(lr=0.2))))
        await asyncio.to_thread(backend.entered.wait, 5)
        queued = asyncio.ensure_future(w.execute("a", fb(1, 2)))
        await asyncio.sleep(0)
        removal = asyncio.ensure_future(w.remove_adapter("a"))
        await asyncio.sleep(0)
        backend.resume()
        await removal
        assert (await running)["type"] == "set_optimizer"
        with pytest.raises(NotFoundError):
            await queued
        with pytest.raises(NotFoundError):
            await w.execute("a", fb(1, 2))
        await w.close()

    asyncio.run(main())


def test_status_reports_batches_and_counters():
    async def main():
        w, backend = fake_worker()
        for a in ("a", "b"):
            await w.create_adapter(a, LoraConfig(rank=4))
        backend.pause()
        first = asyncio.ensure_future(w.execute("a", fb(1, 2), seq_id=1))
        await asyncio.to_thread(backend.entered.wait, 5)
        both = [asyncio.ensure_future(w.execute(a, fb(3, 4), seq_id=s)) for a, s in (("a", 2), ("b", 1))]
        await asyncio.sleep(0)
        assert (await w.status())["queue_depth"] == 3
        backend.resume()
        await asyncio.gather(first, *both)
        again = await w.execute("b", fb(3, 4), seq_id=1)  # repeat: answered from memory
        assert again is both[1].result()
        st = await w.status()
        assert st["adapters"] == 2 and st["queue_depth"] == 0 and st["replica"] == 0
        assert st["batches_run"] == 2 and st["mixed_batches"] == 1
        assert st["last_batch"]["mixed"] is True and sorted(st["last_batch"]["adapters"]) == ["a", "b"]
        assert st["dedup_hits"] == 1
        assert [b["mixed"] for b in st["recent_batches"]] == [False, True]
        json.dumps(st)  # plain JSON for the status route
        await w.close()

    asyncio.run(main())


def test_backend_factory():
    assert load_backend_class("mock").__name__ == "MockBackend"
    with pytest.raises(InvalidInputError) as e:
        load_backend_class("tensorflow")
    assert e.value.field == "backend"
    with pytest.raises(UnsupportedError):
        load_backend_class("no_such_module_xyz:Backend")
    with pytest.raises(InvalidInputError):
        load_backend_class("twinkle.types:LoraConfig")  # not a Backend
    cls = load_backend_class("mock")
    kw = backend_kwargs(cls, {"backend": "mock", "model_id": "mock://tiny", "seed": 3, "max_adapters": 4,
                              "device": "auto", "backend_options": {"max_length": 128}})
    assert kw == {"model_id": "mock://tiny", "seed": 3, "max_length": 128}
    b = build_backend({"backend": "mock", "model_id": "mock://tiny"})
    assert b.model_info().backend == "mock"


# ---- end to end on the mock backend ------------------------------------------------------------------------


def _datum(tokens: list[int]):
    return datum_from_tokens(tokens)


def test_two_adapters_train_in_mixed_batches_on_the_mock_backend(tmp_path: Path):
    async def main():
        w = ModelWorker({"backend": "mock", "model_id": "mock://tiny", "max_adapters": 4})
        info = await w.model_info()
        assert info.backend == "mock"
        for a in ("alice", "bob"):
            await w.create_adapter(a, LoraConfig(rank=4, seed=1))
        seqs = {"alice": [5, 6, 7, 8, 9, 10] * 3, "bob": [40, 41, 42, 43] * 4}
        losses: dict[str, list[float]] = {"alice": [], "bob": []}

        async def train(a: str) -> None:
            seq = 1
            for _ in range(6):
                fut = w.execute(a, ForwardBackwardOp(data=[_datum(seqs[a])]), seq_id=seq)
                opt = w.execute(a, OptimStepOp(AdamParams(learning_rate=1e-2)), seq_id=seq + 1)
                out, step = await asyncio.gather(fut, opt)
                assert isinstance(step, OptimStepResponse)
                losses[a].append(out.metrics["loss:sum"])
                seq += 2

        await asyncio.gather(train("alice"), train("bob"))
        for a in ("alice", "bob"):
            assert losses[a][-1] < losses[a][0], (a, losses[a])
        st = await w.status()
        assert st["mixed_batches"] >= 1 and st["max_adapters_in_batch"] == 2
        # checkpoint round trip through the worker: same next loss
        ck = tmp_path / "alice-1"
        await w.execute("alice", SaveOp(name="alice-1"), seq_id=13, path=str(ck))
        probe = ForwardBackwardOp(data=[_datum(seqs["alice"])], forward_only=True)
        before = (await w.execute("alice", probe, seq_id=14)).metrics["loss:sum"]
        await w.execute("copy", LoadOp(checkpoint="alice-1"), path=str(ck))
        after = (await w.execute("copy", probe)).metrics["loss:sum"]
        assert after == pytest.approx(before, rel=1e-5)
        sample = await w.sample(SampleOp(prompt=[5, 6, 7], params=SamplingParams(max_tokens=4, temperature=0.0)),
                                checkpoint_path=str(ck))
        assert isinstance(sample, SampleResponse) and len(sample.sequences[0].tokens) <= 4
        await w.close()

    asyncio.run(main())



def test_retrying_a_forward_backward_does_not_change_the_next_optimizer_step():
    async def run(retry: bool) -> tuple[dict, float]:
        w = ModelWorker({"backend": "mock", "model_id": "mock://tiny"})
        await w.create_adapter("r", LoraConfig(rank=4, seed=7))
        op = ForwardBackwardOp(data=[_datum([3, 9, 27, 81, 243, 1, 2, 3])])
        first = await w.execute("r", op, seq_id=1)
        if retry:
            again = await w.execute("r", op, seq_id=1)
            assert again is first
        step = await w.execute("r", OptimStepOp(AdamParams(learning_rate=1e-2)), seq_id=2)
        probe = ForwardBackwardOp(data=op.data, forward_only=True)
        loss = (await w.execute("r", probe, seq_id=3)).metrics["loss:sum"]
        await w.close()
        return step.metrics, loss

    async def main():
        plain, retried = await run(False), await run(True)
        assert retried[0] == pytest.approx(plain[0], rel=1e-6)
        assert retried[1] == pytest.approx(plain[1], rel=1e-6)

    asyncio.run(main())


def test_transformers_backend_on_the_builtin_model(tmp_path: Path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")

    async def main():
        w = ModelWorker({"backend": "transformers", "model_id": "builtin://tiny", "max_adapters": 2,
                         "max_lora_rank": 8, "device": "auto"})
        for a in ("a", "b"):
            await w.create_adapter(a, LoraConfig(rank=4, seed=0))
        data = [_datum([5, 6, 7, 8, 9, 10, 11])]
        losses = []
        for i in range(2):
            outs = await asyncio.gather(
                *[w.execute(a, ForwardBackwardOp(data=data), seq_id=2 * i + 1) for a in "ab"],
                *[w.execute(a, OptimStepOp(AdamParams(learning_rate=1e-2)), seq_id=2 * i + 2) for a in "ab"],
            )
            losses.append(outs[0].metrics["loss:sum"])
            assert outs[0].metrics["loss:sum"] == pytest.approx(outs[1].metrics["loss:sum"], rel=1e-4)
        assert losses[-1] < losses[0]
        st = await w.status()
        assert st["mixed_batches"] == 2 and st["last_batch"]["adapters"] == ["a", "b"]
        ck = tmp_path / "a"
        await w.execute("a", SaveOp(name="a"), seq_id=5, path=str(ck))
        op = SampleOp(prompt=[5, 6, 7], params=SamplingParams(max_tokens=3, temperature=0.0))
        live = await w.sample(op, adapter_id="a")
        saved = await w.sample(op, checkpoint_path=str(ck))
        assert live.sequences[0].tokens == saved.sequences[0].tokens
        await w.close()

    asyncio.run(main())
