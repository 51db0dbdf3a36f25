"""Stop strings in OpenAI streams: the streamed pieces add up to exactly the non-streamed text, which is the
sampled text cut at its first stop string, and no piece ever carries part of a stop string (one spanning
several tokens was sent in part before it completed); the tokens listed with logprobs add up to the text (the
token a stop string starts inside was listed whole)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from twinkle.server.routes_openai import _ChoiceText


def _cut(text: str, stops: list[str]) -> str:
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return text[:min(hits)] if hits else text


def _stream(pieces: list[str], stops: list[str]) -> tuple[list[str], str]:
    ct = _ChoiceText(stops)
    out = []
    for p in pieces:
        ct.add(p)
        out.append(ct.take())
    out.append(ct.take(final=True))
    whole = _ChoiceText(stops)
    for p in pieces:
        whole.add(p)
    return out, whole.take(final=True)


def test_a_stop_spanning_tokens_is_never_sent_in_part():
    sent, text = _stream(["Hello", "\n", "\nUser", ": more"], ["\n\nUser:"])
    assert text == "Hello" and "".join(sent) == "Hello"
    assert all("\n" not in s for s in sent)
    sent, text = _stream(["a\n", "b"], ["\n\n"])  # a held "\n" that never became the stop is sent at the end
    assert "".join(sent) == text == "a\nb"


ALPHABET = st.sampled_from("ab\n:")


@settings(max_examples=400, deadline=None)
@given(st.lists(st.text(ALPHABET, max_size=4), max_size=12), st.lists(st.text(ALPHABET, max_size=4), max_size=3))
def test_streamed_pieces_add_up_to_the_cut_text(pieces, stops):
    sent, text = _stream(pieces, stops)
    assert text == _cut("".join(pieces), stops)
    assert "".join(sent) == text
    so_far = ""
    for s in sent:  # every prefix handed out is a prefix of the final text: nothing is ever taken back
        so_far += s
        assert text.startswith(so_far)


def test_the_token_a_stop_starts_inside_keeps_only_its_text_before_it():
    ct = _ChoiceText(["STOP"])
    for i, piece in enumerate(["Hi", " thereST", "OP and more"]):
        ct.add(piece, -float(i))
    assert ct.take(final=True) == "Hi there"
    assert [(t.text, t.offset, t.logprob) for t in ct.take_tokens()] == [("Hi", 0, 0.0), (" there", 2, -1.0)]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(ALPHABET, max_size=4), max_size=12), st.lists(st.text(ALPHABET, max_size=4), max_size=3),
       st.booleans())
def test_listed_tokens_add_up_to_the_text(pieces, stops, streamed):
    ct = _ChoiceText(stops)
    text, toks = "", []
    for p in pieces:
        ct.add(p, -1.0)
        if streamed:  # as the stream: a chunk (text and its tokens) only when there is text to send
            piece = ct.take()
            if piece:
                text += piece
                toks += ct.take_tokens()
    text += ct.take(final=True)
    toks += ct.take_tokens()
    assert "".join(t.text for t in toks) == text
    assert [t.offset for t in toks] == [sum(len(u.text) for u in toks[:i]) for i in range(len(toks))]
