"""The builtin vision-language models (``builtin://tiny-vl``): a Qwen3-VL with a tiny text and vision tower.

The tokenizer is the builtin text tokenizer with Qwen's vision special tokens appended (so every text id is
the same as ``builtin://tiny``'s). The weights are drawn by numpy with a fixed seed from the parameter
names and shapes of the transformers model class (built on the meta device, so no memory and no torch RNG):
matrices Normal(0, init_std), biases zero, norms one. ``preprocessor_config.json`` lets the standard
``AutoImageProcessor`` (the PIL one; no torchvision needed) count image tokens offline.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
VISION_TOKENS = [VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD]

# ChatML where a message's content may be a list of parts: {"type": "text", "text": ...} or {"type": "image"}
# (an image becomes <|vision_start|><|image_pad|><|vision_end|>; the processor or server expands the pad).
VL_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for part in message['content'] %}"
    "{%- if part['type'] == 'image' or 'image' in part %}{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'text' %}{{- part['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

IMAGE_MEAN = [0.5, 0.5, 0.5]
IMAGE_STD = [0.5, 0.5, 0.5]


@dataclass(frozen=True)
class VisionSpec:
    """The vision tower and image processor of a builtin VL model (Qwen3-VL layout)."""

    depth: int = 2
    hidden_size: int = 64
    intermediate_size: int = 128
    num_heads: int = 2
    patch_size: int = 8
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    num_position_embeddings: int = 256
    deepstack_visual_indexes: tuple[int, ...] = (1,)
    min_pixels: int = 16 * 16
    max_pixels: int = 256 * 256


def qwen3_vl_config(spec: Any, vocab_size: int, eos_id: int, pad_id: int, vision_ids: dict[str, int]) -> dict[str, Any]:
    v: VisionSpec = spec.vision
    head_dim = spec.hidden_size // spec.num_attention_heads
    half = head_dim // 2  # rotary frequencies, split over (temporal, height, width)
    section = [half - 2 * (half // 3), half // 3, half // 3]
    text = {
        "model_type": "qwen3_vl_text",
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
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section,
                            "mrope_interleaved": True},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": spec.init_std,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "bos_token_id": None,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "dtype": "float32",
    }
    vision = {
        "model_type": "qwen3_vl_vision",
        "depth": v.depth,
        "hidden_size": v.hidden_size,
        "hidden_act": "gelu_pytorch_tanh",
        "intermediate_size": v.intermediate_size,
        "num_heads": v.num_heads,
        "in_channels": 3,
        "patch_size": v.patch_size,
        "spatial_merge_size": v.spatial_merge_size,
        "temporal_patch_size": v.temporal_patch_size,
        "out_hidden_size": spec.hidden_size,
        "num_position_embeddings": v.num_position_embeddings,
        "deepstack_visual_indexes": list(v.deepstack_visual_indexes),
        "initializer_range": spec.init_std,
    }
    return {
        "architectures": ["Qwen3VLForConditionalGeneration"],
        "model_type": "qwen3_vl",
        "text_config": text,
        "vision_config": vision,
        "image_token_id": vision_ids[IMAGE_PAD],
        "video_token_id": vision_ids[VIDEO_PAD],
        "vision_start_token_id": vision_ids[VISION_START],
        "vision_end_token_id": vision_ids[VISION_END],
        "tie_word_embeddings": spec.tie_word_embeddings,
        "dtype": "float32",
    }


def preprocessor_config(v: VisionSpec) -> dict[str, Any]:
    return {
        "image_processor_type": "Qwen2VLImageProcessor",
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": IMAGE_MEAN,
        "image_std": IMAGE_STD,
        "do_convert_rgb": True,
        "patch_size": v.patch_size,
        "temporal_patch_size": v.temporal_patch_size,
        "merge_size": v.spatial_merge_size,
        "size": {"shortest_edge": v.min_pixels, "longest_edge": v.max_pixels},
        "resample": 3,
    }


def _shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of the transformers class, built on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    cfg = AutoConfig.for_model(**{k: v for k, v in config.items() if k != "architectures"})
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(cfg)
    tied = {"lm_head.weight"} if config.get("tie_word_embeddings") else set()
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in tied}


def init_weights(config: dict[str, Any], std: float, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for name, shape in sorted(_shapes(config).items()):
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "bias":
            out[name] = np.zeros(shape, np.float32)
        elif "norm" in name and len(shape) == 1:
            out[name] = np.ones(shape, np.float32)
        else:
            out[name] = (rng.standard_normal(shape, dtype=np.float32) * np.float32(std)).astype(np.float32)
    return out


def write_vl_model(spec: Any, out: Path, vocab_size: int, eos_id: int, pad_id: int,
                   vision_ids: dict[str, int]) -> int:
    """Write config.json, generation_config.json, preprocessor_config.json and model.safetensors."""
    from safetensors.numpy import save_file

    config = qwen3_vl_config(spec, vocab_size, eos_id, pad_id, vision_ids)
    weights = init_weights(config, spec.init_std, spec.seed)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    gen = {"bos_token_id": None, "eos_token_id": [eos_id, pad_id], "pad_token_id": pad_id, "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2, sort_keys=True) + "\n")
    write_preprocessor(spec.vision, out)
    return int(sum(a.size for a in weights.values()))


def write_preprocessor(v: VisionSpec, out: Path) -> None:
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(v), indent=2, sort_keys=True) + "\n")
