"""Browser test: JupyterLab + the Twinkle panel against a real Twinkle server (Ray Serve, mock backend).

A notebook connects with ``%twinkle connect``, trains a few steps and saves a checkpoint; headless Chromium
(playwright-core, Debian's /usr/bin/chromium) checks that the panel lists the run, its loss sparkline grows,
the checkpoint appears, a load cell can be inserted, the checkpoint deleted after confirmation, and that a
wrong key and a stopped server are shown. Screenshots go to ``artifacts/browser/``.

Needs: ``bash extension/build.sh`` (labextension + node_modules/playwright-core) and ``apt-get install chromium``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from browser_env import CHROMIUM, EXT, KEY, REPO
from jupyter_proc import JupyterServer, free_port

ART = REPO / "artifacts" / "browser"

pytestmark = [pytest.mark.browser, pytest.mark.integration]


NOTEBOOK_CELLS = [
    "%load_ext twinkle_client\n%twinkle connect {url} --api-key {key}",
    (
        "import time\n"
        "from twinkle_client.model import MockModel\n"
        "model = MockModel(model_id='mock')\n"
        "model.add_adapter_to_model('default', {{'rank': 4}})\n"
        "model.set_optimizer('AdamW', lr=1e-2)\n"
        "batch = [{{'input_ids': [1, 2, 3, 4, 5, 6, 7, 8], 'labels': [2, 3, 4, 5, 6, 7, 8, 9]}}]\n"
        "for step in range(20):\n"
        "    model.forward_backward(inputs=batch)\n"
        "    model.clip_grad_and_step()\n"
        "    time.sleep(1.2)\n"
        "print('trained', model.run_id)"
    ),
    "path = model.save('step-20')\nprint(path)",
]


def _count(text: str) -> float:
    """``950`` / ``12.3k`` / ``2.5M`` (the panel's compact counts) as a number."""
    scale = {"k": 1e3, "M": 1e6, "G": 1e9}.get(text[-1:], 1.0)
    return float(text[:-1] if scale != 1.0 else text) * scale


def _notebook(url: str) -> dict:
    cells = [
        {"cell_type": "code", "metadata": {}, "execution_count": None, "outputs": [],
         "source": src.format(url=url, key=KEY)}
        for src in NOTEBOOK_CELLS
    ]
    return {"cells": cells, "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                         "language": "python"}},
            "nbformat": 4, "nbformat_minor": 5}


@pytest.mark.timeout(1200)
def test_panel_follows_training(panel_server, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "train.ipynb").write_text(json.dumps(_notebook(panel_server)))
    labconfig = tmp_path / "cfg" / "labconfig"
    labconfig.mkdir(parents=True)
    (labconfig / "page_config.json").write_text(
        json.dumps({"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}})
    )
    jp = tmp_path / "jupyter-path" / "labextensions"
    jp.mkdir(parents=True)
    (jp / "twinkle-jupyterlab").symlink_to(REPO / "twinkle_client" / "labextension")
    env = {"TWINKLE_HOME": str(tmp_path / "home"), "JUPYTER_PATH": str(jp.parent),
           "JUPYTER_CONFIG_DIR": str(tmp_path / "cfg"), "JUPYTER_RUNTIME_DIR": str(tmp_path / "rt")}
    lab = JupyterServer(work, env, app="lab", extra_args=["--LabApp.expose_app_in_browser=True"])
    if ART.exists():
        shutil.rmtree(ART)
    ART.mkdir(parents=True)
    try:
        proc = subprocess.run(
            ["node", str(Path(__file__).with_name("panel.mjs"))],
            env={**os.environ, "LAB_URL": lab.url, "LAB_TOKEN": lab.token, "NOTEBOOK": "train.ipynb",
                 "TWINKLE_KEY": KEY, "DEAD_URL": f"http://127.0.0.1:{free_port()}", "ARTIFACTS": str(ART),
                 "EXTENSION_DIR": str(EXT), "CHROMIUM": CHROMIUM},
            capture_output=True, text=True, timeout=540,
        )
    finally:
        (ART / "jupyter.log").write_text(lab.log())
        lab.stop()
    (ART / "browser.log").write_text(proc.stdout + proc.stderr)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line is not None, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(line[len("RESULT "):])
    assert res["ok"], res.get("error", "") + "\n" + "\n".join(res["steps"])

    assert res["palette"] == "Twinkle: Connect to server"
    assert res["notConnectedStatus"] == "Twinkle: not connected"
    first, later = res["sparkline"]
    assert later > first >= 1
    assert res["finalSpark"] >= later
    assert "default" in res["runText"] and "loss" in res["runText"]
    assert res["activeStatus"] == "Twinkle: connected · 1 active run"
    assert "queue " in res["loadText"] and "tokens/s (last 60 s, all users): trained" in res["loadText"]
    trained = [_count(t.split("your usage: ")[1].split(" trained")[0]) for t in (res["usageFirst"], res["usageLater"])]
    assert trained[1] > trained[0] > 0  # the caller's own usage grows while the notebook trains
    assert res["checkpoint"].startswith("tinker://") and res["checkpoint"].endswith("/weights/step-20")
    assert f'model.load("{res["checkpoint"]}")' in res["insertedCode"]
    assert "model = MockModel(model_id=\"mock\")" in res["insertedCode"]
    assert res["afterCancel"] == 1
    assert "rejected the API key" in res["badKeyMessage"]
    assert res["badKeyStatus"] == "Twinkle: API key rejected"
    assert "Cannot reach the Twinkle server" in res["downMessage"]
    assert res["downStatus"] == "Twinkle: server down"
    for name in ("01-not-connected", "04-sparkline-grew", "05-checkpoint", "08-bad-key", "09-server-down"):
        assert (ART / f"{name}.png").stat().st_size > 10_000
