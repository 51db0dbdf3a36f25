"""``${NAME}`` / ``${NAME:-default}`` in a config file come from the environment (the e2e config uses them)."""

from __future__ import annotations

from pathlib import Path

import pytest

from twinkle.server.config import ConfigError, load_config

E2E = Path(__file__).resolve().parents[2] / "cookbook" / "client" / "server" / "transformer" / "server_config_e2e.yaml"


def test_e2e_config_defaults_and_environment(monkeypatch, tmp_path) -> None:
    for k in ("TWINKLE_E2E_PORT", "TWINKLE_E2E_ROOT", "TWINKLE_E2E_OTLP"):
        monkeypatch.delenv(k, raising=False)
    cfg = load_config(E2E)
    assert cfg.http.port == 8000 and cfg.persistence.sqlite_path == "/tmp/twinkle-e2e/server.db"
    assert [m.model_id for m in cfg.models] == ["builtin://tiny", "builtin://tiny-vl"] and cfg.telemetry.enabled
    monkeypatch.setenv("TWINKLE_E2E_PORT", "9123")
    monkeypatch.setenv("TWINKLE_E2E_ROOT", str(tmp_path))
    monkeypatch.setenv("TWINKLE_E2E_OTLP", "http://127.0.0.1:4999")
    cfg = load_config(E2E)
    assert cfg.http.port == 9123 and cfg.persistence.checkpoint_root == f"{tmp_path}/checkpoints"
    assert cfg.telemetry.otlp.endpoint == "http://127.0.0.1:4999"


def test_unset_variable_without_default_names_the_key(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("TWINKLE_NOPE", raising=False)
    p = tmp_path / "c.yaml"
    p.write_text("persistence: {sqlite_path: '${TWINKLE_NOPE}/x.db'}\nmodels: [{backend: mock, model_id: mock://tiny}]\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "persistence.sqlite_path" in str(e.value) and "TWINKLE_NOPE" in str(e.value)
    p.write_text("persistence: {sqlite_path: 'cost $5.db'}\nmodels: [{backend: mock, model_id: mock://tiny}]\n")
    assert load_config(p).persistence.sqlite_path == "cost $5.db"
