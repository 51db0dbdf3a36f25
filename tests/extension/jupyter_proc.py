"""Starts a real Jupyter server (with the Twinkle server extension) in a subprocess, for tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class JupyterServer:
    """``jupyter server`` (or ``jupyter lab``) on a free port with a token; ``.get/.post/.delete`` call it."""

    def __init__(self, workdir: Path, env: dict[str, str], app: str = "server", token: str = "test-token",
                 python: str = sys.executable, extra_args: list[str] | None = None, enable_flag: bool = True):
        self.port = free_port()
        self.token = token
        self.url = f"http://127.0.0.1:{self.port}"
        full_env = {**os.environ, **env}
        full_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), full_env.get("PYTHONPATH", "")) if p)
        args = [python, "-m", "jupyterlab" if app == "lab" else "jupyter_server",
                f"--ServerApp.port={self.port}", "--ServerApp.ip=127.0.0.1", f"--IdentityProvider.token={token}",
                "--ServerApp.open_browser=False", f"--ServerApp.root_dir={workdir}", "--ServerApp.allow_root=True"]
        if enable_flag:
            args.append("--ServerApp.jpserver_extensions=twinkle_client.jupyter_server=True")
        args += extra_args or []
        self.log_path = workdir / f"jupyter-{self.port}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(args, cwd=workdir, env=full_env, stdout=self._log, stderr=subprocess.STDOUT)
        self.client = httpx.Client(base_url=self.url, headers={"Authorization": f"token {token}"}, timeout=30)
        deadline = time.time() + 90
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"jupyter exited: {self.log_path.read_text()[-3000:]}")
            try:
                if self.client.get("/api/status").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"jupyter did not start: {self.log_path.read_text()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._log.close()
