from __future__ import annotations

import numpy as np
import pytest

from twinkle.data import IGNORE_INDEX, ChatEncoder, apply_chat_template, encode_prompt, render_chat, to_datums
from twinkle.types import InvalidInputError

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "2 + 3 = 5."},
    {"role": "user", "content": "And 4 + 4?"},
    {"role": "assistant", "content": "4 + 4 = 8."},
]


def _trained_text(tok, enc):
    ids = [t for t, lab in zip(enc["input_ids"], enc["labels"], strict=True) if lab != IGNORE_INDEX]
    return tok.decode(ids)


def test_chatml_fallback_labels_only_assistant_turns(char_tok):
    enc = apply_chat_template(char_tok, CONV)
    text = char_tok.decode(enc["input_ids"])
    assert text == render_chat(char_tok, CONV)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert _trained_text(char_tok, enc) == "2 + 3 = 5.<|im_end|>\n4 + 4 = 8.<|im_end|>\n"
    # labels copy the ids where trained
    for t, lab in zip(enc["input_ids"], enc["labels"], strict=True):
        assert lab in (t, IGNORE_INDEX)


def test_train_on_last_and_all(char_tok):
    last = apply_chat_template(char_tok, CONV, train_on="last")
    assert _trained_text(char_tok, last) == "4 + 4 = 8.<|im_end|>\n"
    everything = apply_chat_template(char_tok, CONV, train_on="all")
    assert everything["labels"] == everything["input_ids"]


def test_builtin_template_ids_match_whole_text_encoding(light_tok):
    enc = apply_chat_template(light_tok, CONV)
    whole = light_tok.encode(light_tok.apply_chat_template(CONV, tokenize=False))
    assert enc["input_ids"] == whole
    assert _trained_text(light_tok, enc) == "2 + 3 = 5.<|im_end|>\n4 + 4 = 8.<|im_end|>\n"
    im_start = light_tok.convert_tokens_to_ids("<|im_start|>")
    # every turn header (<|im_start|>role) is untrained
    for i, t in enumerate(enc["input_ids"]):
        if t == im_start:
            assert enc["labels"][i] == IGNORE_INDEX


def test_generation_prompt_and_encode_prompt(light_tok):
    msgs = [{"role": "user", "content": "who are you?"}]
    enc = apply_chat_template(light_tok, msgs, add_generation_prompt=True)
    assert light_tok.decode(enc["input_ids"]).endswith("<|im_start|>assistant\n")
    assert set(enc["labels"]) == {IGNORE_INDEX}
    assert encode_prompt(light_tok, "who are you?") == enc["input_ids"]


def test_max_length_truncates(char_tok):
    enc = apply_chat_template(char_tok, CONV, max_length=10)
    assert len(enc["input_ids"]) == len(enc["labels"]) == 10


def test_encoded_examples_become_datums_with_matching_weights(light_tok):
    enc = apply_chat_template(light_tok, CONV[1:3])
    (d,) = to_datums([enc])
    w = d.loss_fn_inputs["weights"].to_numpy()
    targets = d.loss_fn_inputs["target_tokens"].to_numpy()
    labels = np.asarray(enc["labels"][1:])
    assert np.array_equal(w > 0, labels != IGNORE_INDEX)
    assert np.array_equal(targets[w > 0], labels[labels != IGNORE_INDEX])


def test_chat_encoder_map_function(light_tok):
    row = {"messages": CONV[1:3], "id": 7}
    out = ChatEncoder(light_tok)(row)
    assert set(out) == {"input_ids", "labels"}
    with pytest.raises(InvalidInputError) as e:
        ChatEncoder(light_tok)({"text": "x"})
    assert e.value.field == "messages"


@pytest.mark.parametrize(
    ("messages", "field"),
    [
        ("hello", "messages"),
        ([{"role": "robot", "content": "x"}], "messages[0].role"),
        ([{"role": "user", "content": 3}], "messages[0].content"),
        ([{"role": "user", "content": "a"}, "b"], "messages[1]"),
    ],
)
def test_bad_messages_name_the_field(char_tok, messages, field):
    with pytest.raises(InvalidInputError) as e:
        apply_chat_template(char_tok, messages)
    assert e.value.field == field


def test_bad_train_on(char_tok):
    with pytest.raises(InvalidInputError) as e:
        apply_chat_template(char_tok, CONV, train_on="users")
    assert e.value.field == "train_on"
