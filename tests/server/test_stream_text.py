"""The stream hub's incremental text: the pieces of a stream add up to the whole sequence decoded at once
(multi-byte characters split over byte tokens, spaces, special tokens), and the decoding work per token stays
bounded: it decoded the whole sequence at every token (O(n^2): ~1.6 s of the worker's event loop for one
4000-token stream on builtin://small's tokenizer)."""

from __future__ import annotations

import random

import pytest

from twinkle.model.transformers._random import tiny_model_path
from twinkle.server.sample_stream import StreamHub, _Stream

TEXTS = ["héllo wörld, naïve café 日本語 😀 emoji 🎉", "def f(x):\n    return x  # ok\n\n", "  spaces   and\ttabs ..."]


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_path()))


def _stream(tok, ids: list[int]) -> tuple[str, int]:
    work = [0]

    def decode(x: list[int]) -> str:
        work[0] += len(x)
        return tok.decode(x, skip_special_tokens=True)

    hub, st = StreamHub(decode), _Stream()
    out = ""
    for t in ids:
        st.tokens.setdefault(0, []).append(t)
        out += hub._text(st, 0)
    return out, work[0]


def test_pieces_add_up_to_the_whole_decode(tok):
    rng = random.Random(0)
    cases = [tok.encode(t * k, add_special_tokens=False) for t in TEXTS for k in (1, 3)]
    cases += [[rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 80))] for _ in range(200)]
    special = tok.all_special_ids[:1]
    cases += [tok.encode("a b", add_special_tokens=False) + special * 5 + tok.encode(" ü c", add_special_tokens=False)]
    assert any(len(tok.decode([t])) == 0 or "\ufffd" in tok.decode([t]) for c in cases[:2] for t in c)  # premise
    for ids in cases:
        out, _ = _stream(tok, ids)
        full = tok.decode(ids, skip_special_tokens=True)
        assert out == full or (full.endswith("\ufffd") and full.startswith(out)), (ids, out, full)


def test_decoding_work_per_token_is_bounded(tok):
    rng = random.Random(1)
    for n in (100, 2000):
        ids = [rng.randrange(3, tok.vocab_size) for _ in range(n)]
        _, work = _stream(tok, ids)
        assert work <= 16 * n, (n, work)  # whole-sequence decoding did ~n^2 / 2 (10^6 token decodes at n=2000)
