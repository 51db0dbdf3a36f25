"""A tiny arithmetic task for RL demos (GRPO): "What is 3 + 4?" with a verifiable reward."""

from __future__ import annotations

import random
import re
from typing import Any

from twinkle.types import InvalidInputError

from .dataset import Dataset

_INT = re.compile(r"-?\d+")
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def arithmetic_question(a: int, b: int, op: str = "+") -> str:
    return f"What is {a} {op} {b}?"


_STYLES = ("worked", "short")
# a well-formed answer: "7", "7.", or the worked form "3 + 4 = 7." (surrounding spaces allowed); numbers of
# bounded length, so that "3333333333" earns no format credit
_WELL_FORMED = re.compile(r"\s*(?:-?\d{1,4}\s*[-+*]\s*-?\d{1,4}\s*=\s*)?-?\d{1,8}\.?\s*")


def arithmetic_answer(a: int, b: int, op: str = "+", style: str = "worked") -> str:
    """The assistant's answer text: ``"3 + 4 = 7."`` (``style="worked"``) or ``"7"`` (``style="short"``)."""
    if style not in _STYLES:
        raise InvalidInputError(f"answer_style must be one of {list(_STYLES)}", field="answer_style")
    answer = _OPS[op](a, b)
    return f"{a} {op} {b} = {answer}." if style == "worked" else str(answer)


def arithmetic_dataset(n: int = 500, *, seed: int = 0, max_operand: int = 9, ops: tuple[str, ...] = ("+",),
                       with_answer: bool = False, answer_style: str = "worked",
                       max_answer: int | None = None) -> Dataset:
    """``n`` problems drawn with ``seed`` (same seed, same problems). Operands are 0..``max_operand``.

    Rows: ``{"question", "answer" (int), "messages"}`` where ``messages`` is the user question (plus, with
    ``with_answer=True``, an assistant turn for supervised warm-up: "3 + 4 = 7." with ``answer_style="worked"``,
    "7" with ``answer_style="short"``). ``max_answer`` keeps only problems whose answer is at most that (e.g. 9:
    single-digit answers, one token for most tokenizers); problems are redrawn until ``n`` are found."""
    if n < 0:
        raise InvalidInputError("n must be >= 0", field="n")
    if max_operand < 0:
        raise InvalidInputError("max_operand must be >= 0", field="max_operand")
    bad = [o for o in ops if o not in _OPS]
    if bad or not ops:
        raise InvalidInputError(f"ops must be drawn from {sorted(_OPS)}", field="ops")
    if answer_style not in _STYLES:
        raise InvalidInputError(f"answer_style must be one of {list(_STYLES)}", field="answer_style")
    smallest = min(-max_operand if o == "-" else 0 for o in ops)  # 0 + 0, 0 * 0, 0 - max_operand
    if max_answer is not None and max_answer < smallest:
        raise InvalidInputError("no problem has an answer <= max_answer", field="max_answer")
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    while len(rows) < n:
        a, b, op = rng.randint(0, max_operand), rng.randint(0, max_operand), rng.choice(ops)
        answer = _OPS[op](a, b)
        if max_answer is not None and answer > max_answer:
            continue
        q = arithmetic_question(a, b, op)
        messages = [{"role": "user", "content": q}]
        if with_answer:
            messages.append({"role": "assistant", "content": arithmetic_answer(a, b, op, answer_style)})
        rows.append({"question": q, "answer": answer, "messages": messages})
    return Dataset(rows)


def extract_answer(completion: str) -> int | None:
    """The first integer after the last "=" when there is one, else the last integer; None if no number."""
    if "=" in completion:
        after = _INT.findall(completion.rsplit("=", 1)[1])
        if after:
            return int(after[0])
    found = _INT.findall(completion)
    return int(found[-1]) if found else None


def is_well_formed(completion: str) -> bool:
    """The completion is only an answer: ``"7"``, ``"7."`` or ``"3 + 4 = 7."`` (no other text; operands of at
    most 4 digits, the result at most 8)."""
    return _WELL_FORMED.fullmatch(completion or "") is not None


def arithmetic_reward(completion: str, answer: int | str, *, format_reward: float = 0.0) -> float:
    """Correctness, optionally with partial credit for the answer format.

    With the default ``format_reward=0.0``: 1.0 when the completion's answer (``extract_answer``) equals
    ``answer``, else 0.0 (``"3 + 4 = 7."`` → 1.0 for answer 7; ``"8"`` → 0.0; ``"seven"`` → 0.0).
    With ``format_reward=f`` (0 ≤ f ≤ 1): ``f`` for a well-formed answer (``is_well_formed``) plus ``1 - f`` for
    a correct one, so a well-formed right answer scores 1.0, a well-formed wrong one ``f`` and rambling text
    that happens to end in the right number ``1 - f``; the partial credit gives RL a signal before any answer
    is right."""
    try:
        want = int(answer)
    except (TypeError, ValueError):
        raise InvalidInputError(f"answer must be an integer, got {answer!r}", field="answer") from None
    if not 0.0 <= format_reward <= 1.0:
        raise InvalidInputError("format_reward must be in [0, 1]", field="format_reward")
    got = extract_answer(completion or "")
    correct = 1.0 if got is not None and got == want else 0.0
    if format_reward == 0.0:
        return correct
    return format_reward * float(is_well_formed(completion)) + (1.0 - format_reward) * correct
