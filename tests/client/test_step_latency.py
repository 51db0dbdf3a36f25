"""A step's latency split (queue wait / execution on the worker) travels from the scheduler through the gateway's
future state to ``RemoteFuture.timing``, ``Session.latency`` and the ``LiveCurve`` (real in-process gateway)."""

from __future__ import annotations

from inprocess_server import InProcessServer

import twinkle_client
from twinkle_client.model import MockModel
from twinkle_client.sampler import Sampler
from twinkle_client.widgets import LiveCurve

URL = "http://twinkle.test"
BATCH = [{"input_ids": list(range(5, 25))}]


def test_step_latency_split_reaches_the_curve(tmp_path):
    srv = InProcessServer(tmp_path)
    try:
        sess = twinkle_client.connect(URL, "key-alice", transport=srv.transport, heartbeat=False)
        model = MockModel(seed=0)
        model.add_adapter_to_model("default", {"rank": 4})
        model.set_optimizer("AdamW", lr=1e-2)
        curve = LiveCurve(mode="text", display=False, session=sess)
        for step in curve.range(3):
            out = model.forward_backward(inputs=BATCH)
            model.clip_grad_and_step()
            curve.log({"loss": out.metrics.get("loss:mean", 0.0)}, step=step)
        fb = [t for t in sess.latency if t["kind"] == "forward_backward"]
        assert len(fb) == 3
        for t in fb:  # the worker measured both parts; the gateway's total covers them; the client's covers that
            assert t["queue_s"] is not None and t["exec_s"] is not None and t["exec_s"] > 0
            assert t["queue_s"] + t["exec_s"] <= t["server_s"] + 1e-3
            assert t["server_s"] <= t["round_trip_s"] + 1e-3
        assert [int(r["step"]) for r in curve.latency] == [0, 1, 2]
        last = curve.latency[-1]
        assert last["requests"] == 2  # forward_backward + optim_step of that step
        assert abs(last["queue_s"] + last["exec_s"] + last["other_s"] - last["total_s"]) < 1e-6
        assert curve.latency_text().startswith("step latency ") and "execution" in curve.latency_text()
        assert "step latency" in curve._footer()
        # the widget's status line: the split as text and a stacked bar (queue / execution / other)
        live = LiveCurve(mode="widget", display=False, session=sess, throttle_s=0.0)
        model.forward_backward(inputs=BATCH)
        model.clip_grad_and_step()
        live.log({"loss": 1.0}, step=3)
        assert "twk-latency" in live.status.value and "twk-lat-execution" in live.status.value
        assert "step latency" in live.status.value
        assert live.latency[-1]["requests"] == 2  # a new curve counts only the requests made since it began
        # the wire: a finished future's state carries the split (native API), a fresh sample too
        fid = model.forward_backward_async(inputs=BATCH).future_id
        body = sess.http.get(f"futures/{fid}", params={"timeout": 10})
        assert body["status"] == "complete" and body["timing"]["exec_s"] >= 0 and body["timing"]["server_s"] >= 0
        sess.close()
    finally:
        srv.close()


def test_sampling_only_loop_sees_stop_and_its_timing(tmp_path):
    """Issue 17: the panel's Stop rides on sampling replies too, so a loop that only samples ends at the next
    step boundary; a sample's reply also carries its queue/execution split."""
    srv = InProcessServer(tmp_path)
    try:
        sess = twinkle_client.connect(URL, "key-alice", transport=srv.transport, heartbeat=False)
        bob = twinkle_client.connect(URL, "key-bob", transport=srv.transport, heartbeat=False)
        sampler = Sampler(base_model=sess.capabilities().base_models[0].name, session=sess)
        curve = LiveCurve(mode="text", display=False, session=sess)
        done = []
        for i in curve.range(10):
            sampler.sample([1, 2, 3], {"max_tokens": 4})
            if i == 2:
                sess.request_stop()  # what the panel's Stop does (through the Jupyter server, kernel busy)
            done.append(i)
            curve.log({"reward": 0.0}, step=i)
        assert done == [0, 1, 2, 3]  # the sample after the click carried stop_requested; the loop ended there
        assert "Stop requested" in (curve.stop_message or "")
        sampled = [t for t in sess.latency if t["kind"] == "sample"]
        assert sampled and all(t["exec_s"] is not None and t["queue_s"] is not None for t in sampled)
        # naming another user's session is a 404 naming the field, not a way to read their stop flag
        body = {"base_model": sampler.base_model, "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1]}]},
                "session_id": sess.session_id}
        resp = bob.http._client.post("/api/v1/twinkle/sample", json=body)
        assert resp.status_code == 404 and "session_id" in resp.text
        sess.close()
        bob.close()
    finally:
        srv.close()
