"""The extension's front-end unit tests (vitest, `extension/src/__tests__/`) run as part of the suite."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EXT = Path(__file__).resolve().parents[2] / "extension"


def test_vitest_data_layer():
    if not (EXT / "node_modules").is_dir() or shutil.which("node") is None:
        if os.environ.get("CI"):
            pytest.fail("extension/node_modules missing: run `bash extension/build.sh` before the tests")
        pytest.skip("extension not installed (bash extension/build.sh)")
    jlpm = Path(sys.executable).with_name("jlpm")
    cmd = [str(jlpm)] if jlpm.exists() else [sys.executable, "-m", "jupyterlab.jlpmapp"]
    out = subprocess.run([*cmd, "test"], cwd=EXT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "passed" in out.stdout
