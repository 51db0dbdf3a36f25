"""``twinkle.server.launch()`` is a library call: it must leave no process-global side effect on the caller
that breaks it. ``import pandas`` works after it (the launcher shadows pandas only while Ray and Serve start).
Ray and Serve are stubbed: this checks the launcher's own bookkeeping in a fresh interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("pandas")

SCRIPT = textwrap.dedent("""
    import sys, threading, types
    assert "pandas" not in sys.modules
    from twinkle.server import launcher
    from twinkle.server.config import parse_config

    fake_serve = types.SimpleNamespace(start=lambda **kw: None, run=lambda *a, **kw: None)
    fake_app = types.ModuleType("twinkle.server.app")
    fake_app.build_serve_app = lambda cfg, **kw: None
    fake_app.serve_logging_config = lambda *a, **kw: {}
    sys.modules["twinkle.server.app"] = fake_app
    ray = types.ModuleType("ray"); ray.serve = fake_serve
    sys.modules["ray"] = ray; sys.modules["ray.serve"] = fake_serve
    for name in ("reap_state", "prepare_port"):
        setattr(launcher, name, lambda *a, **kw: 0)
    launcher.mark_launch = lambda *a, **kw: None
    launcher._init_ray = lambda *a, **kw: None
    launcher._preimport = lambda: threading.Thread(target=lambda: None)
    launcher.wait_healthy = lambda *a, **kw: True
    launcher._controller_options = lambda *a, **kw: {}
    cfg = parse_config({"persistence": {"sqlite_path": sys.argv[1] + "/db.sqlite",
                                        "checkpoint_root": sys.argv[1] + "/ck"},
                        "models": [{"name": "mock", "backend": "mock", "model_id": "mock://tiny"}]})
    orig = launcher._preimport
    def started():
        t = orig(); t.start(); return t
    launcher._preimport = started
    url = launcher.launch(cfg, block=False)
    import pandas
    print("ok", url, pandas.__name__)
""")


def test_import_pandas_works_after_launch(tmp_path: Path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ok http://" in out.stdout and "pandas" in out.stdout


def test_replica_messages_fit_the_largest_accepted_request():
    from twinkle.server.launcher import replica_message_limit

    assert replica_message_limit(64 << 20) == 8 * (64 << 20) > 4 << 20  # Serve's own default is 4 MB
    assert replica_message_limit(1024) == 64 << 20
    assert replica_message_limit(1 << 40) == (1 << 31) - 1
