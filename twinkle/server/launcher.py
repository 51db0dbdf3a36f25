"""Start the server on Ray Serve: a local Ray on a fresh machine, or an existing cluster with ``address``.

``launch`` deploys the application, waits until ``/api/v1/healthz`` answers, prints
``Twinkle server ready at http://HOST:PORT`` and blocks until Ctrl-C / SIGTERM, then shuts down cleanly.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
import urllib.request
from typing import Any

from .config import ServerConfig

__all__ = ["launch", "wait_healthy"]

log = logging.getLogger("twinkle.server")

APP_NAME = "twinkle"


def _client_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def wait_healthy(url: str, timeout: float = 300.0) -> bool:
    """Poll ``{url}/api/v1/healthz`` until it answers 200 (startup only)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/api/v1/healthz", timeout=2) as r:
                if r.status == 200:
                    return True
        except Exception:
            pass
        time.sleep(0.1)
    return False


def _lean_env() -> dict[str, str]:
    env = {
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        "TOKENIZERS_PARALLELISM": "false",
        "RAY_SERVE_ENABLE_TASK_EVENTS": "0",
    }
    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TWINKLE_HOME", "HF_HOME", "PYTHONPATH"):
        if k in os.environ:
            env[k] = os.environ[k]
    return env


def _init_ray(address: str | None, num_cpus: int | None) -> None:
    import ray

    # Lean defaults for a fresh machine: no dashboard, no usage stats, quiet logs.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    # The raylet waits for its agents (metrics, runtime env); on a busy small machine they start slowly.
    os.environ.setdefault("RAY_agent_register_timeout_ms", "120000")
    kwargs: dict[str, Any] = {
        "include_dashboard": False, "logging_level": logging.WARNING, "log_to_driver": True,
        "runtime_env": {"env_vars": _lean_env()},
    }
    if address:
        ray.init(address=address, **kwargs)
        return
    # Ray gives a starting node 30 s; a busy machine can miss that, so try again before giving up.
    for attempt in range(3):
        try:
            ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 2, **kwargs)
            return
        except Exception as e:
            if attempt == 2 or "timed out during startup" not in str(e):
                raise
            log.warning("local Ray did not start in time (%s); retrying", e)
            try:
                ray.shutdown()
            except Exception:
                pass


def launch(config: ServerConfig, *, address: str | None = None, num_cpus: int | None = None,
           block: bool = True, ready_timeout: float = 600.0) -> str:
    """Deploy the server and (with ``block``) serve until a signal arrives. Returns the URL."""
    from ray import serve

    from .app import build_serve_app

    stop = threading.Event()

    def _on_signal(signum: int, frame: Any) -> None:
        stop.set()

    if block:
        signal.signal(signal.SIGINT, _on_signal)
        signal.signal(signal.SIGTERM, _on_signal)

    t0 = time.monotonic()
    _init_ray(address, num_cpus)
    host, port = config.http.host, config.http.port
    url = f"http://{_client_host(host)}:{port}"
    t_ray = time.monotonic()
    try:
        serve.start(http_options={"host": host, "port": port}, detached=bool(address))
        t_serve = time.monotonic()
        serve.run(build_serve_app(config), name=APP_NAME, route_prefix="/", blocking=False)
        if not wait_healthy(url, ready_timeout):
            raise RuntimeError(f"the server did not become healthy at {url}")
    except BaseException:
        print("Twinkle server failed to start; shutting down", file=sys.stderr, flush=True)
        shutdown(address)
        raise
    t_end = time.monotonic()
    print(f"Twinkle server ready at {url}  (started in {t_end - t0:.1f} s: ray {t_ray - t0:.1f} s, "
          f"serve {t_serve - t_ray:.1f} s, deployments {t_end - t_serve:.1f} s)", flush=True)
    if not block:
        return url
    try:
        while not stop.wait(1.0):
            pass
    finally:
        print("Twinkle server shutting down...", flush=True)
        shutdown(address)
    return url


def shutdown(address: str | None = None) -> None:
    import ray
    from ray import serve

    try:
        if address:
            serve.delete(APP_NAME)  # leave a shared cluster's Serve instance running
        else:
            serve.shutdown()
    except Exception:
        log.warning("serve shutdown failed", exc_info=True)
    try:
        ray.shutdown()
    except Exception:
        pass
    sys.stdout.flush()
