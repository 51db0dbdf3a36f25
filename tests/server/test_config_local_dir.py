"""A local-directory ``model_id`` without ``name``: the config check and the gateway (which re-validates the
dumped config inside its Ray replica) agree — the name defaults to the directory's last component."""

from __future__ import annotations

import pytest

from twinkle.server.config import ConfigError, ServerConfig, parse_config


@pytest.mark.parametrize("model_id, name", [
    ("/srv/models/Qwen3-0.6B", "Qwen3-0.6B"), ("/srv/models/qwen/", "qwen"), ("./local/tiny", "tiny"),
    ("builtin://tiny", "builtin://tiny"), ("org/name", "org/name"),
])
def test_default_name_survives_the_gateway_round_trip(model_id, name):
    cfg = parse_config({"models": [{"backend": "mock", "model_id": model_id}]})
    assert cfg.models[0].served_name == name
    again = ServerConfig.model_validate(cfg.model_dump(mode="json"))  # what the gateway replica does
    assert again.models[0].served_name == name
    assert cfg.model(model_id) is cfg.models[0]  # clients may still pass the model_id itself


def test_an_unusable_default_name_is_refused_by_check_config():
    with pytest.raises(ConfigError, match="set 'name'"):
        parse_config({"models": [{"backend": "mock", "model_id": "/srv/models/qwen 3 (copy)"}]})
