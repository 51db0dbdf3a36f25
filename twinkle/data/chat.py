"""Chat templates: messages → ``{input_ids, labels}`` with ``-100`` on every token that is not trained.

Works with a ``transformers`` tokenizer (its own ``chat_template`` is used), with the light tokenizer of
``twinkle.model.hub.load_tokenizer``, or with any object offering ``encode(text)``; without a template the
ChatML layout below applies (the builtin models ship exactly this template).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from twinkle.types import InvalidInputError

from .convert import IGNORE_INDEX

ROLES = ("system", "user", "assistant", "tool")

#: The ChatML template (as a Jinja string) written into the builtin tokenizers' ``tokenizer_config.json``.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

Message = Mapping[str, Any]


def check_messages(messages: Any, field: str = "messages") -> list[dict[str, str]]:
    """Validate a conversation; returns plain ``{"role", "content"}`` dicts. Raises ``InvalidInputError``."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise InvalidInputError(f"{field} must be a list of {{role, content}} messages", field=field)
    out: list[dict[str, str]] = []
    for i, m in enumerate(messages):
        where = f"{field}[{i}]"
        if not isinstance(m, Mapping):
            raise InvalidInputError(f"{where} must be a mapping with 'role' and 'content'", field=where)
        role = m.get("role")
        if role not in ROLES:
            raise InvalidInputError(f"{where}.role must be one of {ROLES}, got {role!r}", field=f"{where}.role")
        content = m.get("content")
        if not isinstance(content, str):
            raise InvalidInputError(f"{where}.content must be a string", field=f"{where}.content")
        out.append({"role": role, "content": content})
    return out


def render_chat(tokenizer: Any, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
    """The conversation as text, with the tokenizer's chat template (ChatML when it has none)."""
    msgs = check_messages(messages)
    template = getattr(tokenizer, "chat_template", None)
    if template and hasattr(tokenizer, "apply_chat_template"):
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)
        if not isinstance(text, str):  # some versions return a list for a single conversation
            text = text[0]
        return text
    return render_chatml(msgs, add_generation_prompt)


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` with no BOS/EOS added (special tokens written in the text are kept)."""
    if not text:
        return []
    try:
        enc = tokenizer.encode(text, add_special_tokens=False)
    except TypeError:
        enc = tokenizer.encode(text)
    if hasattr(enc, "ids"):  # a raw ``tokenizers.Encoding``
        enc = enc.ids
    return [int(t) for t in enc]


def apply_chat_template(
    tokenizer: Any,
    messages: Sequence[Message],
    *,
    add_generation_prompt: bool = False,
    train_on: str = "assistant",
    max_length: int | None = None,
) -> dict[str, list[int]]:
    """Encode a conversation for training.

    Returns ``{"input_ids": [...], "labels": [...]}`` of equal length (HF convention, not shifted): labels
    equal the ids on trained tokens and ``-100`` elsewhere. ``train_on``: ``"assistant"`` (every assistant
    turn: its content and end-of-turn marker), ``"last"`` (only the final assistant turn) or ``"all"``.
    ``add_generation_prompt`` appends the assistant header (for a sampling prompt; nothing extra trained).
    ``max_length`` truncates on the right.
    """
    msgs = check_messages(messages)
    if train_on not in ("assistant", "last", "all"):
        raise InvalidInputError("train_on must be 'assistant', 'last' or 'all'", field="train_on")
    if max_length is not None and max_length < 1:
        raise InvalidInputError("max_length must be positive", field="max_length")
    last_assistant = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=-1)

    segments: list[tuple[str, bool]] = []
    prev = ""
    for i, m in enumerate(msgs):
        if m["role"] == "assistant":
            prompt = render_chat(tokenizer, msgs[:i], add_generation_prompt=True)
            full = render_chat(tokenizer, msgs[: i + 1])
            _check_prefix(prev, prompt)
            _check_prefix(prompt, full)
            trained = train_on == "all" or train_on == "assistant" or i == last_assistant
            segments.append((prompt[len(prev) :], train_on == "all"))
            segments.append((full[len(prompt) :], trained))
            prev = full
        else:
            full = render_chat(tokenizer, msgs[: i + 1])
            _check_prefix(prev, full)
            segments.append((full[len(prev) :], train_on == "all"))
            prev = full
    if add_generation_prompt:
        full = render_chat(tokenizer, msgs, add_generation_prompt=True)
        _check_prefix(prev, full)
        segments.append((full[len(prev) :], False))

    input_ids: list[int] = []
    labels: list[int] = []
    for text, trained in segments:
        ids = encode_text(tokenizer, text)
        input_ids.extend(ids)
        labels.extend(ids if trained else [IGNORE_INDEX] * len(ids))
    if max_length is not None:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return {"input_ids": input_ids, "labels": labels}


def encode_prompt(tokenizer: Any, prompt: str | Sequence[Message], system: str | None = None) -> list[int]:
    """Token ids of a sampling prompt: a user question (str) or a conversation, plus the assistant header."""
    if isinstance(prompt, str):
        msgs: list[dict[str, str]] = [{"role": "user", "content": prompt}]
        if system:
            msgs.insert(0, {"role": "system", "content": system})
    else:
        msgs = check_messages(prompt, field="prompt")
    return encode_text(tokenizer, render_chat(tokenizer, msgs, add_generation_prompt=True))


class ChatEncoder:
    """``Dataset.map`` function: a row with ``messages`` → ``{input_ids, labels}`` (other keys dropped)."""

    def __init__(self, tokenizer: Any, *, max_length: int | None = None, train_on: str = "assistant",
                 messages_key: str = "messages"):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.train_on = train_on
        self.messages_key = messages_key

    def __call__(self, row: Mapping[str, Any]) -> dict[str, list[int]]:
        if self.messages_key not in row:
            raise InvalidInputError(f"row has no {self.messages_key!r}", field=self.messages_key)
        return apply_chat_template(
            self.tokenizer, row[self.messages_key], train_on=self.train_on, max_length=self.max_length
        )


def render_chatml(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """The ChatML rendering of ``messages`` (the fallback when a tokenizer has no chat template of its own)."""
    parts = [f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages]
    if add_generation_prompt:
        parts.append("<|im_start|>assistant\n")
    return "".join(parts)


def _check_prefix(prefix: str, text: str) -> None:
    if not text.startswith(prefix):
        raise InvalidInputError(
            "this tokenizer's chat template does not render conversations incrementally "
            "(an earlier turn changes when a later one is added), so turns cannot be labelled separately",
            field="messages",
        )
