"""The Tinker cookbook recipes (unmodified SDK), run in-process with short settings against the shared real
server; each asserts learning from the recipe's RESULT."""

from __future__ import annotations

import pytest
from _cookbook import GRPO_STEPS, assert_grpo_learned, run_script

pytestmark = pytest.mark.integration
pytest.importorskip("tinker")


@pytest.fixture(autouse=True)
def _no_telemetry(monkeypatch):
    monkeypatch.setenv("TINKER_TELEMETRY", "0")


def test_lora_sft_loss_falls(twinkle_server):
    r = run_script("tinker", "lora", twinkle_server, steps=8, batch_size=8)
    assert r["last_loss"] < 0.8 * r["first_loss"], r["losses"]
    assert r["path"].startswith("tinker://")


def test_self_cognition_loss_falls(twinkle_server):
    r = run_script("tinker", "self_cognition", twinkle_server, steps=8, batch_size=8)
    assert r["last_loss"] < 0.8 * r["first_loss"], r["losses"]


def test_sample_recipe(twinkle_server):
    r = run_script("tinker", "sample", twinkle_server, num_samples=2, max_tokens=6)
    assert len(r["completions"]) == 2
    assert all(c["stop_reason"] in ("stop", "length") and c["tokens"] for c in r["completions"])
    assert r["prompt_logprobs"][0] is None and all(v is not None for v in r["prompt_logprobs"][1:])


def test_dpo_preference_accuracy_rises(twinkle_server):
    # raw preference accuracy (chosen answer more likely than rejected), measured on the base model before
    # training and on the adapter after: the base model prefers the old, shorter name
    r = run_script("tinker", "dpo", twinkle_server, steps=15)
    assert r["accuracy_after"] > r["accuracy_before"], r
    assert r["accuracy_before"] <= 0.25 and r["accuracy_after"] >= 0.9, r
    assert r["losses"][-1] < 0.5 * r["losses"][0], r["losses"]


def test_short_math_grpo_reward_rises(twinkle_server):
    assert_grpo_learned(run_script("tinker", "short_math_grpo", twinkle_server, rl_steps=GRPO_STEPS))
