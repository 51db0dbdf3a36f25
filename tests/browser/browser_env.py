"""What the browser tests share: paths, the test key, and a real Twinkle server (Ray Serve, mock backend)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from jupyter_proc import free_port

REPO = Path(__file__).resolve().parents[2]
EXT = REPO / "extension"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
KEY = "browser-test-key-0001"


def missing() -> str | None:
    if not Path(CHROMIUM).exists():
        return f"{CHROMIUM} missing (apt-get install -y chromium)"
    if not (EXT / "node_modules" / "playwright-core").is_dir():
        return "extension/node_modules missing (bash extension/build.sh)"
    if not (REPO / "twinkle_client" / "labextension" / "package.json").is_file():
        return "labextension not built (bash extension/build.sh)"
    if shutil.which("node") is None:
        return "node missing"
    return None


def launch(tmp: Path) -> tuple[subprocess.Popen, str, object]:
    port = free_port()
    (tmp / "server.yaml").write_text(
        f"http: {{host: 127.0.0.1, port: {port}}}\n"
        f"persistence: {{sqlite_path: {tmp / 'db.sqlite'}, checkpoint_root: {tmp / 'ckpt'}}}\n"
        "lease_seconds: 120\n"
        "models:\n"
        "  - {name: mock, backend: mock, model_id: 'mock://tiny', replicas: 1, ray_actor_options: {num_cpus: 0},"
        " max_adapters: 4, max_lora_rank: 16}\n"
    )
    env = {**os.environ, "TWINKLE_BOOTSTRAP_KEY": KEY, "TWINKLE_HOME": str(tmp / "home"),
           "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    log = open(tmp / "server.log", "ab")  # noqa: SIM115 - kept open for the child's lifetime
    proc = subprocess.Popen(
        [sys.executable, "-m", "twinkle.server.cli", "launch", "-c", str(tmp / "server.yaml")],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp, start_new_session=True,
    )
    return proc, f"http://127.0.0.1:{port}", log


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
