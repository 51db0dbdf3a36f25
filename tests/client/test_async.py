"""Async twins: ``await`` on remote futures, ``a*`` model/sampler methods, ``session.aio``; two adapters trained
with asyncio.gather have their requests in flight at the same time (real gateway + mock backend, in-process).

Overlap is asserted by counting requests in flight at the transport, never by wall-clock time (timings are only
printed: on a loaded CI machine a 0.8x speed-up bound is noise, and a test must not assert speed)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from inprocess_server import InProcessServer

import twinkle_client
from twinkle.types import InvalidInputError
from twinkle_client.model import MockModel
from twinkle_client.sampler import Sampler

URL = "http://twinkle.test"
BATCH = [{"input_ids": [(7 * i + j) % 200 + 3 for j in range(48)]} for i in range(4)]
STEPS = 3  # gathered, both adapters have a request on the wire from the first step on


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = InProcessServer(tmp_path_factory.mktemp("srv"))
    yield srv
    srv.close()


RTT_S = 0.03  # a server 30 ms away (in-process there is no network to overlap)


class _InFlight:
    """Counts requests in flight through the wrapped transport and remembers the most seen at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.now = 0
        self.peak = 0

    def reset(self) -> None:
        with self._lock:
            self.now = self.peak = 0

    def __enter__(self) -> None:
        with self._lock:
            self.now += 1
            self.peak = max(self.peak, self.now)

    def __exit__(self, *exc) -> None:
        with self._lock:
            self.now -= 1


def _far(server, in_flight: _InFlight | None = None):
    def handler(request, send):
        if in_flight is None:
            time.sleep(RTT_S)
            return send(request)
        with in_flight:
            time.sleep(RTT_S)
            return send(request)

    return server.wrap(handler)


def _two_adapters(server, transport=None):
    sess = twinkle_client.connect(URL, "key-alice", transport=transport or server.transport, heartbeat=False)
    model = MockModel(session=sess)
    for name in ("a", "b"):
        model.add_adapter_to_model(name, {"rank": 4})
        model.set_optimizer("AdamW", lr=1e-2, adapter_name=name)
    return sess, model


async def _train(model: MockModel, name: str, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        await model.aforward_backward(inputs=BATCH, adapter_name=name)
        await model.aclip_grad_and_step(adapter_name=name)
        losses.append(model.calculate_metric(adapter_name=name)["loss"])
    return losses


def test_await_future_and_async_session(server):
    sess, model = _two_adapters(server)

    async def go():
        out = await model.forward_backward_async(inputs=BATCH, adapter_name="a")  # every remote future awaits
        step = await model.optim_step_async(adapter_name="a")
        runs = await sess.aio.runs(all_sessions=False)
        hist = await sess.aio.metrics(model._adapter("a").run_id)
        sample = await Sampler(model, adapter_name="a").asample([5, 6, 7], {"max_tokens": 4})
        return out, step, runs, hist, sample

    out, step, runs, hist, sample = asyncio.run(go())
    assert out.metrics["loss:sum"] > 0 and step["step"] == 1
    assert {r.name for r in runs} == {"a", "b"}
    assert [p.kind for p in hist.points][-2:] == ["forward_backward", "optim_step"]
    assert len(sample.sequences[0].tokens) == 4
    sess.detach()


def test_gather_two_adapters_overlaps_their_requests(server):
    in_flight = _InFlight()
    sess, model = _two_adapters(server, _far(server, in_flight))

    async def sequential():
        return [await _train(model, "a", STEPS), await _train(model, "b", STEPS)]

    async def concurrent():
        return list(await asyncio.gather(_train(model, "a", STEPS), _train(model, "b", STEPS)))

    in_flight.reset()
    t0 = time.perf_counter()
    seq_losses = asyncio.run(sequential())
    t_seq = time.perf_counter() - t0
    seq_peak = in_flight.peak
    in_flight.reset()
    t0 = time.perf_counter()
    con_losses = asyncio.run(concurrent())
    t_con = time.perf_counter() - t0
    con_peak = in_flight.peak
    print(f"two adapters x {STEPS} steps, {RTT_S * 1000:.0f} ms RTT: sequential {t_seq:.2f}s, asyncio.gather {t_con:.2f}s "
          f"(ratio {t_seq / t_con:.2f})")
    assert all(len(x) == STEPS for x in seq_losses + con_losses)
    assert seq_peak == 1  # one after the other: never two requests on the wire at once
    assert con_peak >= 2  # gathered: both adapters' requests wait on the (slow) network together
    for name in ("a", "b"):
        assert sess.get_run(model._adapter(name).run_id).step == 2 * STEPS
    sess.detach()


def test_async_twins_for_setup_and_checkpoints(server):
    """Issue 17: adapters, optimizer/scheduler, save and load have ``a*`` twins over the same request building;
    two adapters are set up concurrently from one coroutine, and a re-run re-uses the session's run."""
    sess = twinkle_client.connect(URL, "key-alice", transport=server.transport, heartbeat=False)
    model = MockModel(session=sess)

    async def setup(name: str) -> str:
        run = await model.aadd_adapter_to_model(name, {"rank": 4})
        await model.aset_optimizer("AdamW", lr=1e-2, adapter_name=name)
        await model.aset_lr_scheduler("cosine", num_training_steps=10, adapter_name=name)
        await model.aforward_backward(inputs=BATCH, adapter_name=name)
        await model.aclip_grad_and_step(adapter_name=name)
        return run.run_id

    async def go():
        ids = await asyncio.gather(setup("x"), setup("y"))
        path = await model.asave("one", adapter_name="x")
        await model.aforward_backward(inputs=BATCH, adapter_name="x")
        await model.aclip_grad_and_step(adapter_name="x")
        lora = await model.aload("one", adapter_name="x")  # back to step 1, optimizer included
        again = await model.aadd_adapter_to_model("x", {"rank": 4})  # a re-run cell: the same run
        return ids, path, lora, again

    (id_x, id_y), path, lora, again = asyncio.run(go())
    assert id_x != id_y and again.run_id == id_x
    assert path.startswith("tinker://") and path.endswith("/one")
    assert lora.rank == 4 and model._adapter("x").step == 1 == sess.get_run(id_x).step
    assert sess.get_run(id_y).step == 1
    with pytest.raises(InvalidInputError) as e:
        asyncio.run(model.aset_optimizer("AdamW", lr=1e-2, bogus=1, adapter_name="x"))
    assert "bogus" in str(e.value)
    sess.detach()


def test_async_twins_for_run_info_checkpoints_and_remove(server):
    """``arun_info``, ``acheckpoints`` and ``aremove_adapter`` answer what their blocking twins answer."""
    sess = twinkle_client.connect(URL, "key-alice", transport=server.transport, heartbeat=False)
    model = MockModel(session=sess)

    async def go():
        await model.aadd_adapter_to_model("p", {"rank": 4})
        await model.aadd_adapter_to_model("q", {"rank": 4})
        await model.aset_optimizer("AdamW", lr=1e-2, adapter_name="p")
        await model.aforward_backward(inputs=BATCH, adapter_name="p")
        await model.aclip_grad_and_step(adapter_name="p")
        await model.asave("ck", adapter_name="p")
        info = await model.arun_info("p")
        cks = await model.acheckpoints("p")
        q_id = model._adapter("q").run_id
        await model.aremove_adapter("q")
        return info, cks, q_id

    info, cks, q_id = asyncio.run(go())
    assert info == model.run_info("p") and info.step == 1
    assert [c.path for c in cks] == [c.path for c in model.checkpoints("p")] and cks[0].path.endswith("/ck")
    assert model.list_adapters() == ["p"]
    live = {r.run_id: r.state for r in sess.runs()}
    assert live[info.run_id] == "active" and live.get(q_id, "deleted") != "active"
    sess.detach()
