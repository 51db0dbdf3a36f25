"""The arithmetic task's options for RL on toy models: short answers, bounded answers, partial-credit reward."""

from __future__ import annotations

import pytest

from twinkle.data import arithmetic_answer, arithmetic_dataset, arithmetic_reward, is_well_formed
from twinkle.types import InvalidInputError


def test_short_answers_and_max_answer():
    rows = arithmetic_dataset(60, seed=3, max_operand=9, max_answer=9, with_answer=True, answer_style="short")
    assert len(rows) == 60
    for row in rows:
        assert 0 <= row["answer"] <= 9
        assert row["messages"][1]["content"] == str(row["answer"])
    # the default stays the worked form, drawn exactly as before
    assert arithmetic_dataset(5, seed=3, with_answer=True)[0]["messages"][1]["content"].endswith(".")
    assert arithmetic_answer(3, 4) == "3 + 4 = 7." and arithmetic_answer(3, 4, "*", "short") == "12"


@pytest.mark.parametrize("kwargs,field", [({"answer_style": "long"}, "answer_style"),
                                          ({"max_answer": -1}, "max_answer")])
def test_bad_options_name_the_field(kwargs, field):
    with pytest.raises(InvalidInputError) as e:
        arithmetic_dataset(3, **kwargs)
    assert e.value.field == field


@pytest.mark.parametrize("text,ok", [("7", True), (" 7.", True), ("3 + 4 = 7.", True), ("3 +4 = 7", True),
                                     ("7 apples", False), ("= = =", False), ("3333333333", False), ("", False)])
def test_well_formed(text, ok):
    assert is_well_formed(text) is ok


def test_partial_credit_reward():
    assert arithmetic_reward("3 + 4 = 7.", 7, format_reward=0.2) == pytest.approx(1.0)
    assert arithmetic_reward("3 + 4 = 8.", 7, format_reward=0.2) == pytest.approx(0.2)
    assert arithmetic_reward("so it is 7 ok", 7, format_reward=0.2) == pytest.approx(0.8)
    assert arithmetic_reward("no idea", 7, format_reward=0.2) == 0.0
    assert arithmetic_reward("3 + 4 = 8.", 7) == 0.0  # default: correctness only, as before
    with pytest.raises(InvalidInputError) as e:
        arithmetic_reward("7", 7, format_reward=1.5)
    assert e.value.field == "format_reward"
