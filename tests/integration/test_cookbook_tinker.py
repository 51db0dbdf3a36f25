"""Run the Tinker cookbook recipes (unmodified SDK) against a real server with short settings; check learning."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _tinker_server import server_for

pytestmark = pytest.mark.integration
pytest.importorskip("tinker")

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "cookbook" / "client" / "tinker" / "self_host"


@pytest.fixture(scope="module")
def srv(request):
    return server_for(request)


def run_recipe(srv, name: str, *flags: str, timeout: int = 600) -> dict:
    url, key = srv
    env = {k: v for k, v in os.environ.items() if not k.startswith("TINKER_")}
    env.update(TWINKLE_SERVER_URL=url, TWINKLE_API_KEY=key, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1",
               TINKER_TELEMETRY="0")
    out = subprocess.run([sys.executable, str(RECIPES / f"{name}.py"), *flags], capture_output=True, text=True,
                         env=env, timeout=timeout, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, out.stdout[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


def test_lora_sft_loss_falls(srv):
    r = run_recipe(srv, "lora", "--steps=8", "--batch_size=8")
    assert r["last_loss"] < 0.8 * r["first_loss"], r["losses"]
    assert r["path"].startswith("tinker://")


def test_self_cognition_loss_falls(srv):
    r = run_recipe(srv, "self_cognition", "--steps=8", "--batch_size=8")
    assert r["last_loss"] < 0.8 * r["first_loss"], r["losses"]


def test_sample_recipe(srv):
    r = run_recipe(srv, "sample", "--num_samples=2", "--max_tokens=6")
    assert len(r["completions"]) == 2
    assert all(c["stop_reason"] in ("stop", "length") and c["tokens"] for c in r["completions"])
    assert r["prompt_logprobs"][0] is None and all(v is not None for v in r["prompt_logprobs"][1:])


def test_dpo_preference_accuracy_rises(srv):
    r = run_recipe(srv, "dpo", "--steps=5", "--num_pairs=8")
    assert r["last_accuracy"] > r["first_accuracy"] and r["last_accuracy"] >= 0.75, r["accuracies"]
    assert r["losses"][-1] < r["losses"][0]


def test_short_math_grpo_reward_rises(srv):
    r = run_recipe(srv, "short_math_grpo", "--warmup_steps=10", "--rl_steps=12", "--group_size=8", timeout=900)
    rewards = r["rewards"]
    assert len(rewards) == 12 and max(rewards) > 0
    assert r["last_reward"] >= r["first_reward"], rewards
