"""The %twinkle magic driven through a real IPython InteractiveShell."""

from __future__ import annotations

import pytest
from inprocess_server import KEY
from IPython.core.error import UsageError
from IPython.testing.globalipapp import start_ipython

import twinkle_client
from twinkle_client import session as session_mod


@pytest.fixture(scope="module")
def ip():
    shell = start_ipython()
    shell.run_line_magic("load_ext", "twinkle_client")
    return shell


@pytest.fixture
def routed(net, monkeypatch):
    """Make every connect() of the magic reach the in-process server (through ``net``)."""
    real = session_mod.connect

    def connect(url, api_key=None, session_id=None, **kw):
        kw.setdefault("transport", net)
        kw["heartbeat"] = False
        return real(url, api_key, session_id, **kw)

    monkeypatch.setattr(session_mod, "connect", connect)
    return net


def test_help_lists_commands(ip, capsys):
    ip.run_line_magic("twinkle", "--help")
    out = capsys.readouterr().out
    for cmd in ("connect", "status", "runs", "checkpoints", "disconnect", "resume"):
        assert cmd in out


def test_connect_status_runs_checkpoints_disconnect(ip, routed, capsys, monkeypatch):
    monkeypatch.setenv("MY_KEY", KEY)
    ip.run_line_magic("twinkle", "connect http://fake --api-key $MY_KEY")
    out = capsys.readouterr().out
    sess = twinkle_client.current_session()
    assert f"session {sess.session_id}" in out and ip.user_ns["twinkle_session"] is sess

    from twinkle_client.model import TransformersModel

    m = TransformersModel()
    m.add_adapter_to_model("mine", {"rank": 4})
    m.forward_backward(inputs=[{"input_ids": [1, 2, 3]}])
    m.clip_grad_and_step()
    m.save("ck1")

    ip.run_line_magic("twinkle", "status")
    out = capsys.readouterr().out
    assert "mock://tiny (mock) adapters 1/8" in out and m.run_id in out and "step 1" in out

    ip.run_line_magic("twinkle", "runs")
    out = capsys.readouterr().out
    assert m.run_id in out and "mine" in out

    ip.run_line_magic("twinkle", f"checkpoints {m.run_id}")
    out = capsys.readouterr().out
    assert "ck1" in out and f"tinker://{m.run_id}/weights/ck1" in out

    ip.run_line_magic("twinkle", "disconnect")
    assert "closed session" in capsys.readouterr().out
    assert routed.server.get(f"sessions/{sess.session_id}")["state"] == "closed"
    assert "twinkle_session" not in ip.user_ns


def test_keep_and_resume(ip, routed, capsys):
    ip.run_line_magic("twinkle", f"connect http://fake --api-key {KEY}")
    sid = twinkle_client.current_session().session_id
    ip.run_line_magic("twinkle", "disconnect --keep")
    assert routed.server.get(f"sessions/{sid}")["state"] == "active"
    ip.run_line_magic("twinkle", "resume")
    assert twinkle_client.current_session().session_id == sid
    assert "re-attached" in capsys.readouterr().out
    twinkle_client.current_session().close()


def test_errors_are_one_clear_line(ip, routed, monkeypatch):
    monkeypatch.setattr("twinkle_client.session.CONNECT_RETRY_SECONDS", 0.2)  # "no answer" sooner than 2 s
    with pytest.raises(UsageError, match="AuthenticationError: unknown or revoked API key"):
        ip.run_line_magic("twinkle", "connect http://fake --api-key wrong")
    with pytest.raises(UsageError, match="ConnectionLostError: not connected"):
        ip.run_line_magic("twinkle", "status")
    with pytest.raises(UsageError, match="invalid choice: 'frobnicate'"):
        ip.run_line_magic("twinkle", "frobnicate")
    routed.down = True
    with pytest.raises(UsageError, match="no answer from the Twinkle server at http://fake"):
        ip.run_line_magic("twinkle", f"connect http://fake --api-key {KEY}")


def test_no_server_at_a_real_closed_port(ip, monkeypatch):
    import socket

    monkeypatch.setattr("twinkle_client.session.CONNECT_RETRY_SECONDS", 0.2)  # "no answer" sooner than 2 s

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(UsageError, match=f"no answer from the Twinkle server at http://127.0.0.1:{port}"):
        ip.run_line_magic("twinkle", f"connect 127.0.0.1:{port} --api-key x")
