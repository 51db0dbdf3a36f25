"""The native-client cookbook scripts, run in-process with short settings against the shared real server;
each asserts learning from the script's RESULT. Also the modelscope launcher (URL/key/model from env)."""

from __future__ import annotations

import json
import runpy

import pytest
from _cookbook import COOKBOOK, GRPO_STEPS, assert_grpo_learned, run_script

pytestmark = pytest.mark.integration


def test_self_cognition_names_the_model(twinkle_server):
    r = run_script("twinkle", "self_cognition", twinkle_server)
    assert r["last_loss"] < 0.5 * r["first_loss"], r["losses"]
    assert "Twinkle" not in r["before"]
    assert "Twinkle" in r["after"], r["after"]
    assert r["path"].startswith("tinker://")


def test_sample_base_and_trained_adapter(twinkle_server):
    r = run_script("twinkle", "sample", twinkle_server, num_samples=2, max_tokens=6)
    assert len(r["completions"]) == 2
    for c in r["completions"]:
        assert c["stop_reason"] in ("stop", "length") and c["tokens"]
        assert len(c["logprobs"]) == len(c["tokens"]) and all(lp <= 0 for lp in c["logprobs"])
    assert r["prompt_logprobs"][0] is None and all(v is not None for v in r["prompt_logprobs"][1:])


def test_dpo_preference_accuracy_rises(twinkle_server):
    r = run_script("twinkle", "dpo", twinkle_server, steps=15)
    assert r["accuracy_before"] <= 0.25 and r["accuracy_after"] >= 0.9, r
    assert r["losses"][-1] < 0.5 * r["losses"][0]


def test_short_math_grpo_reward_rises(twinkle_server):
    assert_grpo_learned(run_script("twinkle", "short_math_grpo", twinkle_server, rl_steps=GRPO_STEPS))


def test_modelscope_launcher_takes_url_key_and_model_from_env(twinkle_server, monkeypatch, capsys):
    for var in ("TWINKLE_SERVER_URL", "TWINKLE_API_KEY", "TWINKLE_BASE_MODEL", "TWINKLE_MODEL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MODELSCOPE_SERVER_URL", twinkle_server.url)
    monkeypatch.setenv("MODELSCOPE_API_KEY", twinkle_server.api_key)
    monkeypatch.setenv("MODELSCOPE_MODEL", twinkle_server.base_model)
    launcher = COOKBOOK / "twinkle" / "modelscope" / "sample.py"
    monkeypatch.setattr("sys.argv", [str(launcher), "--num_samples=1", "--max_tokens=3"])
    runpy.run_path(str(launcher), run_name="__main__")
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("RESULT ")][-1]
    assert len(json.loads(line[len("RESULT "):])["completions"]) == 1

    monkeypatch.delenv("MODELSCOPE_API_KEY")
    monkeypatch.delenv("TWINKLE_API_KEY")  # the launcher exported it (monkeypatch restores the variables after)
    with pytest.raises(SystemExit, match="TWINKLE_API_KEY"):
        runpy.run_path(str(launcher), run_name="__main__")
