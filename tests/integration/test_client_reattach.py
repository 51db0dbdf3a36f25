"""A client PROCESS is killed (SIGKILL) mid-training; a new process re-attaches (``Session.resume()`` from the
local state file, or ``connect(..., session_id=...)``) and the next steps give the same losses as a run that
was never interrupted (same adapter weights, same optimizer state)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]

# The "notebook": the same cells before and after the restart. MODE=train trains forever (printing each
# finished step) until it is killed; MODE=resume re-attaches and trains N more steps; MODE=control trains
# TOTAL steps in one go. The data loader is positioned at the run's step, as a re-run notebook cell would be.
CLIENT = textwrap.dedent("""
    import json, os, sys, time
    import twinkle_client
    from twinkle.data import ChatEncoder, DataLoader, self_cognition_dataset
    from twinkle.types import LoraConfig
    from twinkle_client.model import TransformersModel

    mode, url, key = os.environ["MODE"], os.environ["URL"], os.environ["KEY"]
    if mode == "resume":
        sid = os.environ.get("SESSION_ID")
        session = (twinkle_client.connect(url, key, session_id=sid) if sid else twinkle_client.Session.resume())
    else:
        session = twinkle_client.connect(url, key)
    model = TransformersModel("builtin://tiny", seed=0)
    run = model.add_adapter_to_model("killed", LoraConfig(rank=8, alpha=16, seed=0))
    model.set_optimizer("AdamW", lr=3e-3, grad_clip_norm=1.0)
    data = self_cognition_dataset("Twinkle", "the Twinkle team").map(ChatEncoder(model.get_tokenizer(), max_length=96))
    batches = DataLoader(data, batch_size=4, shuffle=True, seed=0).cycle()
    for _ in range(run.step):
        next(batches)
    print(json.dumps({"event": "ready", "session_id": session.session_id, "run_id": run.run_id,
                      "step": run.step}), flush=True)
    n = {"train": 10**6, "resume": int(os.environ.get("N", "2")), "control": int(os.environ.get("N", "5"))}[mode]
    for i in range(n):
        out = model.forward_backward(inputs=next(batches))
        model.clip_grad_and_step()
        print(json.dumps({"event": "step", "step": run.step + i + 1, "loss": out.metrics["loss:sum"]}), flush=True)
        if mode == "train":
            time.sleep(0.3)
    if mode != "train":
        session.close()
""")


def _env(tmp: Path, **kw: str) -> dict[str, str]:
    return {**os.environ, "TWINKLE_HOME": str(tmp), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false", **kw}


def _run(script: Path, env: dict[str, str]) -> list[dict]:
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]


def _train_until_killed(script: Path, env: dict[str, str], kill_after: int) -> tuple[dict, list[dict]]:
    proc = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    events: list[dict] = []
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                pytest.fail("client exited early: " + proc.stderr.read()[-3000:])
            if line.startswith("{"):
                events.append(json.loads(line))
                if events[-1]["event"] == "step" and events[-1]["step"] == kill_after:
                    proc.send_signal(signal.SIGKILL)  # mid-training: the loop would go on forever
                    break
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    return events[0], [e for e in events if e["event"] == "step"]


@pytest.mark.parametrize("how", ["Session.resume", "session_id"])
def test_killed_client_process_reattaches_with_same_next_step_loss(twinkle_server, tmp_path, how):
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    url, key = twinkle_server.url, twinkle_server.api_key
    control = _run(script, _env(tmp_path / "control-home", MODE="control", URL=url, KEY=key, N="5"))
    control_losses = [e["loss"] for e in control if e["event"] == "step"]

    home = tmp_path / "home"
    ready, before = _train_until_killed(script, _env(home, MODE="train", URL=url, KEY=key), kill_after=3)
    assert [e["step"] for e in before] == [1, 2, 3]
    extra = {"SESSION_ID": ready["session_id"]} if how == "session_id" else {}
    after = _run(script, _env(home, MODE="resume", URL=url, KEY=key, N="2", **extra))
    resumed = after[0]
    assert resumed["event"] == "ready"
    assert resumed["session_id"] == ready["session_id"] and resumed["run_id"] == ready["run_id"]
    assert resumed["step"] == 3  # the run is where the killed process left it
    steps = [e for e in after if e["event"] == "step"]
    assert [e["step"] for e in steps] == [4, 5]
    losses = [e["loss"] for e in before] + [e["loss"] for e in steps]
    assert losses == pytest.approx(control_losses, rel=1e-5, abs=1e-5)  # steps 4 and 5 as if never interrupted
