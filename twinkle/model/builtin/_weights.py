"""Random Qwen2 weights with numpy (a fixed seed → identical bytes on every machine), as fp32 safetensors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


def qwen2_config(spec: Any, vocab_size: int, eos_id: int, pad_id: int) -> dict[str, Any]:
    head_dim = spec.hidden_size // spec.num_attention_heads
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        "tie_word_embeddings": spec.tie_word_embeddings,
        "attention_dropout": 0.0,
        "initializer_range": spec.init_std,
        "use_cache": True,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": spec.num_hidden_layers,
        "layer_types": ["full_attention"] * spec.num_hidden_layers,
        "bos_token_id": None,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "torch_dtype": "float32",
        "dtype": "float32",
    }


def init_weights(spec: Any, vocab_size: int) -> dict[str, np.ndarray]:
    """Normal(0, init_std) matrices, zero biases, unit norms — HF's own init scheme, drawn by numpy."""
    rng = np.random.default_rng(spec.seed)
    h, inter = spec.hidden_size, spec.intermediate_size
    hd = h // spec.num_attention_heads
    q_out, kv_out = spec.num_attention_heads * hd, spec.num_key_value_heads * hd

    def normal(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(spec.init_std)).astype(np.float32)

    w: dict[str, np.ndarray] = {"model.embed_tokens.weight": normal(vocab_size, h)}
    for i in range(spec.num_hidden_layers):
        p = f"model.layers.{i}."
        w[p + "self_attn.q_proj.weight"] = normal(q_out, h)
        w[p + "self_attn.q_proj.bias"] = np.zeros(q_out, np.float32)
        w[p + "self_attn.k_proj.weight"] = normal(kv_out, h)
        w[p + "self_attn.k_proj.bias"] = np.zeros(kv_out, np.float32)
        w[p + "self_attn.v_proj.weight"] = normal(kv_out, h)
        w[p + "self_attn.v_proj.bias"] = np.zeros(kv_out, np.float32)
        w[p + "self_attn.o_proj.weight"] = normal(h, q_out)
        w[p + "mlp.gate_proj.weight"] = normal(inter, h)
        w[p + "mlp.up_proj.weight"] = normal(inter, h)
        w[p + "mlp.down_proj.weight"] = normal(h, inter)
        w[p + "input_layernorm.weight"] = np.ones(h, np.float32)
        w[p + "post_attention_layernorm.weight"] = np.ones(h, np.float32)
    w["model.norm.weight"] = np.ones(h, np.float32)
    if not spec.tie_word_embeddings:
        w["lm_head.weight"] = normal(vocab_size, h)
    return w


def write_model(spec: Any, out: Path, vocab_size: int, eos_id: int, pad_id: int) -> int:
    """Write config.json, generation_config.json and model.safetensors; returns the parameter count."""
    from safetensors.numpy import save_file

    weights = init_weights(spec, vocab_size)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = qwen2_config(spec, vocab_size, eos_id, pad_id)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    gen = {"bos_token_id": None, "eos_token_id": [eos_id, pad_id], "pad_token_id": pad_id, "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2, sort_keys=True) + "\n")
    return int(sum(a.size for a in weights.values()))
