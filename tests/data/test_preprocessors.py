from __future__ import annotations

import pytest

from twinkle.data import (
    IGNORE_INDEX,
    DPOPairPreprocessor,
    SelfCognitionPreprocessor,
    arithmetic_dataset,
    arithmetic_reward,
    flatten_pairs,
    load_self_cognition_raw,
    self_cognition_dataset,
)
from twinkle.types import InvalidInputError


def test_bundled_self_cognition_set():
    raw = load_self_cognition_raw()
    assert 50 <= len(raw) <= 100
    assert len(set(raw.column("query"))) == len(raw)  # no duplicate questions
    assert any(q.lower() == "who are you?" for q in raw.column("query"))
    for r in raw:
        assert "{name}" in r["response"] or "{author}" in r["response"]


def test_self_cognition_fills_placeholders():
    ds = self_cognition_dataset(name="Nova", author="the Star lab")
    assert len(ds) == len(load_self_cognition_raw())
    for row in ds:
        user, assistant = row["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        for m in (user, assistant):
            assert "{" not in m["content"] and "}" not in m["content"]
        assert "Nova" in assistant["content"] or "Star lab" in assistant["content"]
    answers = [r["messages"][1]["content"] for r in ds]
    assert "The Star lab created me. I am Nova." in answers  # author capitalised at a sentence start
    assert any("made by the Star lab" in a for a in answers)


def test_self_cognition_system_and_errors():
    row = SelfCognitionPreprocessor("A", "B", system="Be kind.")({"query": "who are you?", "response": "{name}"})
    assert row["messages"][0] == {"role": "system", "content": "Be kind."}
    with pytest.raises(InvalidInputError) as e:
        SelfCognitionPreprocessor(name=" ")
    assert e.value.field == "name"
    with pytest.raises(InvalidInputError) as e:
        SelfCognitionPreprocessor()({"query": "hi"})
    assert e.value.field == "response"


def test_dpo_pair_shares_the_prompt_and_labels_only_answers(light_tok):
    pre = DPOPairPreprocessor(light_tok)
    pair = pre({"prompt": "who are you?", "chosen": "I am Twinkle.", "rejected": "I am a toaster."})
    c, r = pair["chosen"], pair["rejected"]
    n_prompt = next(i for i, lab in enumerate(c["labels"]) if lab != IGNORE_INDEX)
    assert c["input_ids"][:n_prompt] == r["input_ids"][:n_prompt]
    assert all(lab == IGNORE_INDEX for lab in r["labels"][:n_prompt])

    def answer(enc):
        return light_tok.decode([t for t, lab in zip(enc["input_ids"], enc["labels"], strict=True) if lab != IGNORE_INDEX])

    assert answer(c).startswith("I am Twinkle.") and answer(r).startswith("I am a toaster.")
    flat = flatten_pairs([pair, pair])
    assert flat[0] == c and flat[1] == r and len(flat) == 4
    assert pre.to_examples({"prompt": [{"role": "user", "content": "hi"}], "chosen": {"role": "assistant", "content": "hey"},
                            "rejected": "go away"})[1]["input_ids"]


def test_dpo_errors_name_the_field(light_tok):
    pre = DPOPairPreprocessor(light_tok)
    with pytest.raises(InvalidInputError) as e:
        pre({"prompt": "q", "chosen": "a"})
    assert e.value.field == "rejected"
    with pytest.raises(InvalidInputError) as e:
        pre({"chosen": "a", "rejected": "b"})
    assert e.value.field == "prompt"
    with pytest.raises(InvalidInputError) as e:
        flatten_pairs([{"chosen": {}}])
    assert e.value.field == "pairs[0]"


def test_arithmetic_dataset_is_seeded_and_correct():
    a, b = arithmetic_dataset(50, seed=1), arithmetic_dataset(50, seed=1)
    assert a.to_list() == b.to_list()
    assert a.to_list() != arithmetic_dataset(50, seed=2).to_list()
    for row in arithmetic_dataset(100, seed=0, ops=("+", "-", "*"), max_operand=12):
        x, op, y = row["question"].removeprefix("What is ").removesuffix("?").split()
        assert row["answer"] == {"+": int(x) + int(y), "-": int(x) - int(y), "*": int(x) * int(y)}[op]
    sft = arithmetic_dataset(3, with_answer=True)
    for row in sft:
        assert arithmetic_reward(row["messages"][1]["content"], row["answer"]) == 1.0
    with pytest.raises(InvalidInputError) as e:
        arithmetic_dataset(3, ops=("/",))
    assert e.value.field == "ops"


@pytest.mark.parametrize(
    ("completion", "answer", "reward"),
    [
        ("3 + 4 = 7.", 7, 1.0),
        ("7", "7", 1.0),
        ("The answer is 7", 7, 1.0),
        ("3 + 4 = 8.", 7, 0.0),
        ("seven", 7, 0.0),
        ("", 7, 0.0),
        ("5 - 9 = -4", -4, 1.0),
        ("12 + 5 = 17 and 3", 17, 1.0),
    ],
)
def test_arithmetic_reward(completion, answer, reward):
    assert arithmetic_reward(completion, answer) == reward


def test_arithmetic_reward_rejects_a_non_integer_answer():
    with pytest.raises(InvalidInputError) as e:
        arithmetic_reward("7", "seven")
    assert e.value.field == "answer"
