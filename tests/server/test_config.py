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


def test_sample_dtype_reaches_the_transformers_backend(tmp_path):
    from twinkle.model.transformers import TransformersBackend
    from twinkle.server.app import worker_config
    from twinkle.server.backends import backend_kwargs

    data = _minimal(tmp_path)
    data["models"][0].update(backend="transformers", model_id="builtin://tiny", sample_dtype="bfloat16")
    kw = backend_kwargs(TransformersBackend, worker_config(parse_config(data).models[0]))
    assert kw["sample_dtype"] == "bfloat16"
    data["models"][0]["sample_dtype"] = "int8"
    with pytest.raises(ConfigError) as ei:
        parse_config(data)
    assert ei.value.field == "models[0].sample_dtype"
    data["models"][0].update(sample_dtype="bfloat16", backend="megatron")
    with pytest.raises(ConfigError, match="sample_dtype is a transformers backend setting"):
        parse_config(data)


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


# ---- one set of defaults; the scheduler section; custom backends ------------------------------------------


def test_defaults_live_in_the_schema_only():
    """The worker and the scheduler take their defaults from the schema (they used to disagree with it)."""
    from dataclasses import fields

    from twinkle.server.config import ModelConfig, SamplerSettings, SchedulerSettings
    from twinkle.server.scheduler import SchedulerConfig
    from twinkle.server.worker import ModelWorker

    # Every scheduler knob is settable in the YAML (a new knob must join the schema, with its default there).
    knobs = {f.name for f in fields(SchedulerConfig)} - {"first_seq_id"}
    renamed = {"max_pending_total": "max_queue", "max_sample_batch": None}  # None: sampler.max_batch_size
    assert {renamed.get(k, k) for k in knobs} - {None} == set(SchedulerSettings.model_fields)
    sched, d = SchedulerConfig(), SchedulerSettings()
    for k in knobs - set(renamed):
        assert getattr(sched, k) == getattr(d, k), k
    assert (sched.batch_token_budget, sched.max_pending_total, sched.seq_grace_s, sched.sampler_cache_size) == (
        d.batch_token_budget, d.max_queue, d.seq_grace_s, d.sampler_cache_size)
    assert sched.max_sample_batch == SamplerSettings().max_batch_size
    import asyncio

    w = ModelWorker({"backend": "mock", "model_id": "mock://tiny"})
    try:
        for key in ("max_adapters", "max_lora_rank", "max_tokens_per_request"):
            assert getattr(w, key) == ModelConfig.model_fields[key].default, key
        assert w._scheduler.config.batch_token_budget == d.batch_token_budget
    finally:
        asyncio.run(w.close())


def test_scheduler_section_is_accepted_printed_and_aliased(tmp_path, capsys):
    data = _minimal(tmp_path)
    data["models"][0]["scheduler"] = {"batch_token_budget": 512, "seq_grace_s": 0.25, "max_queue": 9}
    path = _write(tmp_path, data)
    m = load_config(path).models[0]
    assert (m.scheduler.batch_token_budget, m.scheduler.seq_grace_s, m.scheduler.max_queue) == (512, 0.25, 9)
    assert main(["print-config", "-c", str(path), "--format", "json"]) == 0
    shown = json.loads(capsys.readouterr().out)["models"][0]
    assert shown["scheduler"]["batch_token_budget"] == 512 and shown["scheduler"]["seq_grace_s"] == 0.25
    assert "max_queue" not in shown and "batch_token_budget" not in shown  # one place in the printed form
    assert main(["print-config", "-c", str(path)]) == 0
    assert "scheduler:" in capsys.readouterr().out
    # Older configs name two knobs at the model's top level: they land in the section.
    old = _minimal(tmp_path)
    old["models"][0].update(batch_token_budget=300, max_queue=5)
    m = parse_config(old).models[0]
    assert (m.scheduler.batch_token_budget, m.scheduler.max_queue) == (300, 5)
    again = parse_config({**old, "models": [m.model_dump(mode="json")]}).models[0]  # the dump validates again
    assert again.scheduler == m.scheduler
    both = _minimal(tmp_path)
    both["models"][0].update(batch_token_budget=300, scheduler={"batch_token_budget": 400})
    with pytest.raises(ConfigError) as e:
        parse_config(both)
    assert "disagree" in str(e.value)
    bad = _minimal(tmp_path)
    bad["models"][0]["scheduler"] = {"batch_token_budgt": 1}
    with pytest.raises(ConfigError) as e:
        parse_config(bad)
    assert e.value.field == "models[0].scheduler.batch_token_budgt"
    bad["models"][0]["scheduler"] = {"seq_grace_s": -1}
    with pytest.raises(ConfigError):
        parse_config(bad)


def _worker_from_yaml(tmp_path, scheduler):
    from twinkle.server.app import worker_config
    from twinkle.server.worker import ModelWorker

    data = _minimal(tmp_path)
    if scheduler:
        data["models"][0]["scheduler"] = scheduler
    return ModelWorker(worker_config(load_config(_write(tmp_path, data)).models[0]))


def test_scheduler_section_changes_behaviour(tmp_path):
    """``scheduler.seq_grace_s`` in the YAML: a request whose seq_id is ahead waits that long for the gap."""
    import asyncio

    from twinkle.server.ops import ForwardBackwardOp
    from twinkle.types import LoraConfig, datum_from_tokens

    data = [datum_from_tokens([5, 9, 17, 33])]

    async def wait_for_gap(worker) -> bool:
        """Whether seq_id 3 ran within 0.5 s although seq_id 2 never came."""
        await worker.create_adapter("a", LoraConfig(rank=2))
        await worker.execute("a", ForwardBackwardOp(data=data), seq_id=1)
        ahead = asyncio.ensure_future(worker.execute("a", ForwardBackwardOp(data=data), seq_id=3))
        done, _ = await asyncio.wait([ahead], timeout=0.5)
        await worker.close()
        if not done:
            ahead.cancel()
        await asyncio.gather(ahead, return_exceptions=True)
        return bool(done)

    fast = _worker_from_yaml(tmp_path, {"seq_grace_s": 0.05})
    assert asyncio.run(wait_for_gap(fast)) is True
    default = _worker_from_yaml(tmp_path, None)
    assert asyncio.run(wait_for_gap(default)) is False


_CUSTOM = '''
from twinkle.model.mock import MockBackend


class GreetingBackend(MockBackend):
    """A custom backend: a MockBackend with one constructor option of its own."""

    name = "greeting"

    def __init__(self, model_id="mock://tiny", *, greeting="hi", seed=0, **kw):
        super().__init__("mock://tiny", seed=seed)
        self.greeting = greeting
'''


def test_custom_backend_by_module_and_class(tmp_path, monkeypatch):
    """``backend: package.module:Class`` works: the contract in docs/models.md (a Backend subclass, importable
    where the worker runs, constructor options from ``backend_options`` and the matching model keys)."""
    import asyncio

    from twinkle.server.app import worker_config
    from twinkle.server.ops import ForwardBackwardOp
    from twinkle.server.worker import ModelWorker
    from twinkle.types import LoraConfig, datum_from_tokens

    (tmp_path / "twinkle_custom_backend_demo.py").write_text(_CUSTOM)
    monkeypatch.syspath_prepend(str(tmp_path))
    data = _minimal(tmp_path)
    data["models"][0].update(backend="twinkle_custom_backend_demo:GreetingBackend", model_id="anything",
                             backend_options={"greeting": "hello"})
    m = load_config(_write(tmp_path, data)).models[0]
    w = ModelWorker(worker_config(m))
    assert type(w.backend).__name__ == "GreetingBackend" and w.backend.greeting == "hello"

    async def train() -> float:
        await w.create_adapter("a", LoraConfig(rank=2))
        out = await w.execute("a", ForwardBackwardOp(data=[datum_from_tokens([5, 9, 17, 33])]))
        return out.metrics["loss:sum"]

    async def train_and_close() -> float:
        try:
            return await train()
        finally:
            await w.close()

    assert asyncio.run(train_and_close()) > 0
    for backend, field in (("nope", "models[0].backend"), ("os:path:x", "models[0].backend")):
        bad = _minimal(tmp_path)
        bad["models"][0]["backend"] = backend
        with pytest.raises(ConfigError) as e:
            parse_config(bad)
        assert e.value.field == field
    builtin = _minimal(tmp_path)
    builtin["models"][0]["backend_options"] = {"x": 1}
    with pytest.raises(ConfigError):
        parse_config(builtin)
    # check-config imports a custom backend: a missing module or a class that is not a Backend is named there.
    assert main(["check-config", "-c", str(_write(tmp_path, data))]) == 0
    for target in ("no_such_module_xyz:Backend", "json:JSONDecoder"):
        data["models"][0]["backend"] = target
        assert main(["check-config", "-c", str(_write(tmp_path, data))]) == 2
    notabackend = _minimal(tmp_path)
    notabackend["models"][0].update(backend="json:JSONDecoder")
    with pytest.raises(Exception) as e:
        ModelWorker(worker_config(parse_config(notabackend).models[0]))
    assert "not a twinkle Backend" in str(e.value)
