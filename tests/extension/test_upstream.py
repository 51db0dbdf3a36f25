"""The proxy's brain: which connection is active, how failures are classified, what may be proxied."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time

import httpx
import pytest
from live_twinkle import MODEL, LiveTwinkle

from twinkle_client.jupyter_server import connection_file
from twinkle_client.jupyter_server.upstream import (
    ConnectionStore,
    Upstream,
    UpstreamError,
    allowed,
    normalize_url,
)


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.delenv("TWINKLE_CONNECTIONS_DIR", raising=False)
    monkeypatch.setenv("TWINKLE_HOME", str(tmp_path / "home"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_normalize_url_strips_api_suffix_and_adds_scheme():
    assert normalize_url("http://h:8000/api/v1/") == "http://h:8000"
    assert normalize_url("http://h:8000/api/v1/twinkle") == "http://h:8000"
    assert normalize_url("gpu-box:8000") == "http://gpu-box:8000"
    with pytest.raises(ValueError):
        normalize_url("  ")
    with pytest.raises(ValueError):
        normalize_url("ftp://h")


def test_record_and_read_connection_newest_live_process_wins(tmp_path):
    assert connection_file.latest_connection() is None
    path = connection_file.record_connection("http://a:1", "key-a-123456789", "s-a")
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    time.sleep(0.01)
    connection_file.record_connection("http://b:2", "key-b-123456789", "s-b", pid=os.getppid())
    latest = connection_file.latest_connection()
    assert latest is not None and latest.url == "http://b:2" and latest.session_id == "s-b"
    # a dead process's record is ignored
    dead = 2**22 + 12345
    time.sleep(0.01)
    connection_file.record_connection("http://dead:3", "k", "s-dead", pid=dead)
    assert connection_file.latest_connection().url == "http://b:2"
    connection_file.forget_connection(pid=os.getppid())
    assert connection_file.latest_connection().url == "http://a:1"


def test_reads_the_client_state_format(tmp_path):
    """twinkle_client._state.write_connection writes {url, api_key, session_id, pid, time}."""
    from twinkle_client import _state

    _state.write_connection("http://client:9", "client-key-0000", "sess-c")
    conn = connection_file.latest_connection()
    assert conn is not None
    assert (conn.url, conn.api_key, conn.session_id, conn.pid) == ("http://client:9", "client-key-0000", "sess-c", os.getpid())
    assert conn.key_hint() == "…0000"
    _state.clear_connection("sess-c")
    assert connection_file.latest_connection() is None


def test_store_prefers_the_newest_of_panel_and_kernel():
    store = ConnectionStore()
    assert store.active() is None
    connection_file.record_connection("http://kernel:1/api/v1", "kkkkkkkkkkkk", "s-k")
    conn, source = store.active()
    assert (conn.url, source, conn.session_id) == ("http://kernel:1", "kernel", "s-k")
    time.sleep(0.01)
    store.set_panel("panel:2", "pppppppppppp")
    conn, source = store.active()
    assert (conn.url, source) == ("http://panel:2", "panel")
    described = ConnectionStore.describe(conn, source)
    assert "pppppppppppp" not in json.dumps(described) and described["key_hint"] == "…pppp"
    time.sleep(0.01)
    connection_file.record_connection("http://kernel:3", "kkkkkkkkkkkk", "s-k2")
    assert store.active()[0].url == "http://kernel:3"
    store.clear_panel()
    assert store.active()[1] == "kernel"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with LiveTwinkle(workdir=tmp_path_factory.mktemp("twinkle-server")) as live:
        yield live


def test_overview_and_classified_failures(server):
    up = Upstream(timeout=5.0)
    good = connection_file.Connection(url=server.url, api_key=server.api_key)
    ov = asyncio.run(up.overview(good))
    assert [r["run_id"] for r in ov["runs"]] == [server.run_id]
    assert ov["capabilities"]["base_models"][0]["name"] == MODEL
    assert ov["sessions"][0]["session_id"] == server.session_id
    assert ov["status"]["runs_active"] == 1
    # capabilities are cached: a second overview does not ask again
    before = sum("capabilities" in c for c in server.calls)
    asyncio.run(up.overview(good))
    assert sum("capabilities" in c for c in server.calls) == before == 1

    with pytest.raises(UpstreamError) as bad:
        asyncio.run(up.overview(connection_file.Connection(url=server.url, api_key="wrong")))
    assert bad.value.state == "bad_key" and "rejected the API key" in bad.value.message
    assert "unknown or revoked API key" in bad.value.message  # the server's own words are passed on

    hist = asyncio.run(up.request(good, "GET", f"runs/{server.run_id}/metrics"))
    assert hist == server.get(f"runs/{server.run_id}/metrics") and len(hist["points"]) == 6
    with pytest.raises(UpstreamError) as nf:
        asyncio.run(up.request(good, "GET", "runs/nope/metrics"))
    assert nf.value.state == "not_found"

    down = connection_file.Connection(url=f"http://127.0.0.1:{_free_port()}", api_key="k")
    with pytest.raises(UpstreamError) as exc:
        asyncio.run(up.overview(down))
    assert exc.value.state == "server_down" and "Cannot reach" in exc.value.message


def test_not_a_twinkle_server_and_non_json():
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/runs"):
            return httpx.Response(200, text="<html>hello</html>")
        return httpx.Response(404, text="Not Found")

    up = Upstream(transport=httpx.MockTransport(handler))
    conn = connection_file.Connection(url="http://web:80", api_key="k")
    with pytest.raises(UpstreamError) as exc:
        asyncio.run(up.overview(conn))
    assert exc.value.state == "error" and "does not look like a Twinkle server" in exc.value.message

    def html(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text="<html>hello</html>")

    with pytest.raises(UpstreamError) as exc2:
        asyncio.run(Upstream(transport=httpx.MockTransport(html)).overview(conn))
    assert "did not answer with JSON" in exc2.value.message


def test_server_error_message_is_passed_on():
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(500, json={"error": "worker crashed (request id 42)", "category": "server"})

    up = Upstream(transport=httpx.MockTransport(handler))
    with pytest.raises(UpstreamError) as exc:
        asyncio.run(up.request(connection_file.Connection(url="http://x:1", api_key="k"), "GET", "runs"))
    assert exc.value.state == "error" and exc.value.status == 500
    assert "worker crashed (request id 42)" in exc.value.message


@pytest.mark.parametrize(
    ("method", "path", "ok"),
    [
        ("GET", "runs", True),
        ("GET", "runs/r-1/metrics", True),
        ("GET", "runs/s5c4:train:0/metrics", True),
        ("DELETE", "runs/s5c4:train:0/checkpoints/training/step-3", True),
        ("GET", "runs/../metrics", False),
        ("GET", "runs/r-1/checkpoints", True),
        ("GET", "sessions/s-1", True),
        ("GET", "futures/f1", False),
        ("GET", "runs/../../etc", False),
        ("DELETE", "runs/r-1/checkpoints/training/step-3", True),
        ("DELETE", "runs/r-1", True),  # the panel's run delete (after its confirmation dialog)
        ("DELETE", "runs/../x", False),
        ("POST", "runs/r-1/forward_backward", False),
        ("POST", "sessions/s-1/stop", True),  # the Stop buttons
        ("POST", "runs/s5c4:train:0/stop", True),
        ("POST", "sessions/../stop", False),
        ("POST", "sessions/s-1/close", False),
        ("DELETE", "sessions/s-1/stop", False),
    ],
)
def test_only_read_routes_and_checkpoint_delete_are_proxied(method, path, ok):
    assert allowed(method, path) is ok


def test_overview_carries_the_live_load_when_the_server_has_it(server):
    """The panel's live load (queue depth, tokens/s, your usage) comes with the overview poll; a server without
    the load route still gives a working overview (``load`` null)."""
    up = Upstream(timeout=5.0)
    conn = connection_file.Connection(url=server.url, api_key=server.api_key)
    server.hide_load = True
    try:
        ov = asyncio.run(up.overview(conn))
    finally:
        server.hide_load = False
    assert ov["load"] is None and ov["runs"]  # older server: the rest still works
    ov = asyncio.run(up.overview(conn))
    assert ov["load"]["queue_depth"] == 0
    mine = [u for u in ov["load"]["usage"] if u["base_model"] == MODEL]
    assert mine and mine[0]["tokens_trained"] == 12  # 3 steps of one 4-token datum
    assert any(c.endswith("/load") for c in server.calls)
