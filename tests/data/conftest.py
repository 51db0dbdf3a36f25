"""A builtin tokenizer loaded without torch (the light tokenizer), built once into a temporary home."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def light_tok(tmp_path_factory):
    from twinkle.model.builtin import build_builtin
    from twinkle.model.hub import LightTokenizer

    return LightTokenizer.from_pretrained(build_builtin("tiny", tmp_path_factory.mktemp("twinkle-home")))


class CharTokenizer:
    """One id per character, no chat template: exercises the ChatML fallback."""

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i) for i in ids)


@pytest.fixture
def char_tok():
    return CharTokenizer()
