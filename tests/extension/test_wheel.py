"""The wheel ships the prebuilt labextension and the server-extension config; a plain install enables both.

Needs the extension built first (``bash extension/build.sh``); skipped when it is not, except under CI
(``CI=true``), where a missing build is a failure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LABEXT = REPO / "twinkle_client" / "labextension"
NAME = "twinkle-jupyterlab"

pytestmark = pytest.mark.slow  # builds a wheel and pip-installs it into a fresh venv


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    if not (LABEXT / "package.json").is_file():
        if os.environ.get("CI") == "true":
            pytest.fail("twinkle_client/labextension is not built: run `bash extension/build.sh` before the tests")
        pytest.skip("labextension not built (run `bash extension/build.sh`)")
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(REPO)],
        check=True, cwd=out, capture_output=True,
    )
    (whl,) = out.glob("twinkle_serve-*.whl")
    return whl


def test_wheel_contains_labextension_and_server_config(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    data = [n for n in names if ".data/data/" in n]
    share = f"share/jupyter/labextensions/{NAME}/"
    assert any(n.endswith(share + "package.json") for n in data)
    assert any(n.endswith(share + "install.json") for n in data)
    statics = [n for n in data if (share + "static/") in n]
    built = sorted(p.name for p in (LABEXT / "static").iterdir())
    assert sorted(Path(n).name for n in statics) == built
    assert any(Path(n).name.startswith("remoteEntry.") for n in statics)
    cfg = [n for n in data if n.endswith("etc/jupyter/jupyter_server_config.d/twinkle_client.json")]
    assert len(cfg) == 1
    body = json.loads(zipfile.ZipFile(wheel).read(cfg[0]))
    assert body == {"ServerApp": {"jpserver_extensions": {"twinkle_client.jupyter_server": True}}}
    pkg = json.loads(zipfile.ZipFile(wheel).read(next(n for n in data if n.endswith(share + "package.json"))))
    assert pkg["name"] == NAME and "_build" in pkg["jupyterlab"]


def test_plain_pip_install_enables_both(wheel, tmp_path):
    """A fresh venv + `pip install --no-deps <wheel>` (jupyterlab borrowed from this environment via a .pth)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "_borrow_jupyter.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True, capture_output=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("JUPYTER")}
    env["PYTHONPATH"] = ""
    labs = subprocess.run([str(py), "-m", "jupyterlab.labextensions", "list"], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    out = labs.stdout + labs.stderr
    line = next((ln for ln in out.splitlines() if NAME in ln), "")
    assert str(venv / "share" / "jupyter" / "labextensions") in out
    assert "enabled" in line and "OK" in line and "twinkle-serve" in line, out
    srv = subprocess.run([str(py), "-m", "jupyter_server.extension.serverextension", "list"], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    text = srv.stdout + srv.stderr
    assert "twinkle_client.jupyter_server \x1b[32menabled" in text or "twinkle_client.jupyter_server enabled" in text, text
    assert str(venv / "etc" / "jupyter") in text
    # the installed copy (not the repository's) is what the server imports
    where = subprocess.run([str(py), "-c", "import twinkle_client.jupyter_server as m; print(m.__file__)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(venv))
