"""The shared integration-test server: ONE real ``twinkle-server launch`` (Ray Serve) per test session.

Use the ``twinkle_server`` fixture (session scope). It yields a :class:`ServerHandle`:

* ``url`` / ``base_url`` -- ``http://127.0.0.1:<free port>`` (native API under ``/api/v1/twinkle``, Tinker
  routes under ``/api/v1``)
* ``keys`` -- ``{"alice": "tml-...", "bob": "tml-..."}``, two users created with ``twinkle-server keys create``;
  ``api_key`` is alice's key (``(url, api_key)`` is what most clients need)
* ``models`` -- ``{"mock": "mock", "transformers": "builtin://tiny"}``: the ``base_model`` names it hosts
  (a mock-backend model and a transformers model on the builtin tiny model)
* ``base_model`` -- ``"builtin://tiny"``
* ``lease_seconds`` -- the server's default lease (60 s); lease tests ask for a short one per session
  (``POST /api/v1/twinkle/sessions {"lease_seconds": 2}``); the reaper wakes at each lease deadline
* ``config_path``, ``workdir`` (temp dir: ``server.db`` SQLite, ``checkpoints/`` root), ``log_path``
* ``create_key(user) -> str`` -- another key through the CLI
* ``restart()`` -- stop the server and launch it again on the SAME config/store/port (runs held in memory
  become ``lost``; runs, checkpoints and keys stay listed). Disruptive: use it at the end of a test module.

The server is stopped with SIGINT (the clean Ctrl-C path) at the end of the session.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

_START_TIMEOUT_S = float(os.environ.get("TWINKLE_TEST_SERVER_TIMEOUT", "600"))


def _free_port() -> int:
    from twinkle.net import free_port

    return free_port()  # outside the ephemeral range: a Ray start's own connections cannot take it meanwhile


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/api/v1/healthz", timeout=2) as r:
            return r.status == 200
    except Exception:
        return False


@dataclass
class ServerHandle:
    url: str
    port: int
    workdir: Path
    config_path: Path
    log_path: Path
    keys: dict[str, str] = field(default_factory=dict)
    models: dict[str, str] = field(default_factory=lambda: {"mock": "mock", "transformers": "builtin://tiny"})
    base_model: str = "builtin://tiny"
    lease_seconds: float = 60.0
    proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return self.url

    @property
    def api_key(self) -> str:
        return self.keys["alice"]

    def _cli(self, *args: str) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "twinkle.server.cli", *args, "-c", str(self.config_path)],
            check=True, capture_output=True, text=True, timeout=120,
        )
        return out.stdout

    def create_key(self, user: str) -> str:
        key = self._cli("keys", "create", "--user", user).strip().splitlines()[-1]
        self.keys[user] = key
        return key

    def start(self) -> None:
        log = open(self.log_path, "a")  # noqa: SIM115 - kept open for the child's lifetime
        env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", RAY_USAGE_STATS_ENABLED="0",
                   PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "twinkle.server.cli", "launch", "-c", str(self.config_path)],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"twinkle-server exited with {self.proc.returncode}; log: {self.log_path}\n"
                                   + self.log_path.read_text()[-4000:])
            if _healthy(self.url):
                return
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"twinkle-server did not become healthy in {_START_TIMEOUT_S} s; log: {self.log_path}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def restart(self) -> None:
        self.stop()
        self.start()


def make_server_config(workdir: Path, port: int, lease_seconds: float = 60.0) -> dict:
    return {
        "http": {"host": "127.0.0.1", "port": port},
        "auth": {"bootstrap_key_env": None},
        "persistence": {"sqlite_path": str(workdir / "server.db"), "checkpoint_root": str(workdir / "checkpoints")},
        "lease_seconds": lease_seconds,
        "limits": {"max_adapters_per_user": 32},
        "models": [
            {"name": "mock", "backend": "mock", "model_id": "mock://tiny", "max_adapters": 64,
             "ray_actor_options": {"num_cpus": 0}},
            {"backend": "transformers", "model_id": "builtin://tiny", "max_adapters": 32,
             "ray_actor_options": {"num_cpus": 0}},
        ],
    }


@contextmanager
def own_server(cfg: dict, prefix: str) -> Iterator[ServerHandle]:
    """A server of a test module's own (not the shared one) from ``cfg``: host/port and storage are moved to a
    free port and a temp dir, user ``alice`` gets a key; stopped with SIGINT on exit."""
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    port = _free_port()
    cfg = {**cfg, "http": {**cfg.get("http", {}), "host": "127.0.0.1", "port": port},
           "persistence": {**cfg.get("persistence", {}), "sqlite_path": str(workdir / "server.db"),
                           "checkpoint_root": str(workdir / "checkpoints")}}
    path = workdir / "server_config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    handle = ServerHandle(url=f"http://127.0.0.1:{port}", port=port, workdir=workdir, config_path=path,
                          log_path=workdir / "server.log")
    handle.create_key("alice")
    handle.start()
    try:
        yield handle
    finally:
        handle.stop()


def native_lora_losses(model: Any, adapter: str, steps: int, lr: float = 2e-2) -> list[float]:
    """Train a fresh rank-8 adapter on one fixed sequence with a ``twinkle_client`` model; the loss per step."""
    model.add_adapter_to_model(adapter, {"rank": 8, "seed": 0})
    model.set_optimizer("AdamW", lr=lr)
    batch = [{"input_ids": list(range(10, 40)), "labels": list(range(10, 40))}]
    losses = []
    for _ in range(steps):
        out = model.forward_backward(inputs=batch)
        model.clip_grad_and_step()
        losses.append(out.metrics["loss:sum"])
    return losses


@pytest.fixture(scope="session")
def twinkle_server():
    """One real Twinkle server (Ray Serve) for the whole test session; see the module docstring."""
    pytest.importorskip("ray.serve")
    workdir = Path(tempfile.mkdtemp(prefix="twinkle-it-"))
    port = _free_port()
    cfg_path = workdir / "server_config.yaml"
    cfg_path.write_text(yaml.safe_dump(make_server_config(workdir, port)))
    handle = ServerHandle(url=f"http://127.0.0.1:{port}", port=port, workdir=workdir, config_path=cfg_path,
                          log_path=workdir / "server.log")
    for user in ("alice", "bob"):
        handle.create_key(user)
    handle.start()
    try:
        yield handle
    finally:
        handle.stop()
