from __future__ import annotations

import pytest
from fake_native_server import KEY, FakeServer


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
def fake():
    return FakeServer()


@pytest.fixture
def session(fake):
    import twinkle_client

    sess = twinkle_client.connect("http://fake", KEY, transport=fake.transport(), heartbeat=False, retry_seconds=2.0)
    yield sess
    sess.detach()
