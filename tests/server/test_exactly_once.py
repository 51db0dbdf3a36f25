"""Exactly-once bookkeeping: a retried seq_id is applied once by the worker AND counted once by the gateway
(step counter, metric history, the next checkpoint's step label); reusing a seq_id for another kind of call
is a clear 400. Real Service + in-process ModelWorker (mock backend)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from twinkle.server.app import worker_config
from twinkle.server.config import parse_config
from twinkle.server.ops import ForwardBackwardOp, OptimStepOp, SaveOp
from twinkle.server.service import Service, User
from twinkle.server.worker import ModelWorker
from twinkle.server.worker_api import WorkerAPI
from twinkle.types import AdamParams, CapacityError, InvalidInputError, LoraConfig, datum_from_tokens

ALICE = User("alice", "k-a")
DATA = [datum_from_tokens([5, 9, 17, 33, 2, 8])]
ADAM = AdamParams(learning_rate=0.05)


class FlakyWorker:
    """A ``WorkerAPI`` test double: the real worker, but the first ``fail_first`` executes of a given op kind
    answer 429 (a full queue) without reaching it; ``executed`` lists what reached the worker."""

    def __init__(self, inner: ModelWorker, fail_kind: str | None = None, fail_first: int = 0):
        self.inner = inner
        self.fail_kind = fail_kind
        self.fail_left = fail_first
        self.executed: list[tuple[str, int | None]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def execute(self, adapter_id: str, op: Any, *, seq_id: int | None = None, path: str | None = None) -> Any:
        if op.type == self.fail_kind and self.fail_left > 0:
            self.fail_left -= 1
            raise CapacityError("queue full (test)", retry_after=0.1)
        self.executed.append((op.type, seq_id))
        return await self.inner.execute(adapter_id, op, seq_id=seq_id, path=path)


def _service(tmp_path: Path, worker: Any = None) -> tuple[Service, Any]:
    cfg = parse_config({
        "persistence": {"sqlite_path": str(tmp_path / "db.sqlite"), "checkpoint_root": str(tmp_path / "ck")},
        "models": [{"name": "mock", "backend": "mock", "model_id": "mock://tiny", "max_lora_rank": 16}],
    })
    w = worker or FlakyWorker(ModelWorker(worker_config(cfg.models[0])))
    assert isinstance(w, WorkerAPI)
    return Service(cfg, {"mock": [w]}), w


async def _result(svc: Service, ref: Any) -> Any:
    st = await svc.wait(ALICE, ref.future_id, timeout=30)
    assert st.status == "complete", st.error
    return st.result


async def _run(svc: Service) -> str:
    s = await svc.create_session(ALICE)
    ref = await svc.create_run(ALICE, session_id=s.session_id, base_model="mock", lora=LoraConfig(rank=4, seed=1))
    return (await _result(svc, ref)).run_id


def test_retried_optim_step_counts_once(tmp_path):
    async def go():
        svc, w = _service(tmp_path)
        rid = await _run(svc)
        fb = await _result(svc, await svc.submit(ALICE, rid, ForwardBackwardOp(data=DATA), seq_id=0))
        refs = [await svc.submit(ALICE, rid, OptimStepOp(ADAM), seq_id=1) for _ in range(3)]  # 3 sends
        assert len({r.future_id for r in refs}) == 1  # the retries get the first call's future
        for r in refs:
            await _result(svc, r)
        run = await svc.get_run(ALICE, rid)
        assert run.step == 1
        hist = await svc.get_metrics(ALICE, rid)
        assert [p.kind for p in hist.points].count("optim_step") == 1
        assert w.executed.count(("optim_step", 1)) == 1
        ck = await _result(svc, await svc.submit(ALICE, rid, SaveOp(name="c"), seq_id=2))
        assert ck.step == 1
        # a retried forward_backward is answered from the first one: the same loss, recorded once
        again = await svc.submit(ALICE, rid, ForwardBackwardOp(data=DATA), seq_id=0)
        assert (await _result(svc, again)).metrics == fb.metrics
        assert [p.kind for p in (await svc.get_metrics(ALICE, rid)).points].count("forward_backward") == 1
        await svc.stop()

    asyncio.run(go())


def test_retry_after_its_future_left_memory_still_counts_once(tmp_path):
    async def go():
        svc, w = _service(tmp_path)
        rid = await _run(svc)
        await _result(svc, await svc.submit(ALICE, rid, ForwardBackwardOp(data=DATA), seq_id=0))
        first = await svc.submit(ALICE, rid, OptimStepOp(ADAM), seq_id=1)
        out = await _result(svc, first)
        svc.futures.by_id.pop(first.future_id)  # the result's TTL ran out in memory
        again = await svc.submit(ALICE, rid, OptimStepOp(ADAM), seq_id=1)
        assert again.future_id != first.future_id
        assert await _result(svc, again) == out
        assert (await svc.get_run(ALICE, rid)).step == 1
        await svc.stop()

    asyncio.run(go())


@pytest.mark.parametrize("second", [
    OptimStepOp(ADAM), SaveOp(name="nofiles"), ForwardBackwardOp(data=DATA, forward_only=True),
])
def test_reusing_a_seq_id_for_another_call_is_a_400(tmp_path, second):
    async def go():
        svc, w = _service(tmp_path)
        rid = await _run(svc)
        await _result(svc, await svc.submit(ALICE, rid, ForwardBackwardOp(data=DATA), seq_id=0))
        with pytest.raises(InvalidInputError) as e:
            await svc.submit(ALICE, rid, second, seq_id=0)
        assert e.value.status == 400 and e.value.detail.get("field") == "seq_id"
        assert "forward_backward" in str(e.value)
        assert await svc.list_checkpoints(ALICE, rid) == []  # no 'complete' save without files
        assert (await svc.get_run(ALICE, rid)).step == 0
        # the run is still usable with a fresh seq_id
        await _result(svc, await svc.submit(ALICE, rid, OptimStepOp(ADAM), seq_id=1))
        assert (await svc.get_run(ALICE, rid)).step == 1
        await svc.stop()

    asyncio.run(go())


def test_worker_refuses_a_seq_id_reused_for_another_kind(tmp_path):
    async def go():
        cfg = parse_config({"models": [{"name": "mock", "backend": "mock", "model_id": "mock://tiny"}]})
        w = ModelWorker(worker_config(cfg.models[0]))
        await w.create_adapter("r", LoraConfig(rank=4))
        await w.execute("r", ForwardBackwardOp(data=DATA), seq_id=0)
        with pytest.raises(InvalidInputError) as e:
            await w.execute("r", OptimStepOp(ADAM), seq_id=0)
        assert e.value.detail.get("field") == "seq_id"
        await w.close()

    asyncio.run(go())


def test_a_retry_of_a_call_refused_for_a_full_queue_runs_again(tmp_path):
    async def go():
        cfg = parse_config({"models": [{"name": "mock", "backend": "mock", "model_id": "mock://tiny"}]})
        inner = ModelWorker(worker_config(cfg.models[0]))
        svc, w = _service(tmp_path, FlakyWorker(inner, fail_kind="optim_step", fail_first=1))
        rid = await _run(svc)
        await _result(svc, await svc.submit(ALICE, rid, ForwardBackwardOp(data=DATA), seq_id=0))
        first = await svc.submit(ALICE, rid, OptimStepOp(ADAM), seq_id=1)
        st = await svc.wait(ALICE, first.future_id, timeout=30)
        assert st.status == "failed" and st.error["status"] == 429
        assert (await svc.get_run(ALICE, rid)).step == 0
        again = await svc.submit(ALICE, rid, OptimStepOp(ADAM), seq_id=1)
        assert again.future_id != first.future_id
        await _result(svc, again)
        assert (await svc.get_run(ALICE, rid)).step == 1
        assert w.executed.count(("optim_step", 1)) == 1
        await svc.stop()

    asyncio.run(go())
