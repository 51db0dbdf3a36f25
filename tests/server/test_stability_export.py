"""Stability records (stable_reinforce), signed download URLs and age export: the parts without a server."""

from __future__ import annotations

import time

import numpy as np
import pytest

from twinkle.server.export import UrlSigner, encrypt_dir, parse_recipients
from twinkle.server.stability import StabilityStore
from twinkle.server.tinker.client_limits import client_limits
from twinkle.types import (
    Datum,
    InvalidInputError,
    ModelInput,
    NotFoundError,
    SampledSequence,
    SampleResponse,
    TensorData,
)


def _datum(prompt: list[int], sampled: list[int], q: float = -9.0) -> Datum:
    full = prompt + sampled
    n = len(full) - 1
    return Datum(model_input=ModelInput.from_ints(full[:-1]), loss_fn_inputs={
        "target_tokens": TensorData.from_numpy(np.asarray(full[1:], dtype=np.int64)),
        "logprobs": TensorData.from_numpy(np.full(n, q, dtype=np.float32)),
        "advantages": TensorData.from_numpy(np.ones(n, dtype=np.float32)),
    })


def _spans(prompt_len: int, n: int, seq: str = "f1-0") -> list:
    return [("prompt", seq, 1, prompt_len - 1), ("sampled", seq, 0, n)]


def test_stability_store_replaces_sampled_logprobs_and_checks_tokens():
    store = StabilityStore()
    store.record("alice", "f1", SampleResponse(sequences=[
        SampledSequence(stop_reason="length", tokens=[7, 8, 9], logprobs=[-0.5, -1.5, -2.5])]))
    [out] = store.apply("alice", [_datum([1, 2], [7, 8, 9])], [_spans(2, 3)])
    q = out.loss_fn_inputs["logprobs"].to_numpy()
    assert q.tolist() == [-9.0, -0.5, -1.5, -2.5]  # prompt position keeps the client's value
    with pytest.raises(InvalidInputError, match="differ from the tokens sampled"):
        store.apply("alice", [_datum([1, 2], [7, 8, 4])], [_spans(2, 3)])
    with pytest.raises(InvalidInputError, match="no stability record"):  # another user's record is invisible
        store.apply("bob", [_datum([1, 2], [7, 8, 9])], [_spans(2, 3)])
    with pytest.raises(InvalidInputError, match="provenance"):
        store.apply("alice", [_datum([1, 2], [7, 8, 9])], [None])
    with pytest.raises(InvalidInputError, match="cover"):
        store.apply("alice", [_datum([1, 2], [7, 8, 9])], [_spans(2, 2)])
    with pytest.raises(InvalidInputError, match="past the 3 tokens"):
        store.apply("alice", [_datum([1, 2], [7, 8, 9])], [[("prompt", "f1-0", 1, 1), ("sampled", "f1-0", 1, 3)]])


def test_stability_store_is_bounded_and_expires():
    store = StabilityStore(max_bytes=2000)
    seq = SampledSequence(stop_reason="length", tokens=list(range(50)), logprobs=[-1.0] * 50)
    for i in range(20):
        store.record("u", f"f{i}", SampleResponse(sequences=[seq]))
    assert 0 < len(store) < 20  # the oldest went first
    short = StabilityStore(ttl_s=0.01)
    short.record("u", "f", SampleResponse(sequences=[seq]))
    time.sleep(0.05)
    with pytest.raises(InvalidInputError, match="no stability record"):
        short.apply("u", [_datum([1], list(range(50)))], [[("sampled", "f-0", 0, 50)]])


def test_signed_urls(tmp_path):
    signer = UrlSigner.for_root(tmp_path)
    assert (tmp_path / ".url-secret").stat().st_mode & 0o777 == 0o600
    token, exp = signer.sign({"u": "alice", "f": "a.json"}, 60)
    assert exp > time.time() and signer.verify(token)["u"] == "alice"
    assert UrlSigner.for_root(tmp_path).verify(token)["f"] == "a.json"  # the secret survives a restart
    for bad in (token[:-2] + "xx", "x" + token, token.split(".")[0], ""):
        with pytest.raises(NotFoundError):
            signer.verify(bad)
    old, _ = signer.sign({"u": "alice"}, -1)
    with pytest.raises(NotFoundError, match="expired"):
        signer.verify(old)


def test_age_recipients_and_encryption(tmp_path):
    pyrage = pytest.importorskip("pyrage")
    ident = pyrage.x25519.Identity.generate()
    assert parse_recipients(None) == ()
    for bad, field in ((["nope"], "age_encryption_recipients[0]"), ("age1x", "age_encryption_recipients"),
                       ([str(ident.to_public())] * 11, "age_encryption_recipients")):
        with pytest.raises(InvalidInputError) as e:
            parse_recipients(bad)
        assert e.value.field == field
    (tmp_path / "a.json").write_text('{"x": 1}')
    encrypt_dir(tmp_path, parse_recipients([str(ident.to_public())]))
    assert [p.name for p in tmp_path.iterdir()] == ["a.json.age"]
    assert pyrage.decrypt((tmp_path / "a.json.age").read_bytes(), [ident]) == b'{"x": 1}'


def test_client_limits():
    assert client_limits([], 1 << 20) == {}
    assert client_limits([8192, 32768], 64 << 20)["fwdbwd_max_chunk_bytes_count"] == 8192 * 12
    assert client_limits([10**9], 4 << 20)["fwdbwd_max_chunk_bytes_count"] == 3 << 20  # under the body limit
