"""Self-cognition: teach a model its own name and maker from a small bundled data set.

``assets/self_cognition.jsonl`` (written for this project) holds ~80 ``{query, response}`` rows whose text
uses the placeholders ``{name}`` and ``{author}``; the preprocessor fills them in and builds a conversation.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from twinkle.types import InvalidInputError

from ._assets import assets_path
from .dataset import Dataset

SELF_COGNITION_FILE = "self_cognition.jsonl"
DEFAULT_NAME = "Twinkle"
DEFAULT_AUTHOR = "the Twinkle team"

_SENTENCE_START = re.compile(r"(^|[.!?]\s+)\{author\}")


class SelfCognitionPreprocessor:
    """A ``{query, response}`` row → ``{"messages": [user, assistant]}`` with ``{name}``/``{author}`` filled.

    An author at the start of a sentence is capitalised ("the Twinkle team" → "The Twinkle team").
    ``system`` optionally prepends a system message.
    """

    def __init__(self, name: str = DEFAULT_NAME, author: str = DEFAULT_AUTHOR, system: str | None = None):
        if not isinstance(name, str) or not name.strip():
            raise InvalidInputError("name must be a non-empty string", field="name")
        if not isinstance(author, str) or not author.strip():
            raise InvalidInputError("author must be a non-empty string", field="author")
        self.name = name.strip()
        self.author = author.strip()
        self.system = system

    def fill(self, text: str) -> str:
        cap = self.author[0].upper() + self.author[1:]
        text = _SENTENCE_START.sub(lambda m: m.group(1) + cap, text)
        return text.replace("{author}", self.author).replace("{name}", self.name)

    def __call__(self, row: Mapping[str, Any]) -> dict[str, Any]:
        for key in ("query", "response"):
            if not isinstance(row.get(key), str):
                raise InvalidInputError(f"self-cognition row needs a string {key!r}", field=key)
        messages = [
            {"role": "user", "content": self.fill(row["query"])},
            {"role": "assistant", "content": self.fill(row["response"])},
        ]
        if self.system:
            messages.insert(0, {"role": "system", "content": self.system})
        return {"messages": messages}

    def load(self) -> Dataset:
        """The bundled self-cognition rows, filled in, as conversations."""
        return load_self_cognition_raw().map(self)


def load_self_cognition_raw() -> Dataset:
    """The bundled rows with their placeholders (``{query, response}``)."""
    with open(assets_path(SELF_COGNITION_FILE), encoding="utf-8") as f:
        return Dataset(json.loads(line) for line in f if line.strip())


def self_cognition_dataset(name: str = DEFAULT_NAME, author: str = DEFAULT_AUTHOR,
                           system: str | None = None) -> Dataset:
    """Shortcut for ``SelfCognitionPreprocessor(name, author, system).load()``."""
    return SelfCognitionPreprocessor(name, author, system).load()


def identity_preference_pairs(name: str, author: str, old_name: str, old_author: str) -> list[dict[str, str]]:
    """DPO pairs over the bundled questions: ``{prompt, chosen, rejected}`` where the chosen answer uses
    ``name``/``author`` and the rejected one ``old_name``/``old_author``."""
    good = self_cognition_dataset(name, author)
    bad = self_cognition_dataset(old_name, old_author)
    return [{"prompt": g["messages"][0]["content"], "chosen": g["messages"][1]["content"],
             "rejected": b["messages"][1]["content"]} for g, b in zip(good, bad, strict=True)]
