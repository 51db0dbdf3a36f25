"""Preference pairs for DPO: a prompt with a chosen and a rejected answer → two encoded examples."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from twinkle.types import InvalidInputError

from .chat import apply_chat_template, check_messages


class DPOPairPreprocessor:
    """Encode ``{prompt, chosen, rejected}`` rows.

    ``prompt`` is a user question (str) or a conversation (list of messages); ``chosen`` / ``rejected`` are
    the answers (str, an assistant message, or a list of messages to append). The result is
    ``{"chosen": {input_ids, labels}, "rejected": {input_ids, labels}}``: both share the prompt tokens and
    only the answer tokens are labelled. ``to_examples`` gives the two examples as a list (chosen first),
    the order the ``dpo`` loss expects; ``flatten_pairs`` does that for a batch.
    """

    def __init__(self, tokenizer: Any, *, max_length: int | None = None, system: str | None = None):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.system = system

    def _prompt(self, row: Mapping[str, Any]) -> list[dict[str, str]]:
        p = row.get("prompt", row.get("messages"))
        if isinstance(p, str):
            msgs = [{"role": "user", "content": p}]
        elif isinstance(p, Sequence):
            msgs = check_messages(p, field="prompt")
        else:
            raise InvalidInputError("a DPO row needs 'prompt' (a string or a list of messages)", field="prompt")
        if self.system and (not msgs or msgs[0]["role"] != "system"):
            msgs.insert(0, {"role": "system", "content": self.system})
        return msgs

    def _answer(self, row: Mapping[str, Any], key: str) -> list[dict[str, str]]:
        a = row.get(key)
        if isinstance(a, str):
            return [{"role": "assistant", "content": a}]
        if isinstance(a, Mapping):
            return check_messages([a], field=key)
        if isinstance(a, Sequence) and a:
            return check_messages(a, field=key)
        raise InvalidInputError(f"a DPO row needs {key!r} (a string or assistant message)", field=key)

    def __call__(self, row: Mapping[str, Any]) -> dict[str, dict[str, list[int]]]:
        prompt = self._prompt(row)
        out = {}
        for key in ("chosen", "rejected"):
            out[key] = apply_chat_template(self.tokenizer, prompt + self._answer(row, key), train_on="last",
                                           max_length=self.max_length)
        return out

    def to_examples(self, row: Mapping[str, Any]) -> list[dict[str, list[int]]]:
        pair = self(row)
        return [pair["chosen"], pair["rejected"]]


def flatten_pairs(pairs: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``[{chosen, rejected}, ...]`` → ``[chosen0, rejected0, chosen1, rejected1, ...]``."""
    out: list[dict[str, Any]] = []
    for i, p in enumerate(pairs):
        if "chosen" not in p or "rejected" not in p:
            raise InvalidInputError(f"pair {i} needs 'chosen' and 'rejected'", field=f"pairs[{i}]")
        out.extend([dict(p["chosen"]), dict(p["rejected"])])
    return out
