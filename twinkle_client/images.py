"""Image prompts and datums for vision-language models, without transformers or torch on the client.

The server publishes how its model counts image tokens (``capabilities().base_models[i].vision``); with it
``image_chunk`` fills ``expected_tokens`` exactly as the server will count (the server checks it).

```python
from twinkle_client.images import vision_info, render_chat, image_datum
v = vision_info(session, "builtin://tiny-vl")
prompt = render_chat([{"role": "user", "content": [{"type": "image", "image": pil_image},
                                                   {"type": "text", "text": "What is this?"}]}], tok, v)
datum = image_datum(prompt, tok.encode("a red circle<|im_end|>", add_special_tokens=False))
```
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from twinkle.data.images import image_chunk, image_tokens
from twinkle.types import (
    Datum,
    EncodedTextChunk,
    ImageChunk,
    InvalidInputError,
    ModelInput,
    TensorData,
    VisionInfo,
)

__all__ = ["has_image_parts", "image_chunk", "image_datum", "image_tokens", "render_chat", "vision_info"]

VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"


def vision_info(session: Any, base_model: str) -> VisionInfo:
    """The ``VisionInfo`` the server publishes for ``base_model`` (a 400-style error for a text-only model)."""
    for m in session.capabilities().base_models:
        if m.name == base_model:
            if m.vision is None:
                raise InvalidInputError(f"model {base_model!r} is text-only; it does not accept images",
                                        field="base_model")
            return m.vision if isinstance(m.vision, VisionInfo) else VisionInfo.model_validate(m.vision)
    raise InvalidInputError(f"the server does not host {base_model!r}", field="base_model")


def has_image_parts(messages: Any) -> bool:
    return isinstance(messages, Sequence) and not isinstance(messages, str) and any(
        isinstance(m, Mapping) and isinstance(m.get("content"), list)
        and any(isinstance(p, Mapping) and p.get("type") == "image" for p in m["content"]) for m in messages)


def render_chat(messages: Sequence[Mapping[str, Any]], tokenizer: Any, vision: VisionInfo,
                add_generation_prompt: bool = True) -> ModelInput:
    """ChatML with ``{"type": "image", "image": PIL | bytes | path}`` and ``{"type": "text", "text": ...}`` parts:
    text is tokenized, each image becomes ``<|vision_start|>`` + an ``ImageChunk`` + ``<|vision_end|>``."""
    chunks: list[EncodedTextChunk | ImageChunk] = []
    text = ""

    def flush() -> None:
        nonlocal text
        if text:
            chunks.append(EncodedTextChunk(tokens=list(tokenizer.encode(text, add_special_tokens=False))))
            text = ""

    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m:
            raise InvalidInputError(f"messages[{i}] needs a role and content", field=f"messages[{i}]")
        text += f"<|im_start|>{m['role']}\n"
        content = m.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else list(content or [])
        for j, p in enumerate(parts):
            kind = p.get("type") if isinstance(p, Mapping) else None
            if kind == "text":
                text += str(p.get("text", ""))
            elif kind == "image":
                if p.get("image") is None:
                    raise InvalidInputError("an image part needs 'image'", field=f"messages[{i}].content[{j}].image")
                text += VISION_START
                flush()
                chunks.append(image_chunk(p["image"], vision))
                text += VISION_END
            else:
                raise InvalidInputError(f"unknown content part type {kind!r}", field=f"messages[{i}].content[{j}]")
        text += "<|im_end|>\n"
    if add_generation_prompt:
        text += "<|im_start|>assistant\n"
    flush()
    return ModelInput(chunks=chunks)


def image_datum(prompt: ModelInput, completion: Sequence[int]) -> Datum:
    """A next-token datum for ``prompt`` + ``completion``: the input drops the last token, target ``i`` is
    token ``i + 1``; weights are 1 on the completion only; targets and weights are 0 at image positions."""
    if not completion:
        raise InvalidInputError("completion must hold at least one token", field="completion")
    if prompt.chunks and isinstance(prompt.chunks[-1], ImageChunk) and len(completion) < 1:
        raise InvalidInputError("the sequence may not end with an image", field="prompt")
    kinds: list[tuple[int, float]] = []  # (token or -1 for an image position, weight)
    for c in prompt.chunks:
        if isinstance(c, ImageChunk):
            if c.expected_tokens is None:
                raise InvalidInputError("image chunks need expected_tokens (use image_chunk with the vision info)",
                                        field="prompt.expected_tokens")
            kinds.extend([(-1, 0.0)] * c.expected_tokens)
        else:
            kinds.extend((t, 0.0) for t in c.tokens)
    kinds.extend((int(t), 1.0) for t in completion)
    chunks = list(prompt.chunks)
    body = [int(t) for t in completion[:-1]]
    if body:
        if chunks and isinstance(chunks[-1], EncodedTextChunk):
            chunks[-1] = EncodedTextChunk(tokens=list(chunks[-1].tokens) + body)
        else:
            chunks.append(EncodedTextChunk(tokens=body))
    targets = [max(t, 0) for t, _ in kinds[1:]]
    weights = [w if t >= 0 else 0.0 for t, w in kinds[1:]]
    return Datum(model_input=ModelInput(chunks=chunks), loss_fn_inputs={
        "target_tokens": TensorData.from_numpy(np.asarray(targets, dtype=np.int64)),
        "weights": TensorData.from_numpy(np.asarray(weights, dtype=np.float32)),
    })
