from __future__ import annotations

import pytest
from inprocess_server import KEY, FaultyTransport, InProcessServer


@pytest.fixture(autouse=True)
def _twinkle_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TWINKLE_HOME", str(tmp_path / "twinkle-home"))
    monkeypatch.delenv("TWINKLE_SERVER_URL", raising=False)
    monkeypatch.delenv("TWINKLE_API_KEY", raising=False)
    yield
    import twinkle_client.session as s

    cur = s.current_session(required=False)
    if cur is not None:
        cur.detach()


@pytest.fixture
def net(tmp_path):
    """The real gateway on a mock worker, in-process, behind a fault-injecting transport (fresh per test)."""
    srv = InProcessServer(tmp_path / "server")
    yield FaultyTransport(srv)
    srv.close()


@pytest.fixture
def session(net):
    import twinkle_client

    sess = twinkle_client.connect("http://fake", KEY, transport=net, heartbeat=False, retry_seconds=2.0)
    yield sess
    sess.detach()
