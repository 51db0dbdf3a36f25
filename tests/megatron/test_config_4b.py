"""``cookbook/client/server/megatron/server_config_4b.yaml`` cannot rot: it passes ``check-config`` (offline: no
download), its tensor-parallel size divides Qwen3-4B's heads, KV heads and FFN, and :func:`scaled_down_4b` turns it
into the SAME parallel layout on builtin://tiny (fp32, no GPUs), which ``test_parallel_server.py`` launches on a
real server (TP = 2 over gloo)."""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

from twinkle.server.cli import main
from twinkle.server.config import parse_config

CONFIG_4B = Path(__file__).resolve().parents[2] / "cookbook" / "client" / "server" / "megatron" / "server_config_4b.yaml"
# Qwen3-4B's config.json (hf://Qwen/Qwen3-4B): what tensor parallelism must divide
QWEN3_4B = {"num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 9728}


def scaled_down_4b(name: str = "tiny-tp2") -> dict:
    """The 4B file with the model swapped for builtin://tiny and every size shrunk to a CPU; the ``megatron``
    layout (TP, DP, PP, launcher) is kept as it is."""
    cfg = copy.deepcopy(yaml.safe_load(CONFIG_4B.read_text()))
    (m,) = cfg["models"]
    m.update(name=name, model_id="builtin://tiny", dtype="float32", max_adapters=4, max_lora_rank=16,
             ray_actor_options={"num_cpus": 0, "num_gpus": 0})
    m["megatron"]["rank_num_cpus"] = 0
    return cfg


def test_check_config_passes_offline(capsys) -> None:
    assert main(["check-config", "-c", str(CONFIG_4B)]) == 0
    assert "hf://Qwen/Qwen3-4B" in capsys.readouterr().out


def test_parallel_layout_fits_qwen3_4b() -> None:
    m = parse_config(yaml.safe_load(CONFIG_4B.read_text())).models[0]
    assert m.dtype == "bfloat16" and m.ray_actor_options.num_gpus == 1
    tp = m.megatron.tensor_parallel_size
    assert tp >= 2, "the file shows tensor parallelism across the replica's GPUs"
    assert all(v % tp == 0 for v in QWEN3_4B.values()), (tp, QWEN3_4B)


def test_scaled_down_config_keeps_the_layout() -> None:
    big = parse_config(yaml.safe_load(CONFIG_4B.read_text())).models[0]
    small = parse_config(scaled_down_4b()).models[0]
    assert small.model_id == "builtin://tiny" and small.ray_actor_options.num_gpus == 0
    for key in ("tensor_parallel_size", "data_parallel_size", "pipeline_parallel_size", "launcher", "kv_cache"):
        assert getattr(small.megatron, key) == getattr(big.megatron, key), key
