"""Back-pressure at the gateway's submit (``gateway.training.Training._admit``): a run with ``max_pending_per_adapter`` ops in
flight gets a ``CapacityError`` (HTTP 429 + Retry-After) at submit, before its seq_id is consumed, so the
client's retry with the same seq_id runs once (the Tinker SDK retries a 429 at submit; it never retries a failed
future). Real Service + in-process ModelWorker (mock backend)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from twinkle.server.app import worker_config
from twinkle.server.config import parse_config
from twinkle.server.ops import ForwardBackwardOp
from twinkle.server.service import Service, User
from twinkle.server.worker import ModelWorker
from twinkle.types import CapacityError, LoraConfig, datum_from_tokens

ALICE = User("alice", "k-a")
DATA = [datum_from_tokens([5, 9, 17, 33, 2, 8])]


def test_full_run_is_refused_at_submit_and_the_retry_runs_once(tmp_path: Path):
    async def go() -> None:
        cfg = parse_config({
            "persistence": {"sqlite_path": str(tmp_path / "db.sqlite"), "checkpoint_root": str(tmp_path / "ck")},
            "models": [{"name": "mock", "backend": "mock", "model_id": "mock://tiny", "max_lora_rank": 16,
                        "scheduler": {"max_pending_per_adapter": 2}}],
        })
        w = ModelWorker(worker_config(cfg.models[0]))
        svc = Service(cfg, {"mock": [w]})
        s = await svc.create_session(ALICE)
        ref = await svc.create_run(ALICE, session_id=s.session_id, base_model="mock", lora=LoraConfig(rank=4))
        rid = (await svc.wait(ALICE, ref.future_id, timeout=30)).result.run_id
        first = [await svc.submit(ALICE, rid, ForwardBackwardOp(data=DATA), seq_id=i) for i in range(2)]
        with pytest.raises(CapacityError) as e:  # a 429 at submit, not a failed future
            await svc.submit(ALICE, rid, ForwardBackwardOp(data=DATA), seq_id=2)
        assert e.value.retry_after is not None and e.value.retry_after > 0
        assert "(2: 2 forward_backward; at most 2" in str(e.value)  # what is in flight, by kind
        for r in first:
            assert (await svc.wait(ALICE, r.future_id, timeout=30)).status == "complete"
        await asyncio.sleep(0)  # the done-callbacks release the slots
        again = await svc.submit(ALICE, rid, ForwardBackwardOp(data=DATA), seq_id=2)  # seq_id 2 was not consumed
        st = await svc.wait(ALICE, again.future_id, timeout=30)
        assert st.status == "complete", st.error
        assert w._scheduler.stats["rejected_capacity"] == 0  # the worker never had to refuse

    asyncio.run(go())
