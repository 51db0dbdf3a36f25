"""Session lifecycle against the real gateway on a mock worker, in-process behind a fault-injecting transport
(``conftest.net``: no sockets)."""

from __future__ import annotations

import json
import os
import stat
import time

import pytest
from inprocess_server import KEY

import twinkle_client
from twinkle.types import AuthenticationError, GoneError
from twinkle_client import _state
from twinkle_client._errors import ConnectionLostError


def test_connect_creates_session_and_state_file(net):
    sess = twinkle_client.connect("http://fake", KEY, transport=net, heartbeat=False)
    held = net.server.get(f"sessions/{sess.session_id}")
    assert held["state"] == "active" and held["metadata"]["client"] == "twinkle_client"
    conn = _state.twinkle_home() / "connection.json"
    data = json.loads(conn.read_text())
    assert data == {**data, "url": "http://fake", "api_key": KEY, "session_id": sess.session_id, "pid": os.getpid()}
    assert stat.S_IMODE(conn.stat().st_mode) == 0o600
    assert (_state.twinkle_home() / "connections" / f"{os.getpid()}.json").exists()
    assert twinkle_client.current_session() is sess
    sess.close()
    assert net.server.get(f"sessions/{sess.session_id}")["state"] == "closed"
    assert not conn.exists()
    with pytest.raises(ConnectionLostError, match="not connected"):
        twinkle_client.current_session()


def test_context_manager_closes(net):
    with twinkle_client.connect("http://fake", KEY, transport=net, heartbeat=False) as sess:
        sid = sess.session_id
        assert net.server.get(f"sessions/{sid}")["state"] == "active"
    assert net.server.get(f"sessions/{sid}")["state"] == "closed"
    assert sess.closed


def test_background_heartbeat_extends_lease(net):
    sess = twinkle_client.connect("http://fake", KEY, transport=net, lease_seconds=0.6)
    try:
        assert sess.heartbeat_interval == pytest.approx(0.2)
        deadline = time.time() + 5
        while net.heartbeats < 3 and time.time() < deadline:
            time.sleep(0.05)
        assert net.heartbeats >= 3
        assert sess.state == "connected"
    finally:
        sess.close()


def test_heartbeat_marks_expired_session(net):
    sess = twinkle_client.connect("http://fake", KEY, transport=net, lease_seconds=0.3)
    net.server.expire_sessions()  # its lease lapses on the server (the reaper runs an hour ahead)
    deadline = time.time() + 5
    while sess.state != "expired" and time.time() < deadline:
        time.sleep(0.05)
    assert sess.state == "expired"
    assert "expired" in (sess.last_error or "")
    sess.close()


def test_network_blip_reconnects(net):
    sess = twinkle_client.connect("http://fake", KEY, transport=net, lease_seconds=0.6,
                                  retry_seconds=5.0)
    try:
        net.down = True
        deadline = time.time() + 5
        while sess.state != "reconnecting" and time.time() < deadline:
            time.sleep(0.02)
        assert sess.state == "reconnecting"
        # a call made during the blip waits for the server instead of failing
        t0 = time.time()
        import threading

        threading.Timer(0.4, lambda: setattr(net, "down", False)).start()
        caps = sess.capabilities(refresh=True)
        assert caps.base_models[0].name == "mock://tiny"
        assert time.time() - t0 >= 0.3
        deadline = time.time() + 5
        while sess.state != "connected" and time.time() < deadline:
            time.sleep(0.02)
        assert sess.state == "connected"
    finally:
        net.down = False
        sess.close()


def test_no_server_answers_fast_with_clear_error(net):
    net.down = True
    t0 = time.time()
    with pytest.raises(ConnectionLostError, match="no answer from the Twinkle server at http://fake"):
        twinkle_client.connect("http://fake", KEY, transport=net, retry_seconds=0.5)
    assert time.time() - t0 < 3


def test_bad_key_is_authentication_error(net):
    with pytest.raises(AuthenticationError, match="API key") as ei:
        twinkle_client.connect("http://fake", "wrong", transport=net)
    assert ei.value.status == 401


def test_reattach_by_session_id_and_resume(net):
    first = twinkle_client.connect("http://fake", KEY, transport=net, heartbeat=False)
    sid = first.session_id
    first.detach()  # the process "dies" without closing
    again = twinkle_client.connect("http://fake", KEY, session_id=sid, transport=net, heartbeat=False)
    assert again.session_id == sid and len(net.server.get("sessions")["sessions"]) == 1
    again.detach()
    resumed = twinkle_client.Session.resume(transport=net, heartbeat=False)
    assert resumed.session_id == sid and resumed.api_key == KEY
    resumed.close()
    with pytest.raises(GoneError, match="closed"):
        twinkle_client.connect("http://fake", KEY, session_id=sid, transport=net, heartbeat=False)


def test_resume_without_state_file_says_so():
    with pytest.raises(ConnectionLostError, match="no saved Twinkle session"):
        twinkle_client.Session.resume()


def test_init_twinkle_client_reads_env(net, monkeypatch):
    monkeypatch.setenv("TWINKLE_SERVER_URL", "http://fake")
    monkeypatch.setenv("TWINKLE_API_KEY", KEY)
    sess = twinkle_client.init_twinkle_client(transport=net, heartbeat=False)
    assert sess.url == "http://fake" and sess.api_key == KEY
    assert twinkle_client.current_session() is sess
    sess.detach()
    monkeypatch.delenv("TWINKLE_SERVER_URL")
    with pytest.raises(ConnectionLostError, match="TWINKLE_SERVER_URL"):
        twinkle_client.init_twinkle_client()


def test_repr_html_shows_server_models_runs_capacity_lease(session, net):
    from twinkle_client.model import TransformersModel

    m = TransformersModel(session=session)
    m.add_adapter_to_model("mine", {"rank": 8})
    page = session._repr_html_()
    assert "http://fake" in page and session.session_id in page
    assert "mock://tiny" in page and "rank ≤ 16" in page
    assert m.run_id in page and "mine" in page
    assert "adapters 1/8" in page
    assert "lease" in page and "connected" in page
