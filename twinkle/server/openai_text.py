"""Text <-> tokens for the OpenAI-compatible routes, on the model worker (which holds the tokenizer)."""

from __future__ import annotations

from typing import Any

from twinkle.types import InvalidInputError

from .sample_stream import pieces

NO_TOKENIZER = "this model has no tokenizer: send token ids to the native API"


def tokenize(tok: Any, *, text: str | None = None, messages: list[dict[str, Any]] | None = None,
             add_special_tokens: bool = False, add_generation_prompt: bool = True) -> list[int]:
    if tok is None:
        raise InvalidInputError(NO_TOKENIZER, field="model")
    if messages is not None:
        if getattr(tok, "chat_template", None):
            from jinja2 import TemplateError

            try:
                ids = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
            except TemplateError as e:  # the template refuses the conversation (roles out of order, ...)
                raise InvalidInputError(f"the model's chat template refused these messages: {e}",
                                        field="messages") from None
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            return [int(t) for t in ids]
        # no chat template: a plain "role: content" transcript ending with the assistant's turn
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + ("assistant:" if add_generation_prompt else "")
    if text is None:
        raise InvalidInputError("give a prompt", field="prompt")
    return [int(t) for t in tok.encode(text, add_special_tokens=add_special_tokens)]


def tokenizer_info(tok: Any, max_length: int) -> dict[str, Any]:
    """What a client needs to tokenize as the server does (vLLM's ``/tokenizer_info`` fields that evaluation
    harnesses read): the special tokens, the chat template, the context length."""
    if tok is None:
        raise InvalidInputError(NO_TOKENIZER, field="model")

    def text(name: str) -> str | None:
        value = getattr(tok, name, None)
        return value if isinstance(value, str) else None

    template = getattr(tok, "chat_template", None)
    return {"tokenizer_class": type(tok).__name__, "eos_token": text("eos_token"), "bos_token": text("bos_token"),
            "pad_token": text("pad_token"), "unk_token": text("unk_token"),
            "chat_template": template if isinstance(template, str) else None, "model_max_length": int(max_length)}


def token_texts(decode: Any, ids: list[int], singles: list[int]) -> tuple[list[str], list[str]]:
    """``decode`` (ids -> text, or None without a tokenizer): the text each token of ``ids`` adds in sequence,
    and the text of each token of ``singles`` alone."""
    if decode is None:
        raise InvalidInputError(NO_TOKENIZER, field="model")
    return pieces(decode, ids), [decode([t]) for t in singles]
