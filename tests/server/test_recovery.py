"""Faults in process: a worker replica that restarts (empty) and a gateway that restarts. The runs come back
from their latest checkpoint, or fail with an error that names it; no step is counted twice.
Real Service + ModelWorker (mock backend) behind a ``WorkerAPI`` double that can restart."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from twinkle.server.app import worker_config
from twinkle.server.config import parse_config
from twinkle.server.ops import ForwardBackwardOp, OptimStepOp, SaveOp
from twinkle.server.service import Service, User
from twinkle.server.store import Store
from twinkle.server.worker import ModelWorker
from twinkle.server.worker_api import WorkerAPI
from twinkle.types import AdamParams, LoraConfig, StateLostError, datum_from_tokens

ALICE = User("alice", "k-a")
DATA = [datum_from_tokens([5, 9, 17, 33, 2, 8])]
ADAM = AdamParams(learning_rate=0.05)


class RestartableWorker:
    """The real worker; ``restart()`` replaces it with a fresh one, as Ray Serve does with a killed replica."""

    def __init__(self, config: dict[str, Any]):
        self.config = config
        self.inner = ModelWorker(config)
        self.restarts = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def restart(self) -> None:
        await self.inner.close()
        self.inner = ModelWorker(self.config)
        self.restarts += 1


def _config(tmp_path: Path):
    return parse_config({
        "persistence": {"sqlite_path": str(tmp_path / "db.sqlite"), "checkpoint_root": str(tmp_path / "ck")},
        "models": [{"name": "mock", "backend": "mock", "model_id": "mock://tiny", "max_lora_rank": 16}],
    })


def _service(tmp_path: Path, worker: Any = None) -> tuple[Service, RestartableWorker]:
    cfg = _config(tmp_path)
    w = worker or RestartableWorker(worker_config(cfg.models[0]))
    assert isinstance(w, WorkerAPI)
    return Service(cfg, {"mock": [w]}, store=Store(tmp_path / "db.sqlite")), w


async def _ok(svc: Service, ref: Any) -> Any:
    st = await svc.wait(ALICE, ref.future_id, timeout=30)
    assert st.status == "complete", st.error
    return st.result


async def _failed(svc: Service, ref: Any) -> dict:
    st = await svc.wait(ALICE, ref.future_id, timeout=30)
    assert st.status == "failed", st.result
    return st.error


class Trainer:
    def __init__(self, svc: Service, rid: str):
        self.svc, self.rid, self.seq = svc, rid, 0

    async def call(self, op: Any) -> Any:
        self.seq += 1
        return await self.svc.submit(ALICE, self.rid, op, seq_id=self.seq)

    async def step(self) -> None:
        await _ok(self.svc, await self.call(ForwardBackwardOp(data=DATA)))
        await _ok(self.svc, await self.call(OptimStepOp(ADAM)))

    async def loss(self) -> float:
        out = await _ok(self.svc, await self.call(ForwardBackwardOp(data=DATA, forward_only=True)))
        return out.metrics["loss:sum"]


async def _start(svc: Service) -> Trainer:
    await svc.start()
    s = await svc.create_session(ALICE)
    ref = await svc.create_run(ALICE, session_id=s.session_id, base_model="mock", lora=LoraConfig(rank=4, seed=1))
    return Trainer(svc, (await _ok(svc, ref)).run_id)


async def _settled(svc: Service, rid: str) -> None:
    ready = svc.runs.extra[rid].ready
    if ready is not None:
        try:
            await ready
        except Exception:
            pass


def test_replica_restart_after_a_checkpoint_is_transparent(tmp_path):
    async def go():
        svc, w = _service(tmp_path)
        t = await _start(svc)
        await t.step()
        await _ok(svc, await t.call(SaveOp(name="c1")))
        at_save = await t.loss()
        await w.restart()
        # the next call finds the adapter missing: the run is reloaded from c1 and the call runs again
        assert await t.loss() == pytest.approx(at_save)
        run = await svc.get_run(ALICE, t.rid)
        assert run.state == "active" and run.step == 1 and run.metadata["recovered_from"].endswith("/c1")
        await t.step()
        assert (await svc.get_run(ALICE, t.rid)).step == 2
        await svc.stop()

    asyncio.run(go())


def test_replica_restart_with_unsaved_steps_rolls_back_and_says_so(tmp_path):
    async def go():
        svc, w = _service(tmp_path)
        t = await _start(svc)
        await t.step()
        await _ok(svc, await t.call(SaveOp(name="c1")))
        at_save = await t.loss()
        await t.step()
        await t.step()  # steps 2 and 3 live only in the replica's memory
        await w.restart()
        err = await _failed(svc, await t.call(ForwardBackwardOp(data=DATA)))
        assert err["code"] == "state_lost" and f"tinker://{t.rid}/weights/c1" in err["error"]
        assert "step 1" in err["error"] and "step 3" in err["error"]
        await _settled(svc, t.rid)
        run = await svc.get_run(ALICE, t.rid)
        assert run.state == "active" and run.step == 1
        assert await t.loss() == pytest.approx(at_save)  # the checkpoint's weights, told once
        await t.step()
        assert (await svc.get_run(ALICE, t.rid)).step == 2
        await svc.stop()

    asyncio.run(go())


def test_replica_restart_without_a_checkpoint_marks_the_run_lost(tmp_path):
    async def go():
        svc, w = _service(tmp_path)
        t = await _start(svc)
        await t.step()
        await w.restart()
        err = await _failed(svc, await t.call(ForwardBackwardOp(data=DATA)))
        assert err["code"] == "state_lost" and "no checkpoint" in err["error"]
        assert (await svc.get_run(ALICE, t.rid)).state == "lost"
        with pytest.raises(StateLostError, match="no checkpoint"):
            await t.call(ForwardBackwardOp(data=DATA))
        await svc.stop()

    asyncio.run(go())


def test_gateway_restart_reloads_loaded_runs_from_their_checkpoint(tmp_path):
    async def go():
        svc, w = _service(tmp_path)
        t = await _start(svc)
        await t.step()
        await t.step()
        await _ok(svc, await t.call(SaveOp(name="c2")))
        at_save = await t.loss()
        s2 = await svc.create_session(ALICE)
        bare = (await _ok(svc, await svc.create_run(
            ALICE, session_id=s2.session_id, base_model="mock", lora=LoraConfig(rank=4)))).run_id
        await svc.stop()
        svc.store.close()
        await w.inner.close()

        # a new gateway process with fresh workers (the old ones died with the launcher)
        svc2, _ = _service(tmp_path)
        await svc2.start()
        await _settled(svc2, t.rid)
        run = await svc2.get_run(ALICE, t.rid)
        assert run.state == "active" and run.step == 2 and run.metadata["recovered_from"].endswith("/c2")
        t2 = Trainer(svc2, t.rid)
        t2.seq = run.last_seq_id
        assert await t2.loss() == pytest.approx(at_save)
        await t2.step()
        assert (await svc2.get_run(ALICE, t.rid)).step == 3
        lost = await svc2.get_run(ALICE, bare)
        assert lost.state == "lost" and "no checkpoint" in lost.metadata["lost_reason"]
        await svc2.stop()

    asyncio.run(go())
