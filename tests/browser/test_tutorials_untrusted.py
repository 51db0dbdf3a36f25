"""Browser test: each committed tutorial, opened untrusted in JupyterLab (no kernel run), shows its curves as
images and its samples as tables from the saved outputs — what a visitor on GitHub/nbviewer sees too.
No Twinkle server needed. Screenshots go to ``artifacts/browser-tutorials/``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from browser_env import CHROMIUM, EXT, REPO, missing
from jupyter_proc import JupyterServer

ART = REPO / "artifacts" / "browser-tutorials"
pytestmark = [pytest.mark.browser, pytest.mark.slow]
NOTEBOOKS = sorted(p.name for p in (REPO / "notebooks").glob("*.ipynb"))


def _expected(name: str) -> tuple[int, int]:
    """(curve images, sample tables) the saved outputs must show, from the notebook's own cells."""
    nb = json.loads((REPO / "notebooks" / name).read_text())
    src = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    curves = sum(1 for s in src if "LiveCurve(" in s or "compare(" in s)
    samples = sum(1 for s in src if "SampleViewer(" in s)
    return curves, samples


@pytest.mark.timeout(600)
def test_tutorials_show_images_when_untrusted(tmp_path):
    why = missing()
    if why:
        pytest.skip(why)
    work = tmp_path / "work"
    shutil.copytree(REPO / "notebooks", work, ignore=shutil.ignore_patterns("*.py", "*.cfg", "__pycache__"))
    labconfig = tmp_path / "cfg" / "labconfig"
    labconfig.mkdir(parents=True)
    (labconfig / "page_config.json").write_text(
        json.dumps({"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}))
    # render every cell (JupyterLab 4 otherwise only renders the cells in view)
    tracker = tmp_path / "settings" / "@jupyterlab" / "notebook-extension"
    tracker.mkdir(parents=True)
    (tracker / "tracker.jupyterlab-settings").write_text(json.dumps({"windowingMode": "none"}))
    env = {"TWINKLE_HOME": str(tmp_path / "home"), "JUPYTER_CONFIG_DIR": str(tmp_path / "cfg"),
           "JUPYTERLAB_SETTINGS_DIR": str(tmp_path / "settings"),
           "JUPYTER_DATA_DIR": str(tmp_path / "data"),  # a fresh notary: nothing is trusted
           "JUPYTER_RUNTIME_DIR": str(tmp_path / "rt")}
    lab = JupyterServer(work, env, app="lab", extra_args=["--LabApp.expose_app_in_browser=True"])
    if ART.exists():
        shutil.rmtree(ART)
    try:
        proc = subprocess.run(
            ["node", str(Path(__file__).with_name("tutorials.mjs"))],
            env={**os.environ, "LAB_URL": lab.url, "LAB_TOKEN": lab.token, "NOTEBOOKS": ",".join(NOTEBOOKS),
                 "ARTIFACTS": str(ART), "EXTENSION_DIR": str(EXT), "CHROMIUM": CHROMIUM},
            capture_output=True, text=True, timeout=500,
        )
    finally:
        lab.stop()
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line is not None, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(line[len("RESULT "):])
    assert res["ok"], res.get("error")
    for name in NOTEBOOKS:
        info = res["notebooks"][name]
        curves, samples = _expected(name)
        assert info["trusted"] is not True, name
        assert info["images"] >= curves, (name, info)
        assert info["sampleTables"] >= samples, (name, info)
        assert not info["reprText"] and not info["widgetErrors"], (name, info)
        assert (ART / f"untrusted-{name.replace('.ipynb', '')}.png").stat().st_size > 10_000
