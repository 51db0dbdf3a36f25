"""Shared by the server benches: start ``twinkle-server launch`` on a temp config, find its processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import yaml

MOCK_MODEL = {"name": "mock", "backend": "mock", "model_id": "mock://tiny", "ray_actor_options": {"num_cpus": 0}}
TINY_MODEL = {"backend": "transformers", "model_id": "builtin://tiny", "ray_actor_options": {"num_cpus": 0}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(workdir: Path, models: list[dict], proxy: str | None = None, **extra: object) -> tuple[Path, str]:
    port = free_port()
    http: dict[str, object] = {"host": "127.0.0.1", "port": port}
    if proxy:
        http["proxy"] = proxy
    cfg = {
        "http": http, "auth": {"bootstrap_key_env": None},
        "persistence": {"sqlite_path": str(workdir / "db.sqlite"), "checkpoint_root": str(workdir / "ck")},
        "models": models, **extra,
    }
    path = workdir / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, f"http://127.0.0.1:{port}"


def create_key(cfg: Path, user: str = "bench") -> str:
    out = subprocess.run([sys.executable, "-m", "twinkle.server.cli", "keys", "create", "--user", user, "-c",
                          str(cfg)], check=True, capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1]


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/api/v1/healthz", timeout=2) as r:
            return r.status == 200
    except Exception:
        return False


def launch(cfg: Path, log: Path, env: dict[str, str] | None = None, cwd: str | None = None) -> subprocess.Popen:
    """``cwd``: run from another checkout (``python -m`` imports ``twinkle`` from the working directory first)."""
    return subprocess.Popen([sys.executable, "-m", "twinkle.server.cli", "launch", "-c", str(cfg)],
                            cwd=cwd, stdout=open(log, "w"), stderr=subprocess.STDOUT,  # noqa: SIM115
                            start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


def wait_healthy(proc: subprocess.Popen, url: str, log: Path, timeout: float = 900.0) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"server exited ({proc.returncode}); log {log}:\n{log.read_text()[-3000:]}")
        if healthy(url):
            return time.monotonic() - t0
        time.sleep(0.05)
    raise SystemExit(f"server not healthy after {timeout} s; log {log}")


def tree(pid: int) -> list[psutil.Process]:
    """The launch process and every descendant (Ray's gcs/raylet/agents/workers are its descendants)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def label(p: psutil.Process) -> str:
    try:
        cmd = p.cmdline()
        name = p.name()
    except psutil.Error:
        return "?"
    if cmd and cmd[0].startswith("ray::"):
        return cmd[0]
    if len(cmd) > 1 and cmd[1].endswith(".py"):
        return cmd[1].split("site-packages/")[-1]
    for key in ("gcs_server", "raylet", "log_monitor", "dashboard/agent.py", "runtime_env/agent",
                "default_worker", "twinkle.server.cli"):
        if any(key in c for c in cmd):
            return key
    return name


def pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def stop(proc: subprocess.Popen, sig: int = signal.SIGINT, timeout: float = 120.0) -> tuple[float, list[str]]:
    """Signal the launcher; returns (seconds to exit, labels of its descendants still alive afterwards)."""
    kids = tree(proc.pid)[1:]
    t0 = time.monotonic()
    proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    took = time.monotonic() - t0

    def alive() -> list[psutil.Process]:
        out = []
        for k in kids:
            try:
                if k.is_running() and k.status() != psutil.STATUS_ZOMBIE:
                    out.append(k)
            except psutil.Error:
                pass
        return out

    deadline = time.monotonic() + 10.0
    while alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [f"{label(k)} ({k.pid})" for k in alive()]
    for k in kids:
        try:
            k.kill()
        except psutil.Error:
            pass
    return took, left
