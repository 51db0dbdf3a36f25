"""The text the builtin tokenizers are trained on: bundled prose plus generated task material.

Everything here is deterministic, so the same package version always yields the same tokenizer.
"""

from __future__ import annotations

from pathlib import Path

_CORPUS_DIR = Path(__file__).resolve().parent / "corpus"


def prose_files() -> list[Path]:
    return sorted(_CORPUS_DIR.glob("*.txt"))


def _self_cognition_text() -> list[str]:
    from twinkle.data.chat import render_chatml
    from twinkle.data.self_cognition import SelfCognitionPreprocessor, load_self_cognition_raw

    lines: list[str] = []
    raw = load_self_cognition_raw()
    pre = SelfCognitionPreprocessor()
    for row in raw:
        conv = pre(row)["messages"]
        lines.append(f"User: {conv[0]['content']}\nAssistant: {conv[1]['content']}\n")
        lines.append(render_chatml(conv, add_generation_prompt=False))
    return lines


def _arithmetic_text() -> list[str]:
    from twinkle.data.chat import render_chatml

    lines = []
    for a in range(21):
        for b in range(21):
            q = f"What is {a} + {b}?"
            lines.append(render_chatml([{"role": "user", "content": q},
                                  {"role": "assistant", "content": f"{a} + {b} = {a + b}."}], False))
    for a in range(13):
        for b in range(13):
            lines.append(f"{a} times {b} is {a * b}. {a + b} minus {b} is {a}.\n")
    return lines


def corpus_lines() -> list[str]:
    """All training text, as a list of documents (prose paragraphs, conversations, sums)."""
    docs: list[str] = []
    for p in prose_files():
        docs.extend(par.strip() + "\n" for par in p.read_text(encoding="utf-8").split("\n\n") if par.strip())
    docs.extend(_self_cognition_text())
    docs.extend(_arithmetic_text())
    return docs
