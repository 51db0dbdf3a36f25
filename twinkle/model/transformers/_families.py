"""Tiny random-init models of the architecture families users bring (tests; a few hundred KB each).

``build_family(name, path)`` writes a config, random weights and the tiny BPE tokenizer (shared with
``_random``) for one of :data:`FAMILIES`. Nothing is downloaded.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

FAMILIES = ("qwen2", "qwen3", "qwen3_moe", "llama", "mistral", "gemma2", "gemma3_text", "phi3", "olmo2")

_COMMON: dict[str, Any] = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               intermediate_size=64, max_position_embeddings=256)


def _config(name: str, vocab: int, eos: int, pad: int) -> Any:
    import transformers as t

    c = dict(_COMMON, vocab_size=vocab, eos_token_id=eos, pad_token_id=pad, bos_token_id=None,
             tie_word_embeddings=False)  # a merged lm_head LoRA must not leak into tied embeddings
    if name == "qwen2":
        return t.Qwen2Config(**c)
    if name == "qwen3":
        return t.Qwen3Config(**c, head_dim=8)
    if name == "qwen3_moe":
        return t.Qwen3MoeConfig(**c, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                decoder_sparse_step=1, mlp_only_layers=[])
    if name == "llama":
        return t.LlamaConfig(**c)
    if name == "mistral":
        return t.MistralConfig(**c, sliding_window=None)
    if name == "gemma2":
        return t.Gemma2Config(**c, head_dim=8, sliding_window=8, query_pre_attn_scalar=8)
    if name == "gemma3_text":
        return t.Gemma3TextConfig(**c, head_dim=8, sliding_window=8, query_pre_attn_scalar=8)
    if name == "phi3":
        return t.Phi3Config(**c)
    if name == "olmo2":
        return t.Olmo2Config(**c)
    raise ValueError(f"unknown family {name!r}; one of {FAMILIES}")


def build_family(name: str, path: str | Path, *, seed: int = 0) -> Path:
    """Write a tiny random ``name`` model with the tiny tokenizer into ``path`` (returned)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ._random import tiny_model_path

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    src = tiny_model_path()
    for f in src.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "chat_template.jinja"):
            shutil.copy(f, path / f.name)
    tok = AutoTokenizer.from_pretrained(str(path))
    eos = tok.convert_tokens_to_ids(tok.eos_token)
    pad = tok.convert_tokens_to_ids(tok.pad_token) if tok.pad_token else eos
    cfg = _config(name, len(tok), eos, pad)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # a random init with some spread, so adapters and logits differ visibly
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
    model.save_pretrained(str(path))
    return path
