"""``twinkle.local_server.LocalServer`` without Ray: a fake ``launch`` stands in for the server, so start-up
failures, the health wait and the clean-up of the server's whole process group are checked in seconds."""

from __future__ import annotations

import json
import os
import sys
import textwrap
import time

import pytest

import twinkle.local_server as ls
from twinkle.local_server import LocalServer, ServerStartError
from twinkle.types import InvalidInputError

# A stand-in for `twinkle-server launch -c FILE`: serves /api/v1/healthz on the config's port, starts a child
# that ignores SIGINT (as a stuck Ray helper would) and exits on SIGINT without stopping that child.
_FAKE_LAUNCH = textwrap.dedent('''
    import json, signal, subprocess, sys, threading
    from http.server import BaseHTTPRequestHandler, HTTPServer
    cfg = json.load(open(sys.argv[sys.argv.index("-c") + 1]))
    class H(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/api/v1/healthz" else 404); self.end_headers()
        def log_message(self, *a): pass
    child = subprocess.Popen([sys.executable, "-c",
        "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(600)"])
    open(cfg["persistence"]["checkpoint_root"] + ".child", "w").write(str(child.pid))
    srv = HTTPServer(("127.0.0.1", cfg["http"]["port"]), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    print("fake server up", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *a: stop.set())
    stop.wait()
    print("fake server: clean shutdown", flush=True)
''')


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_config_hosts_one_model_on_loopback(tmp_path):
    s = LocalServer("builtin://tiny", workdir=tmp_path)
    s.write_config()
    cfg = json.loads(s.config_path.read_text())
    assert cfg["http"] == {"host": "127.0.0.1", "port": s.port}
    assert cfg["models"] == [{"backend": "transformers", "model_id": "builtin://tiny", "max_adapters": 4,
                              "ray_actor_options": {"num_cpus": 0}}]
    assert cfg["persistence"]["sqlite_path"].startswith(str(tmp_path))
    from twinkle.server.config import load_config

    assert load_config(s.config_path).models[0].model_id == "builtin://tiny"  # the server accepts it
    key = s.create_key()
    assert key and key != s.create_key()  # a fresh key each time, printed by `keys create`


def test_bad_arguments_name_the_field():
    with pytest.raises(InvalidInputError) as e:
        LocalServer(backend="vllm")
    assert e.value.field == "backend"
    with pytest.raises(InvalidInputError) as e:
        LocalServer(threads=0)
    assert e.value.field == "threads"


def test_a_server_that_exits_while_starting_is_reported_with_its_log(tmp_path, monkeypatch):
    monkeypatch.setattr(ls, "_SERVER_CLI", [sys.executable, "-c", "import sys; print('boom: no Ray'); sys.exit(3)"])
    s = LocalServer(workdir=tmp_path)
    with pytest.raises(ServerStartError) as e:
        s.start(timeout=60)
    assert "exited with 3" in str(e.value) and "boom: no Ray" in str(e.value)
    assert not s.running


def test_start_waits_for_health_and_stop_leaves_nothing_running(tmp_path, monkeypatch):
    script = tmp_path / "fake_launch.py"
    script.write_text(_FAKE_LAUNCH)
    monkeypatch.setattr(ls, "_SERVER_CLI", [sys.executable, str(script)])
    waits: list[float] = []
    s = LocalServer(workdir=tmp_path / "work")
    url = s.start(timeout=120, on_wait=waits.append)
    assert url == s.url and s.running and s.api_key and s.start_seconds is not None
    child = int((tmp_path / "work" / "checkpoints.child").read_text())
    assert _alive(child)
    assert os.getpgid(child) == s.proc.pid  # the server and its helpers form one process group
    code = s.stop(timeout=30)
    assert code == 0  # SIGINT: the clean shutdown path, not a kill
    assert "clean shutdown" in s.log_path.read_text()
    assert s.leftovers == 1  # the helper that survived its parent was found and killed
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)
    assert (tmp_path / "work").exists()  # a workdir given by the caller is kept


def test_temporary_workdir_is_removed_and_errors_keep_it(monkeypatch):
    monkeypatch.setattr(ls, "_SERVER_CLI", [sys.executable, "-c", "import sys; sys.exit(1)"])
    s = LocalServer()
    with pytest.raises(ServerStartError):
        s.start(timeout=30)
    assert s.workdir.exists() and s.log_path.exists()  # kept so the log can be read
    s.stop()
    assert not s.workdir.exists()


@pytest.mark.slow  # signal handling of a child process: run sequentially (pytest-xdist workers change SIGINT)
def test_ctrl_c_inside_the_with_block_still_stops_the_server(tmp_path, monkeypatch):
    script = tmp_path / "fake_launch.py"
    script.write_text(_FAKE_LAUNCH)
    monkeypatch.setattr(ls, "_SERVER_CLI", [sys.executable, str(script)])
    server = LocalServer(workdir=tmp_path / "work")
    with pytest.raises(KeyboardInterrupt), server:
        assert server.running
        raise KeyboardInterrupt
    assert not server.running and server.proc.returncode == 0
    child = int((tmp_path / "work" / "checkpoints.child").read_text())
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)
