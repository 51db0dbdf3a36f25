"""A real Twinkle server for the tutorials: used by ``notebooks/conftest.py`` (nbval) and runnable by hand.

    python notebooks/tutorial_server.py serve            # start one, print the export lines, wait for Ctrl-C
    python notebooks/tutorial_server.py execute [NB...]  # start one (or use $TWINKLE_SERVER_URL/$TWINKLE_API_KEY),
                                                         # run the notebooks in place so their saved outputs are fresh

The server is the same one the integration tests launch (``tests/integration/conftest.py``: ``twinkle-server
launch`` on Ray Serve, a temp SQLite store and checkpoint root, a key made with ``twinkle-server keys create``),
hosting only the transformers backend on ``builtin://tiny``. The URL and key reach the notebook kernels through
``TWINKLE_SERVER_URL`` / ``TWINKLE_API_KEY``; ``TWINKLE_HOME`` points at a temp dir so no state lands in ``~``.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MODEL = "builtin://tiny"
VL_MODEL = "builtin://tiny-vl"  # 07_images.ipynb


def _integration_module() -> ModuleType:
    path = REPO / "tests" / "integration" / "conftest.py"
    spec = importlib.util.spec_from_file_location("_twinkle_integration_server", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


def start_server(lease_seconds: float = 60.0) -> Any:
    """Launch the server and wait until it is healthy; returns the integration tests' ``ServerHandle``."""
    it = _integration_module()
    workdir = Path(tempfile.mkdtemp(prefix="twinkle-nb-"))
    port = it._free_port()
    cfg = it.make_server_config(workdir, port, lease_seconds=lease_seconds)
    cfg["models"] = [m for m in cfg["models"] if m["model_id"] == MODEL]
    cfg["models"].append({"backend": "transformers", "model_id": VL_MODEL, "max_adapters": 8,
                          "ray_actor_options": {"num_cpus": 0}})
    cfg_path = workdir / "server_config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    handle = it.ServerHandle(url=f"http://127.0.0.1:{port}", port=port, workdir=workdir, config_path=cfg_path,
                             log_path=workdir / "server.log", models={"transformers": MODEL})
    handle.create_key("tutorial")
    handle.keys["alice"] = handle.keys["tutorial"]  # ServerHandle.api_key reads "alice"
    handle.start()
    return handle


def tutorial_env(url: str, api_key: str, home: str | None = None) -> dict[str, str]:
    """The environment variables a tutorial kernel needs."""
    env = {"TWINKLE_SERVER_URL": url, "TWINKLE_API_KEY": api_key, "TWINKLE_MODEL": MODEL, "TWINKLE_VL_MODEL": VL_MODEL,
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["TWINKLE_HOME"] = home or os.environ.get("TWINKLE_HOME") or tempfile.mkdtemp(prefix="twinkle-nb-home-")
    return env


def notebooks() -> list[Path]:
    return sorted(HERE.glob("[0-9][0-9]_*.ipynb"))


def execute(paths: list[Path], env: dict[str, str]) -> int:
    """Run each notebook top to bottom in place (``jupyter nbconvert --execute --inplace``), print timings."""
    failed = 0
    for nb in paths:
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute", "--inplace",
             "--ExecutePreprocessor.timeout=600", str(nb)],
            env={**os.environ, **env}, cwd=HERE, capture_output=True, text=True,
        )
        dt = time.perf_counter() - t0
        status = "ok" if proc.returncode == 0 else f"FAILED ({proc.returncode})"
        print(f"{nb.name:28s} {dt:6.1f} s  {status}", flush=True)
        if proc.returncode != 0:
            failed += 1
            print(proc.stderr[-4000:], file=sys.stderr)
    return failed


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("serve", "execute"):
        print(__doc__)
        return 2
    handle = None
    url, key = os.environ.get("TWINKLE_SERVER_URL"), os.environ.get("TWINKLE_API_KEY")
    try:
        if argv[0] == "serve" or not (url and key):
            t0 = time.perf_counter()
            handle = start_server()
            url, key = handle.url, handle.api_key
            print(f"server ready in {time.perf_counter() - t0:.0f} s (log: {handle.log_path})", flush=True)
        env = tutorial_env(url, key)
        if argv[0] == "serve":
            print("".join(f"export {k}={v}\n" for k, v in env.items()), flush=True)
            # sigwait only returns for blocked signals: unblocked, Ctrl-C did nothing and SIGTERM killed this
            # process before `finally`, leaving the server's Ray processes behind
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
            return 0
        paths = [Path(p).resolve() for p in argv[1:]] or notebooks()
        return 1 if execute(paths, env) else 0
    finally:
        if handle is not None:
            handle.stop()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
