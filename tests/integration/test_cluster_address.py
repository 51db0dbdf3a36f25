"""``twinkle-server launch --address``: the server joins a Ray cluster that is already running (``ray start``),
serves through it, and on Ctrl-C deletes only its own Serve application, leaving the cluster up.

A one-node cluster on this machine stands in for a real one; its own ports are chosen free so it does not meet
other Rays here. The cluster is stopped (``ray stop``) at the end whatever happens.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from twinkle.local_server import free_port as _free_port

pytestmark = pytest.mark.integration

API = "/api/v1/twinkle"
RAY = str(Path(sys.executable).with_name("ray"))
HAPROXY_DIR = Path("/tmp/haproxy-serve")


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/api/v1/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _wait(c: httpx.Client, ref: dict) -> dict:
    for _ in range(60):
        body = c.get(f"{API}/futures/{ref['future_id']}", params={"timeout": 10}).json()
        if body["status"] == "complete":
            return body["result"]
        assert body["status"] != "failed", body
    raise AssertionError("future did not complete")


def _procs() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process."""
    out = {}
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = Path(f"/proc/{p}/stat").read_text()
            out[int(p)] = (int(stat[stat.rfind(")") + 2:].split()[1]), cmd + " ")
        except (OSError, ValueError, IndexError):
            continue
    return out


def _stop_cluster(markers: list[str]) -> None:
    """Stop the processes of one ``ray start`` node: those whose command line names its temp dir or GCS port,
    and all their descendants (agents, Serve actors, workers)."""
    procs = _procs()
    kill = {pid for pid, (_, cmd) in procs.items() if any(m in cmd for m in markers) and pid != os.getpid()}
    grew = True
    while grew:
        more = {pid for pid, (ppid, _) in procs.items() if ppid in kill} - kill
        grew = bool(more)
        kill |= more
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
        for pid in kill:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(os.path.exists(f"/proc/{p}") for p in kill):
            time.sleep(0.1)


@pytest.fixture()
def cluster(tmp_path: Path):
    # the raylet waits for its agents to register (their Python start is slow on a loaded machine)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_agent_register_timeout_ms": "120000"}
    # the temp dir holds Ray's session files and sockets: keep it short (AF_UNIX path limit)
    temp = Path(f"/tmp/tw-cl-{os.getpid()}")
    haproxy_dirs = set(HAPROXY_DIR.iterdir()) if HAPROXY_DIR.is_dir() else set()
    # `ray start` gives its raylet a hard-coded 30 s to register; on a loaded machine that can run out, so a
    # failed start is cleaned up (its processes only) and tried once more on fresh ports
    for _attempt in (1, 2):
        gcs = _free_port()
        cmd = [RAY, "start", "--head", f"--port={gcs}", "--num-cpus=2", "--include-dashboard=false",
               f"--ray-client-server-port={_free_port()}", f"--node-manager-port={_free_port()}",
               f"--object-manager-port={_free_port()}", f"--temp-dir={temp}", "--disable-usage-stats"]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        if out.returncode == 0:
            break
        _stop_cluster([str(temp), f":{gcs} "])
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    try:
        yield f"127.0.0.1:{gcs}", env
    finally:
        # not `ray stop`: it stops every Ray on the machine, other test servers included
        _stop_cluster([str(temp), f":{gcs} "])
        # killing Serve's HAProxyManager leaves the HAProxy it runs (holding its ports)
        from twinkle.server.launcher import reap_haproxy

        for d in (set(HAPROXY_DIR.iterdir()) if HAPROXY_DIR.is_dir() else set()) - haproxy_dirs:
            reap_haproxy(d.name)


def test_launch_joins_an_existing_cluster_and_leaves_it_running(cluster, tmp_path):
    address, env = cluster
    port = _free_port()
    cfg = {
        "http": {"host": "127.0.0.1", "port": port}, "auth": {"bootstrap_key_env": None},
        "persistence": {"sqlite_path": str(tmp_path / "db.sqlite"), "checkpoint_root": str(tmp_path / "ck")},
        "models": [{"name": "mock", "backend": "mock", "model_id": "mock://tiny",
                    "ray_actor_options": {"num_cpus": 0}}],
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cli = [sys.executable, "-m", "twinkle.server.cli"]
    key = subprocess.run([*cli, "keys", "create", "--user", "carol", "-c", str(path)], check=True,
                         capture_output=True, text=True).stdout.strip().splitlines()[-1]
    log = tmp_path / "server.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen([*cli, "launch", "-c", str(path), "--address", address], stdout=fh,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while not _healthy(url):
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        with httpx.Client(base_url=url, headers={"X-API-Key": key}, timeout=60) as c:
            sid = c.post(f"{API}/sessions", json={}).json()["session_id"]
            run = _wait(c, c.post(f"{API}/runs", json={"session_id": sid, "base_model": "mock",
                                                        "lora": {"rank": 4}}).json())["run_id"]
            datum = {"model_input": {"chunks": [{"type": "encoded_text", "tokens": [3, 5, 7]}]},
                     "loss_fn_inputs": {"target_tokens": {"data": [5, 7, 9], "dtype": "int64"}}}
            out = _wait(c, c.post(f"{API}/runs/{run}/forward_backward", json={"data": [datum]}).json())
            assert out["metrics"]["loss:sum"] > 0
            assert c.get(f"{API}/runs/{run}").json()["base_model"] == "mock"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    assert "Twinkle server ready at" in text
    # the cluster is still up: a new driver connects to it, and the server's application is gone from Serve
    probe = (f"import ray; from ray import serve; ray.init(address={address!r}, logging_level='ERROR'); "
             "print('apps', sorted(serve.status().applications))")
    # (a plain driver must ask for token auth itself, as the launcher does for the server)
    out = subprocess.run([sys.executable, "-c", probe], env={**env, "RAY_AUTH_MODE": "token"}, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "apps []" in out.stdout, out.stdout
    assert not _healthy(url)
