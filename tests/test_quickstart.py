"""The quickstart really teaches the toy model its name: loss falls by more than half, the answer names it."""

from __future__ import annotations

import io

import pytest

from twinkle.cli import main
from twinkle.quickstart import QuickstartConfig, QuickstartResult, format_summary, run_quickstart


@pytest.fixture(autouse=True)
def _one_thread():
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.slow
def test_quickstart_learns_the_name(tmp_path):
    cfg = QuickstartConfig(name="Nova", steps=60, seed=0, output_dir=str(tmp_path))
    res = run_quickstart(cfg, progress=False)
    assert res.steps == 60 and len(res.losses) == 60
    assert res.last_loss < 0.5 * res.first_loss, res.losses
    assert "Nova" in res.answer, res.answer
    assert res.passed


def test_summary_table_reports_the_run():
    res = QuickstartResult("builtin://tiny", "Twinkle", [8.0, 4.0, 2.5], 1.25, "who are you?", "I am Twinkle.",
                           "builtin://tiny: a toy")
    text = format_summary(res)
    assert "| first loss   | 8.0000" in text and "| last loss    | 2.5000" in text and "| steps        | 3" in text
    assert "A: I am Twinkle." in text and text.count("OK:") == 1
    failed = format_summary(QuickstartResult("m", "Twinkle", [8.0, 7.0], 1.0, "q", "I am Bob."))
    assert "NOT LEARNED" in failed and "did not fall by half" in failed and "'Twinkle'" in failed


def test_cli_bad_option_names_the_field(capsys):
    assert main(["quickstart", "--steps", "0", "--quiet"]) == 2
    assert "field: steps" in capsys.readouterr().err


def test_progress_bar_is_drawn(tmp_path):
    buf = io.StringIO()
    res = run_quickstart(QuickstartConfig(steps=2, output_dir=str(tmp_path)), progress=True, file=buf)
    assert res.steps == 2
    assert "2/2" in buf.getvalue() and "loss=" in buf.getvalue()


def test_python_dash_m_twinkle_lists_the_builtin_models(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "TWINKLE_HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "twinkle", "models"], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "builtin://tiny" in r.stdout and "builtin://small" in r.stdout and "not built yet" in r.stdout


def test_summary_lists_each_phase_time():
    res = QuickstartResult("builtin://tiny", "Twinkle", [8.0, 2.0], 70.0, "who are you?", "I am Twinkle.",
                           timings={"server start": 40.0, "training": 20.5, "sampling": 0.25, "shutdown": 9.0},
                           extra={"where": "local server (twinkle_client)"})
    text = format_summary(res)
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    names = [r.split("|")[1].strip() for r in rows]
    assert names[names.index("server start"):] == ["server start", "training", "sampling", "shutdown", "total"]
    assert "| training     | 20.5 s" in text and "| total        | 70.0 s" in text
    assert "| where        | local server (twinkle_client)" in text


def test_cli_in_process_path_runs_in_this_process(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("TWINKLE_HOME", str(tmp_path))
    # two steps cannot teach the name: the command runs end to end and says so (exit code 1)
    assert main(["quickstart", "--in-process", "--quiet", "--steps", "2"]) == 1
    out = capsys.readouterr().out
    assert "(in this process)" in out and "| where        | this process (twinkle.model)" in out
    assert "| steps        | 2" in out and "| training     |" in out and "NOT LEARNED" in out


def test_cli_server_choices_exclude_each_other(capsys):
    with pytest.raises(SystemExit) as e:
        main(["quickstart", "--in-process", "--url", "http://127.0.0.1:1"])
    assert e.value.code == 2 and "not allowed with" in capsys.readouterr().err


def test_cli_url_that_answers_nothing_is_a_clear_error(capsys, monkeypatch):
    from twinkle.local_server import free_port

    monkeypatch.setattr("twinkle_client.session.CONNECT_RETRY_SECONDS", 0.2)  # "no answer" sooner than 2 s

    code = main(["quickstart", "--quiet", "--url", f"http://127.0.0.1:{free_port()}", "--api-key", "k"])
    assert code == 2
    assert "error:" in capsys.readouterr().err
