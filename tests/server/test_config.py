"""Server config schema and the twinkle-server CLI (check-config, print-config, keys)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from twinkle.server.cli import main
from twinkle.server.config import ConfigError, load_config, parse_config
from twinkle.server.store import Store

ROOT = Path(__file__).resolve().parents[2]
COOKBOOK = sorted((ROOT / "cookbook" / "client" / "server").glob("*/server_config.yaml"))


def _write(tmp_path: Path, data: dict) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def _minimal(tmp_path: Path, **extra) -> dict:
    return {
        "persistence": {"sqlite_path": str(tmp_path / "db.sqlite"), "checkpoint_root": str(tmp_path / "ck")},
        "models": [{"name": "mock", "backend": "mock", "model_id": "mock://tiny"}],
        **extra,
    }


def test_cookbook_configs_are_valid():
    names = {p.parent.name for p in COOKBOOK}
    assert {"transformer", "megatron", "mock"} <= names
    backends = {p.parent.name: load_config(p).models[0].backend for p in COOKBOOK}
    assert backends["transformer"] == "transformers"
    assert backends["megatron"] == "megatron"
    assert backends["mock"] == "mock"
    assert load_config(ROOT / "cookbook/client/server/transformer/server_config.yaml").models[0].model_id == "builtin://tiny"
    assert "hf://Qwen/Qwen3-0.6B" in (ROOT / "cookbook/client/server/transformer/server_config.yaml").read_text()


def test_defaults(tmp_path):
    cfg = parse_config(_minimal(tmp_path))
    assert cfg.http.host == "0.0.0.0" and cfg.http.port == 8000
    m = cfg.models[0]
    assert m.replicas == 1 and m.served_name == "mock"
    assert cfg.model("mock") is m and cfg.model("mock://tiny") is m and cfg.model("other") is None
    unnamed = parse_config({"models": [{"backend": "transformers", "model_id": "builtin://tiny"}]})
    assert unnamed.models[0].served_name == "builtin://tiny"
    # the dumped form validates again (the Ray gateway rebuilds the config from it)
    again = parse_config(unnamed.model_dump(mode="json"))
    assert again.models[0].served_name == "builtin://tiny"


@pytest.mark.parametrize(
    "mutate, key, where",
    [
        (lambda d: d.update(htpp={}), "htpp", "<top level>"),
        (lambda d: d["models"][0].update(replicaz=2), "replicaz", "models[0]"),
        (lambda d: d["models"][0].update(sampler={"max_tokenz": 3}), "max_tokenz", "models[0].sampler"),
        (lambda d: d["persistence"].update(sqlite=1), "sqlite", "persistence"),
        (lambda d: d["models"][0].update(megatron={"tensor_paralel_size": 2}), "tensor_paralel_size",
         "models[0].megatron"),
        (lambda d: d.update(http={"proxi": "serve"}), "proxi", "http"),
    ],
)
def test_unknown_key_is_named_with_its_location(tmp_path, mutate, key, where):
    data = _minimal(tmp_path)
    mutate(data)
    with pytest.raises(ConfigError) as ei:
        parse_config(data)
    assert f"unknown key {key!r} at {where}" in str(ei.value)


def test_bad_values(tmp_path):
    data = _minimal(tmp_path)
    data["models"][0]["backend"] = "vllm"
    with pytest.raises(ConfigError) as ei:
        parse_config(data)
    assert ei.value.field == "models[0].backend"
    data = _minimal(tmp_path)
    data["models"].append(dict(data["models"][0]))
    with pytest.raises(ConfigError, match="two models are named 'mock'"):
        parse_config(data)
    with pytest.raises(ConfigError, match="models"):
        parse_config({})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    for section, value in (("http", {"proxy": "nginx"}), ("megatron", {"launcher": "mpi"}),
                           ("megatron", {"data_parallel_size": 0})):
        data = _minimal(tmp_path)
        (data if section == "http" else data["models"][0])[section] = value
        with pytest.raises(ConfigError) as ei:
            parse_config(data)
        assert ei.value.field.endswith(f"{section}.{next(iter(value))}"), ei.value.field


def test_megatron_settings_reach_the_backend_options(tmp_path):
    from twinkle.server.app import worker_config

    data = _minimal(tmp_path)
    data["models"][0].update(backend="megatron", model_id="builtin://tiny", megatron={"tensor_parallel_size": 2})
    opts = worker_config(parse_config(data).models[0])["backend_options"]
    assert opts["tensor_parallel_size"] == 2 and opts["data_parallel_size"] == 1 and opts["launcher"] == "auto"
    assert opts["kv_cache"] is True
    import inspect

    from twinkle.model.megatron import MegatronBackend

    # every setting is an argument of the backend (the worker passes them as keyword arguments)
    assert set(opts) <= set(inspect.signature(MegatronBackend.__init__).parameters)


def test_check_config_cli(tmp_path, capsys):
    good = _write(tmp_path, _minimal(tmp_path))
    assert main(["check-config", "-c", str(good)]) == 0
    assert "config OK" in capsys.readouterr().out
    bad = _minimal(tmp_path)
    bad["models"][0]["max_adapterz"] = 3
    assert main(["check-config", "-c", str(_write(tmp_path, bad))]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'max_adapterz' at models[0]" in err


def test_print_config_round_trips(tmp_path, capsys):
    path = _write(tmp_path, _minimal(tmp_path))
    assert main(["print-config", "-c", str(path), "--format", "json", "--port", "8123"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["http"]["port"] == 8123 and data["models"][0]["max_adapters"] == 16
    assert parse_config(data).http.port == 8123
    assert main(["print-config", "-c", str(path), "--format", "yaml"]) == 0
    assert parse_config(yaml.safe_load(capsys.readouterr().out)).models[0].backend == "mock"


def test_keys_cli(tmp_path, capsys):
    path = _write(tmp_path, _minimal(tmp_path))
    assert main(["keys", "create", "--user", "alice", "-c", str(path)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    key = out[-1]
    assert key.startswith("tml-") and " " not in key and len(key) > 30
    store = Store(tmp_path / "db.sqlite")
    row = store.lookup_key(key)
    assert row is not None and row["user"] == "alice"
    raw = (tmp_path / "db.sqlite").read_bytes()
    assert key.encode() not in raw  # stored hashed
    assert main(["keys", "list", "-c", str(path)]) == 0
    listing = capsys.readouterr().out
    assert row["key_id"] in listing and "alice" in listing and key not in listing
    assert main(["keys", "revoke", row["key_id"], "-c", str(path)]) == 0
    assert store.lookup_key(key) is None
    assert main(["keys", "revoke", row["key_id"], "-c", str(path)]) == 1
    assert main(["keys", "create", "--user", "../evil", "-c", str(path)]) == 2
