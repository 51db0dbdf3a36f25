"""Screenshot: JupyterLab (headless Chromium) running ``notebooks/01_quickstart.ipynb`` with the live loss curve.

Starts a real Twinkle server (``notebooks/tutorial_server.py``; or the one named by ``TWINKLE_SERVER_URL`` /
``TWINKLE_API_KEY``), JupyterLab with those variables in its environment (the kernels inherit them), opens the
quickstart with its saved outputs cleared, runs all cells (``tests/browser/quickstart.mjs``, playwright-core
driving /usr/bin/chromium) and saves ``artifacts/quickstart-live.png`` (mid-training) and
``artifacts/quickstart.png`` (finished: the whole curve and the answer).

Needs: ``apt-get install -y chromium`` and ``extension/node_modules/playwright-core`` (``bash extension/build.sh``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EXT = REPO / "extension"
ART = REPO / "artifacts"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")

sys.path.insert(0, str(REPO / "tests" / "extension"))  # the Jupyter-server launcher shared with tests/extension
from jupyter_proc import JupyterServer  # noqa: E402

pytestmark = [pytest.mark.browser, pytest.mark.integration]


def _missing() -> str | None:
    if not Path(CHROMIUM).exists():
        return f"{CHROMIUM} missing (apt-get install -y chromium)"
    if not (EXT / "node_modules" / "playwright-core").is_dir():
        return "extension/node_modules/playwright-core missing (bash extension/build.sh)"
    if shutil.which("node") is None:
        return "node missing"
    return None


def _tutorial_server():
    spec = importlib.util.spec_from_file_location("_twinkle_tutorial_server", REPO / "notebooks" / "tutorial_server.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tutorial_server():
    why = _missing()
    if why:
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)
    ts = _tutorial_server()
    url, key = os.environ.get("TWINKLE_SERVER_URL"), os.environ.get("TWINKLE_API_KEY")
    if url and key:
        yield ts, url, key
        return
    handle = ts.start_server()
    try:
        yield ts, handle.url, handle.api_key
    finally:
        handle.stop()


def _cleared_quickstart(dest: Path) -> None:
    nb = json.loads((REPO / "notebooks" / "01_quickstart.ipynb").read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            cell["outputs"], cell["execution_count"] = [], None
    nb["metadata"].pop("widgets", None)
    dest.write_text(json.dumps(nb, indent=1))


def test_quickstart_screenshot_shows_live_curve(tutorial_server, tmp_path):
    ts, url, key = tutorial_server
    work = tmp_path / "work"
    work.mkdir()
    _cleared_quickstart(work / "01_quickstart.ipynb")
    cfg = tmp_path / "cfg"
    (cfg / "labconfig").mkdir(parents=True)
    (cfg / "labconfig" / "page_config.json").write_text(
        json.dumps({"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}))
    settings = tmp_path / "settings" / "@jupyterlab" / "notebook-extension"
    settings.mkdir(parents=True)  # render every cell (no windowing), so the curve's output is in the page
    (settings / "tracker.jupyterlab-settings").write_text(json.dumps({"windowingMode": "none"}))
    env = {**ts.tutorial_env(url, key, home=str(tmp_path / "home")), "JUPYTER_CONFIG_DIR": str(cfg),
           "JUPYTER_RUNTIME_DIR": str(tmp_path / "rt"), "JUPYTERLAB_SETTINGS_DIR": str(tmp_path / "settings")}
    lab = JupyterServer(work, env, app="lab", extra_args=["--LabApp.expose_app_in_browser=True"])
    ART.mkdir(exist_ok=True)
    try:
        proc = subprocess.run(
            ["node", str(Path(__file__).with_name("quickstart.mjs"))],
            env={**os.environ, "LAB_URL": lab.url, "LAB_TOKEN": lab.token, "NOTEBOOK": "01_quickstart.ipynb",
                 "ARTIFACTS": str(ART), "EXTENSION_DIR": str(EXT), "CHROMIUM": CHROMIUM},
            capture_output=True, text=True, timeout=900,
        )
    finally:
        lab.stop()
    (ART / "quickstart-browser.log").write_text(proc.stdout + proc.stderr)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line is not None, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(line[len("RESULT "):])
    assert res["ok"], res.get("error", "") + "\n" + "\n".join(res["steps"]) + "\n" + lab.log()[-3000:]
    live, final = res["live"], res["final"]
    assert 2 <= live["first"] <= live["later"] < 100, res["steps"]
    assert not live["stopDisabled"]  # mid-training: the Stop button is live
    # the loop ran all 100 steps, and the live widget gave way to its static PNG (renders in a saved notebook)
    assert final["steps"] == "100" and final["pngs"] >= 1 and final["live"] is None, final
    assert "Twinkle" in res["answer"]
    for name in ("quickstart-live.png", "quickstart.png"):
        assert (ART / name).stat().st_size > 20_000
