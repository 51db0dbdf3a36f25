"""A Stop that stops (server-side flag read from training replies) and one loss everywhere — against the real
gateway + mock backend in-process (no Ray, seconds)."""

from __future__ import annotations

import httpx
import pytest
from inprocess_server import InProcessServer

import twinkle_client
from twinkle_client._stop import TrainingStopped
from twinkle_client.model import MockModel
from twinkle_client.widgets import LiveCurve, runs_frame

URL = "http://twinkle.test"
BATCH = [{"input_ids": list(range(5, 25)), "labels": [-100] * 5 + list(range(10, 25))},
         {"input_ids": list(range(30, 42))}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = InProcessServer(tmp_path_factory.mktemp("srv"))
    yield srv
    srv.close()


def _model(server):
    sess = twinkle_client.connect(URL, "key-alice", transport=server.transport, heartbeat=False)
    model = MockModel(session=sess)
    model.add_adapter_to_model("stopper", {"rank": 4})
    model.set_optimizer("AdamW", lr=1e-2)
    return sess, model


def _press_stop(server, path: str) -> None:
    """What the panel / the widget's Stop does: a POST from another client (the Jupyter server), not the kernel."""
    with httpx.Client(transport=server.transport, base_url=URL, headers={"X-API-Key": "key-alice"}) as c:
        r = c.post(f"/api/v1/twinkle/{path}")
        assert r.status_code == 200, r.text
        assert r.json()["stop_requested_at"] is not None


def test_stop_from_outside_ends_live_curve_loop_at_step_boundary(server, capsys):
    sess, model = _model(server)
    curve = LiveCurve(mode="text", display=False, session=sess)
    pressed_at = None
    for i in curve.range(300):
        model.forward_backward(inputs=BATCH)
        if i == 5:  # the click lands while step 6 is in flight (between forward_backward and optim_step)
            _press_stop(server, f"sessions/{sess.session_id}/stop")
            pressed_at = i + 1
        model.clip_grad_and_step()
        curve.log(model.calculate_metric())
    run = sess.get_run(model.run_id)
    assert pressed_at is not None and run.step - pressed_at <= 2
    assert run.step == pressed_at  # the step in flight completed; none started after
    out = capsys.readouterr().out
    assert f"stopped after step {run.step}" in out and "Traceback" not in out
    # the flag was cleared: the next loop runs to its end
    assert sess.refresh().stop_requested_at is None and not sess.stop_requested.is_set()
    for _ in LiveCurve(mode="text", display=False, session=sess).range(2):
        model.forward_backward(inputs=BATCH)
        model.clip_grad_and_step()
    assert sess.get_run(model.run_id).step == run.step + 2
    sess.detach()


def test_stop_of_a_run_ends_a_plain_loop_with_one_line(server):
    sess, model = _model(server)
    steps = 0
    with pytest.raises(TrainingStopped) as info:
        for i in range(300):
            model.forward_backward(inputs=BATCH)
            model.clip_grad_and_step()
            steps += 1
            if i == 3:
                _press_stop(server, f"runs/{model.run_id}/stop")
    # pressed between steps 4 and 5: step 5's reply carries the flag, step 5 completes, step 6 is never sent
    assert steps == 5
    assert sess.get_run(model.run_id).step == 5
    assert info.value._render_traceback_() == [str(info.value)] and "step 5" in str(info.value)
    assert sess.refresh().stop_requested_at is None
    sess.detach()


def test_stop_requested_before_the_loop_is_ignored(server):
    sess, model = _model(server)
    _press_stop(server, f"sessions/{sess.session_id}/stop")
    n = sum(1 for _ in LiveCurve(mode="text", display=False, session=sess).range(3)
            if model.forward_backward(inputs=BATCH) and model.clip_grad_and_step())
    assert n == 3
    sess.detach()


def test_one_loss_everywhere(server):
    sess, model = _model(server)
    for _ in range(3):
        model.forward_backward(inputs=BATCH)
        model.clip_grad_and_step()
        mine = model.calculate_metric()["loss"]
        run = sess.get_run(model.run_id)
        assert run.last_metrics["loss"] == pytest.approx(mine, rel=1e-9)  # the panel's number
        hist = sess.metrics(model.run_id).points
        fb = [p for p in hist if p.kind == "forward_backward"][-1]
        assert fb.metrics["loss"] == pytest.approx(mine, rel=1e-9)
        assert fb.metrics["loss:sum"] > 5 * mine  # the batch total is still there, under its own name
    frame = runs_frame([run])
    row = frame.iloc[0] if hasattr(frame, "iloc") else frame[0]
    assert row["loss"] == pytest.approx(mine, rel=1e-9)
    sess.detach()
