"""Re-attach without traps (real gateway + mock backend in-process): a restarted kernel re-attaches to the
session it left, and after the lease lapsed one call restores the runs from their automatic checkpoints."""

from __future__ import annotations

import json
import time

import pytest
from inprocess_server import InProcessServer

from twinkle_client import _state
from twinkle_client.model import MockModel
from twinkle_client.session import Session, default_lease_seconds, open_session

URL = "http://twinkle.test"
BATCH = [{"input_ids": list(range(5, 25))}]
DEAD_PID = 2**22 + 12345  # above pid_max on Linux by default: never a live process
GRACE_S = 60.0


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # A long seq grace: a client whose seq_ids jumped ahead of what the server expects (a restored run's first
    # step used to) would wait it out; the timing asserts below catch that.
    srv = InProcessServer(tmp_path_factory.mktemp("srv"), seq_grace_s=GRACE_S)
    yield srv
    srv.close()


def _train(model: MockModel, n: int) -> None:
    for _ in range(n):
        model.forward_backward(inputs=BATCH)
        model.clip_grad_and_step()


def _kernel_dies(sess: Session) -> None:
    """What a kernel restart leaves behind: the state file names the session, its process is gone."""
    sess.detach()
    path = _state.twinkle_home() / "connection.json"
    data = json.loads(path.read_text())
    data["pid"] = DEAD_PID
    path.write_text(json.dumps(data))


def test_restarted_kernel_reattaches_to_its_session(server, capsys):
    sess = open_session(URL, "key-alice", transport=server.transport, heartbeat=False)
    assert sess.notice.startswith("new session")
    model = MockModel(session=sess)
    model.add_adapter_to_model("named-run", {"rank": 4})
    model.set_optimizer("AdamW", lr=1e-2)
    _train(model, 3)
    _kernel_dies(sess)

    again = open_session(URL, "key-alice", transport=server.transport, heartbeat=False)
    assert again.session_id == sess.session_id
    assert "re-attached to the previous kernel's session" in again.notice and "named-run at step 3" in again.notice
    m2 = MockModel(session=again)
    assert m2.add_adapter_to_model("named-run", {"rank": 4}).step == 3  # not a new adapter at step 0
    _train(m2, 1)
    assert again.get_run(m2.run_id).step == 4
    # a live owner (this very process re-running its cell) keeps the same object; --new opts out
    assert open_session(URL, "key-alice", transport=server.transport, heartbeat=False) is again
    fresh = open_session(URL, "key-alice", transport=server.transport, heartbeat=False, new=True)
    assert fresh.session_id != again.session_id
    # another key (another user) never re-attaches someone's session
    _kernel_dies(fresh)
    other = open_session(URL, "key-bob", transport=server.transport, heartbeat=False)
    assert other.session_id != fresh.session_id
    for s in (again, other):
        s.detach()


def test_resume_after_lease_expiry_restores_from_automatic_checkpoint(server, capsys):
    sess = open_session(URL, "key-alice", transport=server.transport, heartbeat=False, new=True, lease_seconds=1.0)
    model = MockModel(session=sess)
    model.add_adapter_to_model("long-run", {"rank": 4})
    model.set_optimizer("AdamW", lr=1e-2)
    _train(model, 2)
    _kernel_dies(sess)
    server.transport._portal.call(server.service.reap, time.time() + 30)  # the lease lapses

    back = Session.resume(transport=server.transport, heartbeat=False)
    out = capsys.readouterr().out
    assert back.session_id != sess.session_id
    assert f"session {sess.session_id} had expired; restored long-run at step 2 from the automatic checkpoint" in out
    assert [r.name for r in back.restored] == ["long-run"]
    m2 = MockModel(session=back)
    assert m2.add_adapter_to_model("long-run", {"rank": 4}).step == 2
    t0 = time.monotonic()
    _train(m2, 1)
    assert time.monotonic() - t0 < GRACE_S / 6  # applied at once, not after the seq grace
    assert back.run_state.get(m2.run_id, "next_seq_id") == 3  # the restored run's sequence restarted at 1
    assert back.get_run(m2.run_id).step == 3
    assert back.get_run(m2.run_id).metadata["resumed_from"].split("/")[-1].startswith("auto-")
    back.detach()


def test_notebook_default_lease(monkeypatch):
    assert default_lease_seconds() is None  # a script: the server's default
    monkeypatch.setattr("twinkle_client._frames.in_notebook", lambda: True)
    assert default_lease_seconds() == 600.0
    monkeypatch.setenv("TWINKLE_LEASE_SECONDS", "120")
    assert default_lease_seconds() == 120.0


def test_whole_run_history_across_a_resume_and_compare(server, capsys):
    from twinkle_client.history import compare, run_history
    from twinkle_client.widgets import LiveCurve

    sess = open_session(URL, "key-alice", transport=server.transport, heartbeat=False, new=True, lease_seconds=1.0)
    model = MockModel(session=sess)
    model.add_adapter_to_model("hist", {"rank": 4})
    model.set_optimizer("AdamW", lr=1e-2)
    mine = []
    for _ in range(3):
        model.forward_backward(inputs=BATCH)
        model.clip_grad_and_step()
        mine.append(model.calculate_metric()["loss"])
    _kernel_dies(sess)
    server.transport._portal.call(server.service.reap, time.time() + 30)
    back = Session.resume(transport=server.transport, heartbeat=False, quiet=True)
    m2 = MockModel(session=back)
    m2.add_adapter_to_model("hist", {"rank": 4})
    for _ in range(2):
        m2.forward_backward(inputs=BATCH)
        m2.clip_grad_and_step()
        mine.append(m2.calculate_metric()["loss"])

    hist = run_history(m2, session=back)  # the new run's history reaches back through the one it resumed
    assert [int(p["step"]) for p in hist] == [1, 2, 3, 4, 5]
    assert [p["loss"] for p in hist] == pytest.approx(mine, rel=1e-9)
    assert all("grad_norm:mean" in p or "grad_norm" in p for p in hist)

    curve = LiveCurve(mode="text", display=False, session=back, history_of=m2)  # a restarted kernel's curve
    assert [int(p["step"]) for p in curve.history["default"]] == [1, 2, 3, 4, 5]

    other = MockModel(session=back)
    other.add_adapter_to_model("other", {"rank": 4})
    for _ in range(2):
        other.forward_backward(inputs=BATCH)
        other.clip_grad_and_step()
    chart = compare(m2, other, metrics=("loss", "grad_norm:mean"), smoothing=0.5, session=back)
    assert list(chart.history) == ["hist", "other"] and len(chart.history["other"]) == 2
    bundle = chart._repr_mimebundle_()
    assert set(bundle) == {"image/png", "text/plain"} and "hist: 5 steps" in bundle["text/plain"]
    assert chart.svg().count("data-run='hist'") == 2  # one line per metric panel
    df = chart.frame()
    assert set(df["run"]) == {"hist", "other"} and len(df) == 7
    back.detach()
