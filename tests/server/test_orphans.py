"""Finding what a killed launcher left behind: only processes marked with a launch id whose launcher is gone,
and a clear error naming whatever else holds the port. Uses only processes this test starts."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from twinkle.local_server import free_port
from twinkle.server import orphans

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc"), reason="Linux /proc needed")

_LISTEN = "import socket,sys,time; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); " \
          "s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen(); print('up', flush=True); time.sleep(120)"


def _spawn_orphan_listener(port: int, state: str) -> int:
    """A 'launcher' that starts a listener holding ``port`` with its marks, then dies: the listener is an
    orphan of a dead launch (like HAProxy after a SIGKILL of the launcher). Returns the listener's pid."""
    code = (  # the marks ``orphans.mark_launch`` sets, without importing twinkle (fast)
        "import os,subprocess,sys,uuid\n"
        "start = open('/proc/self/stat').read().rsplit(')', 1)[-1].split()[19]\n"
        f"os.environ.update(TWINKLE_LAUNCH_ID=uuid.uuid4().hex, TWINKLE_LAUNCH_STATE={state!r},"
        " TWINKLE_LAUNCHER_PID=str(os.getpid()), TWINKLE_LAUNCHER_START=start)\n"
        f"p = subprocess.Popen([sys.executable, '-c', {_LISTEN!r}, '{port}'], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,"
        " start_new_session=True)\n"
        "p.stdout.readline()\n"
        "print(p.pid, flush=True)\n"
        "os._exit(0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    return int(out.stdout.strip().splitlines()[-1])


def _alive(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}") and not orphans._zombie(pid)


def test_mark_launch_matches_what_the_test_launcher_sets(monkeypatch):
    for k in (orphans.LAUNCH_ID, orphans.LAUNCH_STATE, orphans.LAUNCHER_PID, orphans.LAUNCHER_START):
        monkeypatch.delenv(k, raising=False)
    orphans.mark_launch("x.db")
    assert os.environ[orphans.LAUNCHER_START] == orphans._start_time(os.getpid())
    assert orphans._launcher_alive({k: os.environ[k] for k in (orphans.LAUNCHER_PID, orphans.LAUNCHER_START)})


def test_a_process_without_the_launcher_start_time_takes_it_from_its_siblings(monkeypatch):
    """Ray's dashboard and runtime-env agents carry the launcher's pid but not its start time; when the dead
    launcher's pid is reused by another process, they must still be orphans (a CI run kept both alive)."""
    env = {orphans.LAUNCH_ID: "L", orphans.LAUNCH_STATE: "s.db", orphans.LAUNCHER_PID: "100"}
    procs = {201: {**env, orphans.LAUNCHER_START: "50"}, 202: dict(env), 203: dict(env)}
    monkeypatch.setattr(orphans, "_pids", lambda: [100, *procs])
    monkeypatch.setattr(orphans, "_environ", lambda pid: dict(procs.get(pid, {})))
    monkeypatch.setattr(orphans, "_start_time", lambda pid: "999" if pid == 100 else "1")  # 100: reused
    found = orphans.find_orphans()
    assert [(g.launch_id, g.state, sorted(g.pids)) for g in found] == [("L", "s.db", [201, 202, 203])]
    monkeypatch.setattr(orphans, "_start_time", lambda pid: "50" if pid == 100 else "1")  # the launcher lives
    assert orphans.find_orphans() == []


def _holder(path: Path, marks: dict[str, str] | None = None) -> subprocess.Popen:
    """A process holding ``path`` open with only ``marks`` of a launch (like Ray's agents, whose marks
    setproctitle partly or wholly erased)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TWINKLE_LAUNCH")} | (marks or {})
    code = f"f = open({str(path)!r}, 'a'); print('up', flush=True); import time; time.sleep(120)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=env, start_new_session=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"up"
    return proc


@pytest.mark.parametrize("marks", ["none", "launch id only"])
def test_processes_of_a_dead_launchs_ray_session_are_reaped_whatever_marks_they_show(tmp_path, marks):
    """The launch records its Ray session directory beside the state; after the launcher died, a relaunch on that
    state stops processes that hold files there even when their launch marks were overwritten (Ray's agents
    rename themselves, which erased all or some of them: a CI run kept both agents of a killed launch alive),
    and leaves processes elsewhere alone."""
    state = str(tmp_path / "state.db")
    session = tmp_path / "ray" / "session_x"
    (session / "logs").mkdir(parents=True)
    orphans.record_ray_session(state, str(session))
    rec = json.loads(Path(state + ".launch.json").read_text())
    assert rec["session_dir"] == str(session.resolve()) and rec[orphans.LAUNCHER_PID] == str(os.getpid())
    agent = _holder(session / "logs" / "dashboard_agent.log",
                    {orphans.LAUNCH_ID: "0123abcd" * 4} if marks == "launch id only" else None)
    other = _holder(tmp_path / "elsewhere.log")
    try:
        assert orphans.reap_state(state) == 0  # the recording launcher (this process) is alive: nothing happens
        rec[orphans.LAUNCHER_START] = "1"  # now it is dead (its pid belongs to another process)
        Path(state + ".launch.json").write_text(json.dumps(rec))
        assert orphans.reap_state(str(tmp_path / "other.db")) == 0
        assert orphans.reap_state(state) == 1
        assert agent.wait(timeout=10) is not None
        assert other.poll() is None
    finally:
        for proc in (agent, other):
            if proc.poll() is None:
                proc.kill()
            proc.wait()

def test_orphans_of_a_dead_launch_holding_the_port_are_stopped(tmp_path):
    port = free_port()
    pid = _spawn_orphan_listener(port, str(tmp_path / "a.db"))
    try:
        assert port_holders_eventually(port, pid)
        found = [g for g in orphans.find_orphans() if pid in g.pids]
        assert found and found[0].state == str(tmp_path / "a.db")
        assert orphans.prepare_port("127.0.0.1", port) >= 1
        assert not _alive(pid)
    finally:
        if _alive(pid):
            os.kill(pid, 9)


def test_orphans_of_the_same_state_are_reaped_and_others_left_alone(tmp_path):
    mine = _spawn_orphan_listener(free_port(), str(tmp_path / "mine.db"))
    other = _spawn_orphan_listener(free_port(), str(tmp_path / "other.db"))
    try:
        assert orphans.reap_state(str(tmp_path / "mine.db")) == 1
        assert not _alive(mine) and _alive(other)
    finally:
        for p in (mine, other):
            if _alive(p):
                os.kill(p, 9)


def test_a_port_held_by_something_else_is_a_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(orphans.PortBusyError) as e:
            orphans.prepare_port("127.0.0.1", port)
        assert f"port {port}" in str(e.value) and f"pid {os.getpid()}" in str(e.value)
        assert e.value.detail.get("field") == "http.port"


def port_holders_eventually(port: int, pid: int) -> bool:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if pid in orphans.port_holders(port):
            return True
        time.sleep(0.05)
    return False
