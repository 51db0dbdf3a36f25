"""A throw-away local Twinkle server for demos and tests: ``twinkle-server launch`` in a child process.

``LocalServer`` writes a server config hosting one base model into a temporary folder (SQLite store and
checkpoints there too), creates an API key with ``twinkle-server keys create``, launches the server on a
free loopback port, waits for ``/api/v1/healthz`` and, on ``stop()`` (or leaving the ``with`` block, also on
Ctrl-C or an error), sends it SIGINT — the server's clean Ctrl-C path — and waits; anything still running
in the server's process group after that is killed, so nothing is left behind.

    with LocalServer("builtin://tiny") as server:
        session = twinkle_client.connect(server.url, server.api_key)
        ...

Nothing here imports torch or Ray: the server runs in its own process (keys are created with the server
CLI's ``keys create`` in this process: pydantic and SQLite only).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twinkle.net import free_port
from twinkle.types import InvalidInputError, TwinkleError

__all__ = ["LocalServer", "ServerStartError", "free_port"]

_SERVER_CLI = [sys.executable, "-m", "twinkle.server.cli"]


class ServerStartError(TwinkleError):
    """The local server exited or did not become healthy in time (the message holds its log's tail)."""


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/api/v1/healthz", timeout=2) as r:
            return r.status == 200
    except Exception:
        return False


class LocalServer:
    """One local server hosting ``model_id`` with ``backend`` (``transformers`` | ``mock`` | ``megatron``).

    ``threads``: torch CPU threads of the model worker (``OMP_NUM_THREADS``); ``workdir``: where the config,
    store, checkpoints and ``server.log`` go (default: a new temp folder, removed by ``stop()``).
    """

    def __init__(self, model_id: str = "builtin://tiny", backend: str = "transformers", *,
                 port: int | None = None, workdir: str | os.PathLike[str] | None = None, user: str = "quickstart",
                 threads: int = 1, lease_seconds: float = 60.0, num_cpus: int | None = None) -> None:
        if backend not in ("transformers", "mock", "megatron"):
            raise InvalidInputError("backend must be 'transformers', 'mock' or 'megatron'", field="backend")
        if threads < 1:
            raise InvalidInputError("threads must be at least 1", field="threads")
        self.model_id = model_id
        self.backend = backend
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="twinkle-server-"))
        self.config_path = self.workdir / "server_config.yaml"
        self.log_path = self.workdir / "server.log"
        self.user = user
        self.threads = threads
        self.lease_seconds = lease_seconds
        self.num_cpus = num_cpus
        self.api_key: str | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.start_seconds: float | None = None
        self.leftovers = 0  # processes of the server's group still alive after it exited (then killed)

    # ---- config and key -------------------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        return {
            "http": {"host": "127.0.0.1", "port": self.port},
            "auth": {"bootstrap_key_env": None},
            "persistence": {"sqlite_path": str(self.workdir / "server.db"),
                            "checkpoint_root": str(self.workdir / "checkpoints")},
            "lease_seconds": self.lease_seconds,
            "log_level": "warning",
            "models": [{"backend": self.backend, "model_id": self.model_id, "max_adapters": 4,
                        "ray_actor_options": {"num_cpus": 0}}],
        }

    def write_config(self) -> Path:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.config(), indent=2) + "\n")  # JSON is YAML
        return self.config_path

    def create_key(self, user: str | None = None) -> str:
        """A new API key through ``twinkle-server keys create`` (its ``main``, run in this process: the same
        command without another interpreter start-up). The key is the last line it prints."""
        import contextlib
        import io

        from twinkle.server.cli import main as server_cli

        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = server_cli(["keys", "create", "--user", user or self.user, "-c", str(self.config_path)])
        lines = out.getvalue().strip().splitlines()
        if code != 0 or not lines:
            raise ServerStartError(f"twinkle-server keys create failed ({code}): {err.getvalue().strip()[-2000:]}")
        return lines[-1].strip()

    def _env(self) -> dict[str, str]:
        return dict(os.environ, OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads),
                    TOKENIZERS_PARALLELISM="false", RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")

    # ---- lifecycle ------------------------------------------------------------------------------------------
    def start(self, timeout: float = 600.0, on_wait: Callable[[float], None] | None = None) -> str:
        """Write the config, create a key, launch, and wait until healthy (``on_wait(elapsed)`` is called about
        4 times a second meanwhile). Returns the URL. On failure the server is stopped and
        ``ServerStartError`` carries the tail of its log."""
        t0 = time.perf_counter()
        self.write_config()
        self.api_key = self.create_key()
        cmd = [*_SERVER_CLI, "launch", "-c", str(self.config_path)]
        if self.num_cpus:
            cmd += ["--num-cpus", str(self.num_cpus)]
        with open(self.log_path, "ab") as log:
            # a new session: the terminal's Ctrl-C reaches only us, and we stop the server ourselves
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=self._env(), start_new_session=True)
        try:
            deadline = time.monotonic() + timeout
            while True:
                if self.proc.poll() is not None:
                    raise ServerStartError(f"twinkle-server exited with {self.proc.returncode} while starting; "
                                           f"log {self.log_path}:\n{self.log_tail()}")
                if _healthy(self.url):
                    break
                if time.monotonic() > deadline:
                    raise ServerStartError(f"the server did not become healthy in {timeout:.0f} s; "
                                           f"log {self.log_path}:\n{self.log_tail()}")
                if on_wait is not None:
                    on_wait(time.perf_counter() - t0)
                time.sleep(0.25)
        except BaseException:
            self.stop(keep_workdir=True)
            raise
        self.start_seconds = time.perf_counter() - t0
        return self.url

    def wait_startup_report(self, timeout: float = 3.0) -> str | None:
        """``startup_report()``, waiting up to ``timeout`` s for the server to print it (it may answer health
        checks a moment before)."""
        deadline = time.monotonic() + timeout
        while True:
            report = self.startup_report()
            if report is not None or time.monotonic() > deadline:
                return report
            time.sleep(0.1)

    def startup_report(self) -> str | None:
        """The server's own ``ready ... (started in ...)`` line, when it has printed it."""
        for line in reversed(self.log_tail(200).splitlines()):
            if "Twinkle server ready" in line:
                return line.strip()
        return None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 90.0, *, keep_workdir: bool = False) -> int | None:
        """SIGINT (clean shutdown) and wait up to ``timeout`` s; then SIGKILL whatever is left of the server's
        process group. Removes a temporary workdir unless ``keep_workdir``. Returns the exit code."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            try:
                proc.send_signal(signal.SIGINT)
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill_group(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    _kill_group(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=15)
            except KeyboardInterrupt:  # a second Ctrl-C: stop waiting, kill
                _kill_group(proc.pid, signal.SIGKILL)
                proc.wait(timeout=15)
                raise
        self.leftovers = _sweep_group(proc.pid)  # Ray helpers the server left behind, if any
        if self._own_workdir and not keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        return proc.returncode

    def __enter__(self) -> LocalServer:
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop(keep_workdir=exc[0] is not None and exc[0] is not KeyboardInterrupt)


def _group_members(pgid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                fields = stat[stat.rindex(")") + 2:].split()  # state, ppid, pgrp, ...
                if int(fields[2]) == pgid and fields[0] != "Z":  # a zombie is already dead
                    pids.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                pass
    return pids


def _sweep_group(pgid: int) -> int:
    """SIGKILL what is left of process group ``pgid``; returns how many processes that was."""
    members = _group_members(pgid)
    if members or not Path("/proc").is_dir():
        _kill_group(pgid, signal.SIGKILL)
    return len(members)


def _kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
