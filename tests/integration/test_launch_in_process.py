"""``twinkle.server.launch()`` called from Python (a notebook's process): the server comes up, Ray's processes run
lean (``_lean_site`` first on their ``PYTHONPATH``: no pandas there) and the calling process keeps its pandas and
its environment. The launch runs in a child interpreter, so this test's process never starts Ray."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.integration

_SCRIPT = textwrap.dedent("""
    import json, os, sys
    from twinkle.net import free_port
    from twinkle.server import launch, parse_config
    from twinkle.server import launcher

    workdir = sys.argv[1]
    cfg = parse_config({
        "http": {"port": free_port()},
        "persistence": {"sqlite_path": workdir + "/db.sqlite", "checkpoint_root": workdir + "/ck"},
        "models": [{"name": "mock", "backend": "mock", "model_id": "mock://tiny"}],
    })
    before = {k: os.environ.get(k) for k in ("PYTHONPATH", "OMP_NUM_THREADS", "TOKENIZERS_PARALLELISM")}
    url = launch(cfg, block=False, ready_timeout=300)
    try:
        import ray

        @ray.remote(num_cpus=0)
        def probe():
            try:
                import pandas  # noqa: F401
                ray_pandas = True
            except ImportError:
                ray_pandas = False
            return os.environ.get("PYTHONPATH", ""), ray_pandas

        ray_path, ray_pandas = ray.get(probe.remote(), timeout=120)
        from ray import serve

        deployments = sorted(serve.status().applications["twinkle"].deployments)
        ingress = {k: os.environ.get(k) for k in ("RAY_SERVE_ENABLE_HA_PROXY", "RAY_SERVE_ENABLE_DIRECT_INGRESS")}
        parents, cmds = {}, {}
        for pid in (e for e in os.listdir("/proc") if e.isdigit()):
            try:
                parents[pid] = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1]
                cmds[pid] = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\\0", b" ").decode()
            except (OSError, IndexError):
                pass
        mine, grew = {str(os.getpid())}, True
        while grew:
            kids = {p for p, pp in parents.items() if pp in mine} - mine
            grew = bool(kids)
            mine |= kids
        unwanted = ("ProxyActor", "dashboard/dashboard.py", "autoscaler/_private/monitor.py")
        processes = [cmds.get(p, "") for p in mine - {str(os.getpid())} if any(u in cmds.get(p, "") for u in unwanted)]
        import pandas  # the caller's own
        after = {k: os.environ.get(k) for k in before}
        print("RESULT " + json.dumps({"url": url, "ray_path": ray_path, "ray_pandas": ray_pandas,
                                      "lean": launcher._LEAN_SITE, "pandas": pandas.__version__,
                                      "env_kept": after == before, "deployments": deployments,
                                      "ingress": ingress, "processes": processes}))
    finally:
        launcher.shutdown()
""")


def test_launch_in_process_keeps_the_callers_pandas(tmp_path):
    out = subprocess.run([sys.executable, "-c", _SCRIPT, str(tmp_path)], capture_output=True, text=True,
                         timeout=420)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    assert out.returncode == 0 and lines, (out.stdout[-2000:], out.stderr[-4000:])
    r = json.loads(lines[-1][len("RESULT "):])
    assert r["ray_path"].split(":")[0] == r["lean"]  # Ray's processes: lean
    assert r["ray_pandas"] is False
    assert r["pandas"]  # the calling process: its pandas imports
    assert r["env_kept"] is True
    # the defaults on one machine: the only model's worker inside the gateway, the gateway's own HTTP server
    assert r["deployments"] == ["gateway"]
    # (twinkle/server/own_http.py: Serve runs no HTTP proxy, no direct ingress and no HAProxy)
    assert r["ingress"] == {"RAY_SERVE_ENABLE_HA_PROXY": "0", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}
    assert r["processes"] == [], r["processes"]  # no Serve proxy actor, dashboard head or autoscaler monitor
