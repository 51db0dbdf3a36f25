"""A session that ends (closed, or its lease lapsed because the client was killed) cancels its queued
sampling work: the worker drops it before running it, instead of draining it for minutes."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

from twinkle.server.app import worker_config
from twinkle.server.config import parse_config
from twinkle.server.ops import SampleOp
from twinkle.server.service import Service, User
from twinkle.server.worker import ModelWorker

sys.path.insert(0, str(Path(__file__).parent))
from _fake_backend import FakeBackend  # noqa: E402

ALICE = User("alice", "k-a")


def _service(tmp_path: Path) -> tuple[Service, ModelWorker, FakeBackend]:
    cfg = parse_config({
        "persistence": {"sqlite_path": str(tmp_path / "db.sqlite"), "checkpoint_root": str(tmp_path / "ck")},
        "models": [{"name": "mock", "backend": "mock", "model_id": "mock://tiny"}],
    })
    backend = FakeBackend()
    worker = ModelWorker(worker_config(cfg.models[0]), backend=backend)
    return Service(cfg, {"mock": [worker]}), worker, backend


async def _entered(backend: FakeBackend) -> None:
    deadline = time.monotonic() + 10
    while not backend.entered.is_set():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)


def _run(tmp_path: Path, end) -> None:
    async def go():
        svc, worker, backend = _service(tmp_path)
        s = await svc.create_session(ALICE, lease_seconds=5)
        sampler = await svc.create_sampler(ALICE, session_id=s.session_id, base_model="mock")
        other = await svc.create_session(ALICE)
        keep = await svc.create_sampler(ALICE, session_id=other.session_id, base_model="mock")
        backend.pause()
        running = await svc.sample(ALICE, SampleOp(prompt=[1, 2]),
                                   sampler_id=sampler["sampler_id"])
        await _entered(backend)
        queued = [await svc.sample(ALICE, SampleOp(prompt=[3, i]), sampler_id=sampler["sampler_id"]) for i in range(5)]
        neighbour = await svc.sample(ALICE, SampleOp(prompt=[4, 4]), sampler_id=keep["sampler_id"])
        await asyncio.sleep(0.05)
        assert (await worker.status())["queue_depth"] == 7
        t0 = time.monotonic()
        await end(svc, s)
        for ref in queued:
            st = await svc.wait(ALICE, ref.future_id, timeout=5)
            assert st.status == "failed" and st.error["status"] == 410, st
            assert "cancelled" in st.error["error"] and s.session_id in st.error["error"]
        assert time.monotonic() - t0 < 2
        assert (await worker.status())["samples_cancelled"] == 5
        backend.resume()
        # the request already running finishes on the worker; nobody is left to read it
        assert (await svc.wait(ALICE, running.future_id, timeout=10)).error["status"] == 410
        assert (await svc.wait(ALICE, neighbour.future_id, timeout=10)).status == "complete"  # another session
        st = await worker.status()
        assert st["queue_depth"] == 0 and st["samples_run"] == 2
        await svc.stop()
        await worker.close()

    asyncio.run(go())


def test_closing_a_session_cancels_its_queued_samples(tmp_path):
    async def close(svc: Service, s) -> None:
        await svc.close_session(ALICE, s.session_id)

    _run(tmp_path, close)


def test_a_lapsed_lease_cancels_its_queued_samples(tmp_path):
    async def lapse(svc: Service, s) -> None:
        await svc.reap(now=time.time() + s.lease_seconds + 1)  # the client was killed: no more heartbeats
        assert (await svc.get_session(ALICE, s.session_id)).state == "expired"

    _run(tmp_path, lapse)


def test_polling_for_pending_work_extends_the_lease(tmp_path, monkeypatch):
    """A client whose heartbeats time out (a loaded machine) but who polls for its session's pending samples is
    alive: the poll extends the lease as a heartbeat would. A client that does neither loses the session."""
    from twinkle.server.state import identity

    clock = [time.time()]
    monkeypatch.setattr(identity, "now", lambda: clock[0])

    async def go():
        svc, worker, backend = _service(tmp_path)
        s = await svc.create_session(ALICE, lease_seconds=5)
        t0 = clock[0]
        sampler = await svc.create_sampler(ALICE, session_id=s.session_id, base_model="mock")
        backend.pause()
        ref = await svc.sample(ALICE, SampleOp(prompt=[1, 2]), sampler_id=sampler["sampler_id"])
        await _entered(backend)
        clock[0] = t0 + 4  # no heartbeat since t0...
        assert (await svc.wait(ALICE, ref.future_id, timeout=0)).status == "pending"  # ...but the client polls
        await svc.reap(now=t0 + 7)  # 7 s after the last heartbeat, 3 s after the poll
        assert svc.sessions.by_id[s.session_id].state == "active"
        await svc.reap(now=t0 + 10)  # neither heartbeats nor polls for 6 s: gone
        assert svc.sessions.by_id[s.session_id].state == "expired"
        backend.resume()
        assert (await svc.wait(ALICE, ref.future_id, timeout=10)).error["status"] == 410
        await svc.stop()
        await worker.close()

    asyncio.run(go())
