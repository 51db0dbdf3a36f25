"""``models[].placement``: which workers run inside the gateway replica on Ray Serve (no Ray started here)."""

from __future__ import annotations

import pytest

from twinkle.server.app import _gateway_actor_options, worker_config
from twinkle.server.config import ConfigError, parse_config

MOCK = {"name": "mock", "backend": "mock", "model_id": "mock://tiny"}
TINY = {"backend": "transformers", "model_id": "builtin://tiny"}


def _in_gateway(models: list[dict]) -> list[bool]:
    cfg = parse_config({"models": models})
    return [cfg.in_gateway(m) for m in cfg.models]


def test_auto_places_the_only_single_replica_model_in_the_gateway():
    assert _in_gateway([MOCK]) == [True]
    assert _in_gateway([TINY]) == [True]
    assert _in_gateway([MOCK, TINY]) == [False, False]  # several models: each its own replica
    assert _in_gateway([{**MOCK, "replicas": 2}]) == [False]
    assert _in_gateway([{**TINY, "backend": "megatron"}]) == [False]  # megatron starts processes of its own


def test_explicit_placement_wins():
    assert _in_gateway([{**MOCK, "placement": "replica"}]) == [False]
    assert _in_gateway([{**MOCK, "placement": "gateway"}, TINY]) == [True, False]


def test_gateway_placement_needs_one_replica():
    with pytest.raises(ConfigError, match="placement 'gateway' hosts one replica"):
        parse_config({"models": [{**MOCK, "placement": "gateway", "replicas": 2}]})
    with pytest.raises(ConfigError, match="placement"):
        parse_config({"models": [{**MOCK, "placement": "elsewhere"}]})


def test_gateway_reserves_what_its_workers_ask_for():
    cfg = parse_config({"models": [
        {**MOCK, "placement": "gateway", "ray_actor_options": {"num_cpus": 2, "num_gpus": 1, "resources": {"a": 1}}},
        {**TINY, "placement": "gateway", "ray_actor_options": {"num_cpus": 0.5, "resources": {"a": 2, "b": 1}}},
    ]})
    assert _gateway_actor_options(cfg.models) == {"num_cpus": 2.5, "num_gpus": 1, "resources": {"a": 3, "b": 1}}
    assert _gateway_actor_options([]) == {"num_cpus": 0}


def test_placement_is_not_a_backend_option():
    cfg = parse_config({"models": [{**MOCK, "placement": "gateway"}]})
    assert "placement" not in worker_config(cfg.models[0])
