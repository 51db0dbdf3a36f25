"""``Sampler.sample_async`` POSTs on background threads: a list of them is on the wire together (one decode batch
on the server instead of one round trip after another), while the session's next training call is sent only once
they were accepted, so the server still sees the program's order. Overlap and order are read from the transport
(requests in flight, start/end of each POST), never from wall-clock speed."""

from __future__ import annotations

import threading
import time

import pytest
from inprocess_server import InProcessServer

import twinkle_client
from twinkle.types import NotFoundError
from twinkle_client.model import MockModel
from twinkle_client.sampler import Sampler

URL = "http://twinkle.test"
RTT_S = 0.03  # a server 30 ms away


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = InProcessServer(tmp_path_factory.mktemp("srv"))
    yield srv
    srv.close()


class _Wire:
    """Each POST's (path, start, end) and the most sample POSTs in flight at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.events: list[tuple[str, float, float]] = []
        self.samples_now = 0
        self.samples_peak = 0

    def transport(self, server: InProcessServer):
        def handler(request, send):
            path = request.url.path.rsplit("/api/v1/twinkle/", 1)[-1]
            sample = request.method == "POST" and path == "sample"
            with self.lock:
                if sample:
                    self.samples_now += 1
                    self.samples_peak = max(self.samples_peak, self.samples_now)
            t0 = time.monotonic()
            try:
                time.sleep(RTT_S)
                return send(request)
            finally:
                with self.lock:
                    if sample:
                        self.samples_now -= 1
                    if request.method == "POST":
                        self.events.append((path, t0, time.monotonic()))

        return server.wrap(handler)


def test_samples_are_posted_together_and_a_later_step_waits_for_them(server):
    wire = _Wire()
    sess = twinkle_client.connect(URL, "key-alice", transport=wire.transport(server), heartbeat=False)
    model = MockModel(session=sess)
    model.add_adapter_to_model("a", {"rank": 4})
    model.set_optimizer("AdamW", lr=1e-2)
    model.forward_backward(inputs=[{"input_ids": [5, 6, 7, 8, 9, 10]}])
    sampler = Sampler(model)
    wire.events.clear()

    futures = [sampler.sample_async([5 + i, 6, 7], {"max_tokens": 3, "seed": i}) for i in range(8)]
    model.clip_grad_and_step()  # sent only after the eight samples were accepted
    results = [f.result() for f in futures]

    assert all(len(r.sequences[0].tokens) == 3 for r in results)
    assert wire.samples_peak >= 2, "sample_async POSTs went one after another"
    samples = [e for e in wire.events if e[0] == "sample"]
    steps = [e for e in wire.events if e[0] != "sample" and "optim" in e[0]]
    assert len(samples) == 8 and steps, wire.events
    assert min(s[1] for s in steps) >= max(s[2] for s in samples), "the optim_step overtook a sample on the wire"
    assert all(f.done() and f.future_id for f in futures)
    assert sess.get_run(model._adapter("a").run_id).step == 1
    sess.detach()


def test_a_refused_sample_raises_from_result_and_the_session_goes_on(server):
    sess = twinkle_client.connect(URL, "key-alice", transport=server.transport, heartbeat=False)
    model = MockModel(session=sess)
    model.add_adapter_to_model("b", {"rank": 4})
    bad = Sampler(checkpoint="tinker://no-such-run/sampler_weights/x", base_model=model.model_id, session=sess)
    fut = bad.sample_async([5, 6, 7], {"max_tokens": 2})
    with pytest.raises(NotFoundError):
        fut.result()
    assert fut.done()
    good = Sampler(model).sample_async([5, 6, 7], {"max_tokens": 2}).result()
    assert len(good.sequences[0].tokens) == 2
    sess.detach()
