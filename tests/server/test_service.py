"""The gateway Service with in-process ModelWorkers (mock backend): leases, futures, persistence, isolation."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from twinkle.server.app import worker_config
from twinkle.server.config import parse_config
from twinkle.server.ops import ForwardBackwardOp, LoadOp, OptimStepOp, SampleOp, SaveOp
from twinkle.server.service import Service, User
from twinkle.server.store import Store
from twinkle.server.worker import ModelWorker
from twinkle.types import (
    AdamParams,
    AuthenticationError,
    GoneError,
    InvalidInputError,
    LimitExceededError,
    LoraConfig,
    NotFoundError,
    SamplingParams,
    StateLostError,
    datum_from_tokens,
)

ALICE = User("alice", "k-a")
BOB = User("bob", "k-b")
DATA = [datum_from_tokens([5, 9, 17, 33, 2, 8]), datum_from_tokens([7, 7, 40, 41, 42])]


def _config(tmp_path: Path, **extra):
    return parse_config({
        "persistence": {"sqlite_path": str(tmp_path / "db.sqlite"), "checkpoint_root": str(tmp_path / "ck")},
        "limits": {"max_adapters_per_user": 3, "max_tokens_per_request": 64},
        "models": [{"name": "mock", "backend": "mock", "model_id": "mock://tiny", "max_lora_rank": 16}],
        **extra,
    })


def _service(tmp_path: Path, **extra) -> Service:
    cfg = _config(tmp_path, **extra)
    return Service(cfg, {"mock": [ModelWorker(worker_config(cfg.models[0]))]})


async def _result(svc: Service, user: User, ref) -> object:
    st = await svc.wait(user, ref.future_id, timeout=30)
    assert st.status == "complete", st.error
    return st.result


async def _train(svc: Service, user: User, steps: int = 2):
    s = await svc.create_session(user)
    ref = await svc.create_run(user, session_id=s.session_id, base_model="mock", lora=LoraConfig(rank=4, seed=1))
    run = await _result(svc, user, ref)
    for _ in range(steps):
        await _result(svc, user, await svc.submit(user, run.run_id, ForwardBackwardOp(data=DATA)))
        await _result(svc, user, await svc.submit(user, run.run_id, OptimStepOp(AdamParams(learning_rate=0.05))))
    return s, run


def _loss(out) -> float:
    return out.metrics["loss:sum"]


def test_train_save_load_and_step_counting(tmp_path):
    async def go():
        svc = _service(tmp_path)
        s, run = await _train(svc, ALICE, steps=2)
        info = await svc.get_run(ALICE, run.run_id)
        assert info.step == 2 and "loss:sum" in info.last_metrics
        assert run.run_id == f"{s.session_id}:train:0"
        ck = await _result(svc, ALICE, await svc.submit(ALICE, run.run_id, SaveOp(name="c1")))
        assert ck.path == f"tinker://{run.run_id}/weights/c1" and ck.step == 2
        assert (tmp_path / "ck" / "alice" / run.run_id / "training" / "c1").is_dir()
        before = _loss(await _result(svc, ALICE, await svc.submit(
            ALICE, run.run_id, ForwardBackwardOp(data=DATA, forward_only=True))))
        await _result(svc, ALICE, await svc.submit(ALICE, run.run_id, ForwardBackwardOp(data=DATA)))
        await _result(svc, ALICE, await svc.submit(ALICE, run.run_id, OptimStepOp(AdamParams(learning_rate=0.05))))
        await _result(svc, ALICE, await svc.submit(ALICE, run.run_id, LoadOp(checkpoint="c1")))
        assert (await svc.get_run(ALICE, run.run_id)).step == 2
        after = _loss(await _result(svc, ALICE, await svc.submit(
            ALICE, run.run_id, ForwardBackwardOp(data=DATA, forward_only=True))))
        assert after == pytest.approx(before, abs=1e-9)
        with pytest.raises(InvalidInputError) as ei:
            await svc.submit(ALICE, run.run_id, SaveOp(name="c1"))
        assert ei.value.field == "name"
        hist = await svc.get_metrics(ALICE, run.run_id)
        assert [p.kind for p in hist.points].count("optim_step") == 3
        await svc.stop()

    asyncio.run(go())


def test_run_row_stores_dirty_at_once_and_metrics_within_a_second(tmp_path):
    """What recovery reads (the ``dirty`` flag, step, checkpoints) is written at once; a forward_backward's
    last metrics reach the stored row within ~1 s (coalesced) and at shutdown, not on every call."""
    async def go():
        svc = _service(tmp_path)
        _, run = await _train(svc, ALICE, steps=1)

        def stored() -> dict:
            return next(r for r in svc.runs.store.runs() if r["run_id"] == run.run_id)

        await _result(svc, ALICE, await svc.submit(ALICE, run.run_id, SaveOp(name="c1")))
        assert stored()["_dirty"] is False
        first = _loss(await _result(svc, ALICE, await svc.submit(ALICE, run.run_id, ForwardBackwardOp(data=DATA))))
        assert stored()["_dirty"] is True  # work since the checkpoint: stored before the result is seen
        assert stored()["last_metrics"]["loss:sum"] == pytest.approx(first)
        second = _loss(await _result(svc, ALICE, await svc.submit(
            ALICE, run.run_id, ForwardBackwardOp(data=DATA[:1]))))
        assert second != pytest.approx(first)
        assert stored()["last_metrics"]["loss:sum"] == pytest.approx(first)  # coalesced, not yet written
        assert (await svc.get_run(ALICE, run.run_id)).last_metrics["loss:sum"] == pytest.approx(second)
        deadline = time.monotonic() + 5
        while stored()["last_metrics"]["loss:sum"] != pytest.approx(second) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert stored()["last_metrics"]["loss:sum"] == pytest.approx(second)
        third = _loss(await _result(svc, ALICE, await svc.submit(
            ALICE, run.run_id, ForwardBackwardOp(data=DATA[1:]))))
        await svc.stop()  # a clean shutdown writes what is pending
        assert stored()["last_metrics"]["loss:sum"] == pytest.approx(third)

    asyncio.run(go())


@pytest.mark.parametrize("bad", ["../x", "/abs", "a/b", "..", "x\x01y", "", "a\\b", ".hidden"])
def test_bad_checkpoint_names_are_refused(tmp_path, bad):
    async def go():
        svc = _service(tmp_path)
        _, run = await _train(svc, ALICE, steps=0)
        with pytest.raises(InvalidInputError) as ei:
            await svc.submit(ALICE, run.run_id, SaveOp(name=bad))
        assert ei.value.field == "name"
        with pytest.raises(InvalidInputError):
            await svc.submit(ALICE, run.run_id, LoadOp(checkpoint=f"tinker://{run.run_id}/weights/{bad}"))
        assert not any((tmp_path / "ck").rglob("*x*")) if (tmp_path / "ck").exists() else True
        await svc.stop()

    asyncio.run(go())


def test_long_poll_wakes_when_result_exists_and_pending_after_timeout(tmp_path):
    class SlowWorker(ModelWorker):
        gate: asyncio.Event

        async def execute(self, adapter_id, op, *, seq_id=None, path=None):
            if isinstance(op, ForwardBackwardOp):
                await self.gate.wait()
            return await super().execute(adapter_id, op, seq_id=seq_id, path=path)

    async def go():
        cfg = _config(tmp_path)
        worker = SlowWorker(worker_config(cfg.models[0]))
        worker.gate = asyncio.Event()
        svc = Service(cfg, {"mock": [worker]})
        s = await svc.create_session(ALICE)
        run = await _result(svc, ALICE, await svc.create_run(ALICE, session_id=s.session_id, base_model="mock",
                                                             lora=LoraConfig(rank=4)))
        ref = await svc.submit(ALICE, run.run_id, ForwardBackwardOp(data=DATA))
        pending = await svc.wait(ALICE, ref.future_id, timeout=0.05)
        assert pending.status == "pending"
        waiter = asyncio.create_task(svc.wait(ALICE, ref.future_id, timeout=300))
        await asyncio.sleep(0.05)
        assert not waiter.done()
        worker.gate.set()
        # the long-poll returns as soon as the result exists, far before its 300 s timeout
        state = await asyncio.wait_for(waiter, 20)
        assert state.status == "complete" and "loss:sum" in state.result.metrics
        with pytest.raises(NotFoundError):
            await svc.wait(BOB, ref.future_id, timeout=0)
        await svc.stop()

    asyncio.run(go())


def test_lease_expiry_checkpoints_and_unloads(tmp_path):
    async def go():
        svc = _service(tmp_path)
        s, run = await _train(svc, ALICE, steps=1)
        await svc.heartbeat(ALICE, s.session_id)
        worker = svc.workers["mock"][0]
        assert run.run_id in await worker.list_adapters()
        await svc.reap(now=time.time() + 5)  # within the lease: nothing happens
        assert (await svc.get_run(ALICE, run.run_id)).state == "active"
        await svc.reap(now=time.time() + s.lease_seconds + 1)
        info = await svc.get_run(ALICE, run.run_id)
        assert info.state == "unloaded"
        assert run.run_id not in await worker.list_adapters()
        sess = await svc.get_session(ALICE, s.session_id)
        assert sess.state == "expired"
        with pytest.raises(GoneError):
            await svc.heartbeat(ALICE, s.session_id)
        cks = await svc.list_checkpoints(ALICE, run.run_id)
        assert len(cks) == 1 and cks[0].name.startswith("auto-") and cks[0].kind == "training"
        assert info.last_checkpoint == cks[0].path
        with pytest.raises(InvalidInputError, match="unloaded"):
            await svc.submit(ALICE, run.run_id, ForwardBackwardOp(data=DATA))
        # the automatic checkpoint restores the last state in a new session
        s2 = await svc.create_session(ALICE)
        new = await _result(svc, ALICE, await svc.resume_run(ALICE, session_id=s2.session_id, checkpoint=cks[0].path))
        assert new.step == 1 and new.state == "active"
        await svc.stop()

    asyncio.run(go())


def test_reattach_within_lease_extends_it(tmp_path):
    async def go():
        svc = _service(tmp_path, lease_seconds=10)
        s, run = await _train(svc, ALICE, steps=0)
        svc._sessions[s.session_id].last_heartbeat -= 8  # 8 s without heartbeat
        again = await svc.get_session(ALICE, s.session_id)  # re-attach
        assert again.state == "active" and again.run_ids == [run.run_id]
        await svc.reap(now=time.time() + 5)
        assert (await svc.get_run(ALICE, run.run_id)).state == "active"
        await svc.stop()

    asyncio.run(go())


def test_restart_keeps_runs_and_checkpoints_and_resume_gives_same_next_loss(tmp_path):
    async def go():
        svc = _service(tmp_path)
        _, run = await _train(svc, ALICE, steps=3)
        ck = await _result(svc, ALICE, await svc.submit(ALICE, run.run_id, SaveOp(name="ck3")))
        await _result(svc, ALICE, await svc.submit(ALICE, run.run_id, ForwardBackwardOp(data=DATA)))
        await _result(svc, ALICE, await svc.submit(ALICE, run.run_id, OptimStepOp(AdamParams(learning_rate=0.05))))
        expected = _loss(await _result(svc, ALICE, await svc.submit(ALICE, run.run_id, ForwardBackwardOp(data=DATA))))
        last_ref = await svc.submit(ALICE, run.run_id, ForwardBackwardOp(data=DATA, forward_only=True))
        last = await _result(svc, ALICE, last_ref)
        await svc.stop()
        svc.store.close()

        svc2 = _service(tmp_path)  # a fresh process: new store handle, new worker
        runs, total = await svc2.list_runs(ALICE)
        assert total == 1 and runs[0].run_id == run.run_id and runs[0].state == "lost"
        assert [c.path for c in await svc2.list_checkpoints(ALICE)] == [ck.path]
        with pytest.raises(StateLostError):
            await svc2.submit(ALICE, run.run_id, ForwardBackwardOp(data=DATA))
        # completed results survive the restart too
        old = await svc2.wait(ALICE, last_ref.future_id, timeout=0)
        assert old.status == "complete" and old.result["metrics"]["loss:sum"] == pytest.approx(_loss(last))
        s = await svc2.create_session(ALICE)
        new = await _result(svc2, ALICE, await svc2.resume_run(ALICE, session_id=s.session_id, checkpoint=ck.path))
        assert new.step == 3
        await _result(svc2, ALICE, await svc2.submit(ALICE, new.run_id, ForwardBackwardOp(data=DATA)))
        await _result(svc2, ALICE, await svc2.submit(ALICE, new.run_id, OptimStepOp(AdamParams(learning_rate=0.05))))
        got = _loss(await _result(svc2, ALICE, await svc2.submit(ALICE, new.run_id, ForwardBackwardOp(data=DATA))))
        assert got == pytest.approx(expected, rel=1e-6)
        await svc2.stop()

    asyncio.run(go())


def test_users_are_isolated(tmp_path):
    async def go():
        svc = _service(tmp_path)
        s, run = await _train(svc, ALICE, steps=1)
        ck = await _result(svc, ALICE, await svc.submit(ALICE, run.run_id, SaveOp(name="mine")))
        sb = await svc.create_session(BOB)
        calls = [
            svc.get_session(BOB, s.session_id),
            svc.heartbeat(BOB, s.session_id),
            svc.close_session(BOB, s.session_id),
            svc.get_run(BOB, run.run_id),
            svc.delete_run(BOB, run.run_id),
            svc.get_metrics(BOB, run.run_id),
            svc.submit(BOB, run.run_id, ForwardBackwardOp(data=DATA)),
            svc.submit(BOB, run.run_id, SaveOp(name="steal")),
            svc.list_checkpoints(BOB, run.run_id),
            svc.get_checkpoint(BOB, ck.path),
            svc.delete_checkpoint(BOB, run.run_id, "weights/mine"),
            svc.set_checkpoint_public(BOB, run.run_id, "weights/mine", True),
            svc.resume_run(BOB, session_id=sb.session_id, checkpoint=ck.path),
            svc.create_run(BOB, session_id=s.session_id, base_model="mock", lora=LoraConfig(rank=4)),
            svc.sample(BOB, SampleOp(prompt=[1, 2]), run_id=run.run_id),
            svc.sample(BOB, SampleOp(prompt=[1, 2]), checkpoint=ck.path),
            svc.create_sampler(BOB, session_id=sb.session_id, checkpoint=ck.path),
        ]
        for call in calls:
            with pytest.raises(NotFoundError):
                await call
        assert await svc.list_runs(BOB) == ([], 0)
        assert await svc.list_checkpoints(BOB) == []
        assert await svc.list_sessions(BOB) == [sb]
        # alice's things are untouched; published checkpoints become readable
        assert (await svc.get_run(ALICE, run.run_id)).state == "active"
        await svc.set_checkpoint_public(ALICE, run.run_id, "weights/mine", True)
        assert (await svc.get_checkpoint(BOB, ck.path)).public
        await svc.stop()

    asyncio.run(go())


def test_limits_answer_413(tmp_path):
    async def go():
        svc = _service(tmp_path)
        s = await svc.create_session(ALICE)
        with pytest.raises(LimitExceededError) as ei:
            await svc.create_run(ALICE, session_id=s.session_id, base_model="mock", lora=LoraConfig(rank=32))
        assert ei.value.field == "lora.rank" and ei.value.status == 413
        runs = [await _result(svc, ALICE, await svc.create_run(
            ALICE, session_id=s.session_id, base_model="mock", lora=LoraConfig(rank=2))) for _ in range(3)]
        with pytest.raises(LimitExceededError, match="active runs"):
            await svc.create_run(ALICE, session_id=s.session_id, base_model="mock", lora=LoraConfig(rank=2))
        with pytest.raises(LimitExceededError) as ei:
            await svc.submit(ALICE, runs[0].run_id, ForwardBackwardOp(data=[datum_from_tokens(list(range(1, 80)))]))
        assert ei.value.field == "data"
        with pytest.raises(InvalidInputError) as ei:
            await svc.create_run(ALICE, session_id=s.session_id, base_model="gpt-9", lora=LoraConfig(rank=2))
        assert ei.value.field == "base_model"
        await svc.delete_run(ALICE, runs[0].run_id)
        await _result(svc, ALICE, await svc.create_run(
            ALICE, session_id=s.session_id, base_model="mock", lora=LoraConfig(rank=2)))
        await svc.stop()

    asyncio.run(go())


def test_idempotent_run_id_and_worker_errors_become_failed_futures(tmp_path):
    async def go():
        svc = _service(tmp_path)
        s = await svc.create_session(ALICE, client="tinker")
        rid = f"{s.session_id}:train:7"
        a = await _result(svc, ALICE, await svc.create_run(ALICE, session_id=s.session_id, base_model="mock",
                                                           lora=LoraConfig(rank=2), run_id=rid))
        b = await _result(svc, ALICE, await svc.create_run(ALICE, session_id=s.session_id, base_model="mock",
                                                           lora=LoraConfig(rank=2), run_id=rid))
        assert a.run_id == b.run_id == rid and len((await svc.list_runs(ALICE))[0]) == 1
        with pytest.raises(InvalidInputError):
            await svc.create_run(ALICE, session_id=s.session_id, base_model="mock", lora=LoraConfig(rank=2),
                                 run_id="other:train:0")
        bad = [datum_from_tokens([1, 2, 99999])]  # out of the mock vocabulary: the worker refuses it
        st = await svc.wait(ALICE, (await svc.submit(ALICE, rid, ForwardBackwardOp(data=bad))).future_id)
        assert st.status == "failed" and st.error["category"] == "user" and st.error["code"] == "invalid_input"
        assert "traceback" not in str(st.error).lower()
        await svc.stop()

    asyncio.run(go())


def test_authentication(tmp_path):
    svc = _service(tmp_path)
    _, key = svc.store.create_key("carol")
    assert svc.authenticate(key).name == "carol"
    for bad in (None, "", "tml-nope"):
        with pytest.raises(AuthenticationError):
            svc.authenticate(bad)
    svc.add_bootstrap_key("tml-boot", "admin")
    assert svc.authenticate("tml-boot").is_admin
    store = Store(tmp_path / "db.sqlite")
    store.revoke_key(store.list_keys("carol")[0]["key_id"])
    svc._auth_cache.clear()
    with pytest.raises(AuthenticationError):
        svc.authenticate(key)


def test_sample_requests_carry_their_users_scope(tmp_path, monkeypatch):
    """The gateway stamps every sample op with its user, so prompt caches (``twinkle.sampler._prefix``) are never
    shared across users: one user's first-token time tells nothing of what another sent."""
    from twinkle.server import scheduler as sched

    seen: list = []
    orig = sched._sample_item
    monkeypatch.setattr(sched, "_sample_item", lambda s, a: seen.append(orig(s, a)) or seen[-1])

    async def go():
        svc = _service(tmp_path)
        for user in (ALICE, BOB):
            op = SampleOp(prompt=[5, 6, 7], params=SamplingParams(max_tokens=2))
            op.scope = "forged"  # whatever a caller put there is replaced
            await _result(svc, user, await svc.sample(user, op, base_model="mock"))
        await svc.stop()

    asyncio.run(go())
    assert [it.scope for it in seen] == ["alice", "bob"]
