"""twinkle_client against the REAL gateway + scheduler + mock backend, in-process (seconds, no Ray)."""

from __future__ import annotations

import httpx
import pytest
from inprocess_server import InProcessServer

import twinkle_client
from twinkle.types import LimitExceededError, NotFoundError
from twinkle_client.model import MockModel
from twinkle_client.sampler import Sampler

URL = "http://twinkle.test"
BATCH = [{"input_ids": list(range(5, 25)), "labels": [-100] * 5 + list(range(10, 25))},
         {"input_ids": list(range(30, 42))}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = InProcessServer(tmp_path_factory.mktemp("srv"))
    yield srv
    srv.close()


BIG = [{"input_ids": [(7 * i + j) % 200 + 3 for j in range(48)]} for i in range(6)]


def _connect(server, key="key-alice", **kw):
    kw.setdefault("heartbeat", False)
    return twinkle_client.connect(URL, key, transport=server.transport, **kw)


def _train(model, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        model.forward_backward(inputs=BATCH)
        model.clip_grad_and_step()
        losses.append(model.calculate_metric()["loss"])
    return losses


def _script(Model, steps=6, **kw):
    """The user's training script: identical for twinkle.model and twinkle_client.model."""
    model = Model(seed=0, **kw)  # the server hosts its base model with seed 0 (ModelConfig.seed)
    model.add_adapter_to_model("default", {"rank": 4})
    model.set_optimizer("AdamW", lr=2e-2)
    model.set_lr_scheduler("cosine", num_warmup_steps=2, num_training_steps=steps)
    return _train(model, steps)


def test_import_swap_parity_with_local_mock(server, tmp_path):
    from twinkle.model import MockModel as LocalMock

    local = _script(LocalMock, output_dir=str(tmp_path))
    sess = _connect(server)
    remote = _script(MockModel)
    sess.close()
    assert remote == pytest.approx(local, abs=1e-5)
    assert remote[-1] < remote[0]


def test_retried_forward_backward_does_not_change_next_step(server):
    sess = _connect(server)
    control = MockModel(seed=3)
    control.add_adapter_to_model("control", {"rank": 4})
    control.set_optimizer("AdamW", lr=2e-2)

    dropped = []

    def drop_first_fb_reply(request, send):
        resp = send(request)
        if request.url.path.endswith("/forward_backward") and not dropped:
            dropped.append(request)
            raise httpx.ReadError("reply lost", request=request)
        return resp

    flaky_sess = twinkle_client.connect(URL, "key-alice", transport=server.wrap(drop_first_fb_reply), heartbeat=False,
                                        make_current=False)
    flaky = MockModel(seed=3, session=flaky_sess)
    flaky.add_adapter_to_model("flaky", {"rank": 4})
    flaky.set_optimizer("AdamW", lr=2e-2)
    for m in (control, flaky):
        m.forward_backward(inputs=BATCH)  # the flaky one is sent twice with the same seq_id
        m.clip_grad_and_step()
        m.calculate_metric()
        m.forward_backward(inputs=BATCH)
    assert dropped
    assert flaky.calculate_metric()["loss"] == pytest.approx(control.calculate_metric()["loss"], abs=1e-6)
    flaky_sess.close()
    sess.close()


def test_two_clients_learn_and_are_batched_together(server):
    a_sess, b_sess = _connect(server, "key-alice", make_current=False), _connect(server, "key-bob", make_current=False)
    a, b = MockModel(seed=1, session=a_sess), MockModel(seed=2, session=b_sess)
    for m in (a, b):
        m.add_adapter_to_model("mine", {"rank": 4})
        m.set_optimizer("AdamW", lr=2e-2)
    first, mixed = {}, []
    for step in range(4):
        # several requests in flight per tenant (as a pipelined client has): while one batch runs, the
        # others queue, and the scheduler's next tick takes both tenants' ready work as ONE batch
        futs = [f for _ in range(4) for f in (a.forward_backward_async(inputs=BIG), b.forward_backward_async(inputs=BIG))]
        [f.result() for f in futs]
        last = a_sess.server_status().workers[0].last_batch or {}  # what GET status reports
        assert last.get("rows", 0) >= 1
        mixed += [bt for bt in server.worker_status()["recent_batches"] if bt.get("mixed") and bt not in mixed]
        a.clip_grad_and_step(), b.clip_grad_and_step()
        for name, m in (("a", a), ("b", b)):
            first.setdefault(name, m.calculate_metric()["loss"]) if step == 0 else m.calculate_metric()
    a_last = a.forward(inputs=BATCH) and a.calculate_metric(is_training=False)["loss"]
    b_last = b.forward(inputs=BATCH) and b.calculate_metric(is_training=False)["loss"]
    assert a_last < first["a"] and b_last < first["b"]
    assert mixed, f"no batch ever mixed the two tenants: {server.worker_status()}"
    assert {a.run_id, b.run_id} <= set(mixed[-1]["adapters"])
    a_sess.close(), b_sess.close()


def test_reattach_continues_with_same_next_step_loss(server):
    control_sess = _connect(server, make_current=False)
    control = MockModel(seed=5, session=control_sess)
    control.add_adapter_to_model("default", {"rank": 4})
    control.set_optimizer("AdamW", lr=2e-2)
    _train(control, 3)
    control.forward_backward(inputs=BATCH)
    expected = control.calculate_metric()["loss"]

    s1 = _connect(server)
    m1 = MockModel(seed=5)
    m1.add_adapter_to_model("default", {"rank": 4})
    m1.set_optimizer("AdamW", lr=2e-2)
    _train(m1, 3)
    s1.detach()  # the kernel dies without closing

    s2 = twinkle_client.Session.resume(transport=server.transport, heartbeat=False)
    assert s2.session_id == s1.session_id
    m2 = MockModel(seed=5)  # the notebook's cells, re-run
    m2.add_adapter_to_model("default", {"rank": 4})
    m2.set_optimizer("AdamW", lr=2e-2)
    assert m2.run_id == m1.run_id
    m2.forward_backward(inputs=BATCH)
    assert m2.calculate_metric()["loss"] == pytest.approx(expected, abs=1e-6)
    s2.close(), control_sess.close()


def test_real_server_errors_and_isolation(server):
    alice = _connect(server, "key-alice", make_current=False)
    bob = _connect(server, "key-bob", make_current=False)
    m = MockModel(session=alice)
    m.add_adapter_to_model("default", {"rank": 4})
    with pytest.raises(LimitExceededError) as ei:
        MockModel(session=alice).add_adapter_to_model("big", {"rank": 64})
    assert "rank" in str(ei.value)
    with pytest.raises(NotFoundError):
        bob.get_run(m.run_id)
    with pytest.raises(NotFoundError):
        MockModel(model_id="hf://nope/nope", session=alice)
    path = m.save("ck")
    assert [c.path for c in alice.checkpoints(m.run_id)] == [path]
    with pytest.raises(NotFoundError):
        bob.checkpoints(m.run_id)
    resp = Sampler(m).sample([5, 6, 7], {"max_tokens": 4, "temperature": 0.0})
    assert len(resp.sequences[0].tokens) <= 4
    assert Sampler(m).compute_logprobs([5, 6, 7])[0] is None
    alice.close(), bob.close()


def test_stream_through_the_gateway_fills_the_sample_viewer(server):
    """``Sampler.stream`` over the real gateway's server-sent events, shown by ``SampleViewer.add_stream``: the
    streamed tokens are the final response's tokens, and the same as a plain ``sample`` with the same seed."""
    from twinkle_client.widgets import SampleViewer

    sess = _connect(server)
    model = MockModel(session=sess)
    model.add_adapter_to_model("s", {"rank": 4})
    sampler = Sampler(model, adapter_name="s")
    params = {"max_tokens": 6, "seed": 3, "temperature": 1.0}
    events = list(sampler.stream([5, 6, 7], params, num_samples=2))
    tokens = [e for e in events if "done" not in e]
    final = events[-1]["done"]
    assert len(tokens) == 12 and {e["index"] for e in tokens} == {0, 1}
    for i, seq in enumerate(final.sequences):
        assert [e["token"] for e in tokens if e["index"] == i] == seq.tokens
    assert [s.tokens for s in sampler.sample([5, 6, 7], params, num_samples=2).sequences] == \
        [s.tokens for s in final.sequences]
    viewer = SampleViewer(mode="widget", display=False)
    shown = viewer.add_stream([5, 6, 7], sampler.stream([5, 6, 7], params, num_samples=2))
    assert [s["tokens"] for s in viewer.samples] == [s.tokens for s in shown.sequences] == \
        [s.tokens for s in final.sequences]
    sess.detach()
