"""``LiveCurve(..., log_to=...)`` writes the same metrics to TensorBoard (tensorboardX), MLflow (a file store)
and Weights & Biases (offline mode), each read back from what the real package wrote: no network, no service."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from twinkle_client.widgets import LiveCurve

STEPS = [(1, 3.0), (2, 2.5), (3, 1.75)]


def _train(log_to: str, title: str) -> LiveCurve:
    curve = LiveCurve(("loss",), mode="text", title=title, log_to=log_to)
    for step, loss in STEPS:
        curve.log({"loss": loss, "grad_norm": loss / 2}, step=step)
    curve.close()
    return curve


def _events(path: Path) -> list:
    """The records of a TensorBoard event file (TFRecord framing: length, its CRC, data, its CRC)."""
    from tensorboardX.proto import event_pb2

    out, data = [], path.read_bytes()
    i = 0
    while i < len(data):
        (n,) = struct.unpack("<Q", data[i:i + 8])
        ev = event_pb2.Event()
        ev.ParseFromString(data[i + 12:i + 12 + n])
        out.append(ev)
        i += 12 + n + 4
    return out


def test_text_mode_without_a_total_logs_every_step(capsys):
    """``log()`` called directly (no ``range``/``iterate``, so no total): the progress bar must not break the
    second step (tqdm's truth value is undefined without a total)."""
    curve = LiveCurve(("loss",), mode="text", title="no total")
    for step, loss in STEPS:
        curve.log({"loss": loss}, step=step)
    curve.close()
    assert [p["loss"] for p in curve.history["default"]] == [x for _, x in STEPS]


def test_tensorboard(tmp_path, monkeypatch):
    pytest.importorskip("tensorboardX")
    monkeypatch.setenv("TWINKLE_TB_DIR", str(tmp_path))
    _train("tensorboard", "tb run")
    (f,) = list((tmp_path / "tb_run").glob("events.out.tfevents.*"))
    got = sorted((v.tag, ev.step, round(v.simple_value, 6)) for ev in _events(f) if ev.HasField("summary")
                 for v in ev.summary.value)
    want = sorted([("default/loss", s, x) for s, x in STEPS] + [("default/grad_norm", s, x / 2) for s, x in STEPS])
    assert got == want


def test_mlflow_file_store(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store in maintenance mode
    try:
        _train("mlflow", "mlflow run")
        run = mlflow.active_run()
        assert run is not None and run.info.run_name == "mlflow run"
        hist = mlflow.tracking.MlflowClient().get_metric_history(run.info.run_id, "default.loss")
        assert sorted((m.step, m.value) for m in hist) == STEPS
    finally:
        mlflow.end_run()


def test_wandb_offline(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    for k, v in {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true",
                 "WANDB_PROJECT": "twinkle-test"}.items():
        monkeypatch.setenv(k, v)
    try:
        _train("wandb", "wandb run")
        run = wandb.run
        assert run is not None and run.name == "wandb run" and run.project == "twinkle-test"
        assert run.summary["default/loss"] == STEPS[-1][1]
        assert run.summary["default/grad_norm"] == STEPS[-1][1] / 2
    finally:
        wandb.finish()
    assert list(tmp_path.glob("wandb/offline-run-*/run-*.wandb")), "the offline run file was written"
