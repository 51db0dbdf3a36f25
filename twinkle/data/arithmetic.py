"""A tiny arithmetic task for RL demos (GRPO): "What is 3 + 4?" with a verifiable reward."""

from __future__ import annotations

import random
import re

from twinkle.types import InvalidInputError

from .dataset import Dataset

_INT = re.compile(r"-?\d+")
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def arithmetic_question(a: int, b: int, op: str = "+") -> str:
    return f"What is {a} {op} {b}?"


def arithmetic_dataset(n: int = 500, *, seed: int = 0, max_operand: int = 9, ops: tuple[str, ...] = ("+",),
                       with_answer: bool = False) -> Dataset:
    """``n`` problems drawn with ``seed`` (same seed, same problems). Operands are 0..``max_operand``.

    Rows: ``{"question", "answer" (int), "messages"}`` where ``messages`` is the user question (plus, with
    ``with_answer=True``, an assistant turn "3 + 4 = 7." for supervised warm-up)."""
    if n < 0:
        raise InvalidInputError("n must be >= 0", field="n")
    if max_operand < 0:
        raise InvalidInputError("max_operand must be >= 0", field="max_operand")
    bad = [o for o in ops if o not in _OPS]
    if bad or not ops:
        raise InvalidInputError(f"ops must be drawn from {sorted(_OPS)}", field="ops")
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b, op = rng.randint(0, max_operand), rng.randint(0, max_operand), rng.choice(ops)
        answer = _OPS[op](a, b)
        q = arithmetic_question(a, b, op)
        messages = [{"role": "user", "content": q}]
        if with_answer:
            messages.append({"role": "assistant", "content": f"{a} {op} {b} = {answer}."})
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


def arithmetic_reward(completion: str, answer: int | str) -> float:
    """1.0 when the completion's answer (``extract_answer``) equals ``answer``; 0.0 otherwise.

    ``"3 + 4 = 7."`` → 1.0 for answer 7; ``"8"`` → 0.0; ``"seven"`` → 0.0."""
    try:
        want = int(answer)
    except (TypeError, ValueError):
        raise InvalidInputError(f"answer must be an integer, got {answer!r}", field="answer") from None
    got = extract_answer(completion or "")
    return 1.0 if got is not None and got == want else 0.0
