"""A random Qwen2 model + a small BPE tokenizer in a directory (fallback when ``builtin://`` is absent;
used by tests and the bench)."""

from __future__ import annotations

from pathlib import Path

_TEXT = (
    "Twinkle trains LoRA adapters for many users on one base model. Who are you? I am a small model. "
    "The quick brown fox jumps over the lazy dog. 1 + 2 = 3. 4 + 5 = 9. Hello world! "
    "Training makes the loss fall; sampling shows what the adapter learned."
)
_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_random_model(path: str | Path, *, vocab_size: int = 512, hidden_size: int = 64, layers: int = 2,
                       heads: int = 4, kv_heads: int = 2, intermediate: int = 128, max_positions: int = 512,
                       tie_embeddings: bool = True, seed: int = 0) -> Path:
    """Write ``config.json``, ``model.safetensors`` and a tokenizer into ``path`` (returned)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_TEXT] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token=None)
    fast.chat_template = _CHAT_TEMPLATE
    fast.save_pretrained(str(path))
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, intermediate_size=intermediate,
                      max_position_embeddings=max_positions, tie_word_embeddings=tie_embeddings,
                      eos_token_id=fast.convert_tokens_to_ids("<|im_end|>"),
                      pad_token_id=fast.convert_tokens_to_ids("<|endoftext|>"), bos_token_id=None)
    model = Qwen2ForCausalLM(cfg)
    model.save_pretrained(str(path))
    return path


_TINY: Path | None = None


def tiny_model_path() -> Path:
    """``builtin://tiny`` when ``twinkle.model.hub`` provides it, else a random tiny Qwen2 (built once per process)."""
    global _TINY
    if _TINY is not None:
        return _TINY
    try:
        from twinkle.model.hub import resolve_model

        _TINY = Path(resolve_model("builtin://tiny"))
    except ImportError:
        import tempfile

        _TINY = build_random_model(Path(tempfile.mkdtemp(prefix="twinkle-tiny-")) / "model")
    return _TINY
