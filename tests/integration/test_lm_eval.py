"""The real lm-evaluation-harness (``lm_eval`` 0.4.13, its ``local-completions`` API model, unmodified) against
a real Twinkle server over HTTP (builtin://tiny, transformers backend): it finds the tokenizer routes by itself
(``tokenizer_backend=auto``), scores batches of (context, continuation) pairs with ``echo`` + ``logprobs`` and
generates until a stop string. Its log-likelihoods equal the native API's prompt logprobs of the same tokens,
and ``is_greedy`` is right both ways."""

from __future__ import annotations

import httpx
import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("tenacity")
from _tinker_server import BASE_MODEL, start_inprocess  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.openai_completions import LocalCompletionsAPI  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.slow]
API = "/api/v1/twinkle"


@pytest.fixture(scope="module")
def srv():
    return start_inprocess()  # one model: the harness's tokenizer requests name none (the shared server has two)


@pytest.fixture(scope="module")
def lm(srv, monkeypatch_module):
    url, key = srv
    monkeypatch_module.setenv("OPENAI_API_KEY", key)  # the completions requests' key; auth_token: the tokenizer's
    return LocalCompletionsAPI(base_url=f"{url}/v1/completions", model=BASE_MODEL, auth_token=key, batch_size=3,
                               num_concurrent=2, max_retries=1)


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def _native(srv, tokens: list[int], **extra) -> dict:
    url, key = srv
    with httpx.Client(base_url=url, headers={"X-API-Key": key}, timeout=60) as c:
        r = c.post(f"{API}/sample", params={"wait": 30}, json={
            "base_model": BASE_MODEL, "prompt": {"chunks": [{"type": "encoded_text", "tokens": tokens}]},
            "sampling_params": {"max_tokens": 1, "temperature": 0}, **extra})
        body = r.json()
        return body["state"]["result"] if body.get("state") else c.get(
            f"{API}/futures/{body['future_id']}", params={"timeout": 30}).json()["result"]


def test_loglikelihood_and_greedy_flags_match_the_native_api(lm, srv):
    assert lm.tokenizer_backend == "remote"  # it found /tokenizer_info and /tokenize with the key
    tok = lm.tokenizer
    ctx = "once upon a"
    greedy = _native(srv, tok.encode(ctx))["sequences"][0]["tokens"][0]
    greedy_text = tok.decode([greedy])
    pairs = [(ctx, greedy_text), ("hello", " world"), ("the cat", " sat on the mat"), ("a", " b")]
    got = lm.loglikelihood([Instance(request_type="loglikelihood", doc={}, arguments=p, idx=i)
                            for i, p in enumerate(pairs)])
    for (c, cont), (ll, is_greedy) in zip(pairs, got, strict=True):
        whole, n_ctx = tok.encode(c + cont), len(tok.encode(c))
        native = _native(srv, whole, prompt_logprobs=True)["prompt_logprobs"]
        assert ll == pytest.approx(sum(native[n_ctx:]), abs=1e-3), (c, cont)
        if (c, cont) == pairs[0]:
            assert is_greedy and len(whole) == n_ctx + 1  # its one token is the model's argmax
    assert not all(g for _, g in got[1:])  # the others are not all the model's first choices


def test_generate_until_stops_at_the_stop_string(lm, srv):
    url, key = srv
    out = lm.generate_until([Instance(request_type="generate_until", doc={}, idx=0,
                                      arguments=("once upon a time", {"until": ["e"], "max_gen_toks": 12}))])
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as c:
        plain = c.post("/v1/completions", json={"model": BASE_MODEL, "prompt": "once upon a time", "max_tokens": 12,
                                                 "temperature": 0}).json()["choices"][0]["text"]
    assert "e" not in out[0] and plain.startswith(out[0])
    assert out[0] == plain.split("e")[0]


def test_on_a_server_of_several_models_the_model_prefix_names_it(monkeypatch):
    """The harness's tokenizer requests name no model: on a server of several models its base URL takes the
    model's prefix (``/models/<name>/v1/completions``), from which it derives the tokenizer routes too."""
    url, key = start_inprocess([{"name": "mocked", "backend": "mock", "model_id": "mock://tiny"},
                                {"name": "tiny", "backend": "transformers", "model_id": BASE_MODEL}])
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as c:
        r = c.get("/tokenizer_info")
        assert r.status_code == 400 and r.json()["error"]["param"] == "model"  # which one?
        r = c.post("/models/tiny/v1/completions", json={"model": "mocked", "prompt": "x", "max_tokens": 1})
        assert r.status_code == 400 and r.json()["error"]["param"] == "model"  # the body contradicts the URL
        assert c.post("/models/nope/tokenize", json={"prompt": "x"}).status_code == 404
    monkeypatch.setenv("OPENAI_API_KEY", key)
    lm = LocalCompletionsAPI(base_url=f"{url}/models/tiny/v1/completions", model="tiny", auth_token=key,
                             batch_size=2, max_retries=1)
    assert lm.tokenizer_backend == "remote"
    tok = lm.tokenizer
    pairs = [("once upon a", " time"), ("hello", " world")]
    got = lm.loglikelihood([Instance(request_type="loglikelihood", doc={}, arguments=p, idx=i)
                            for i, p in enumerate(pairs)])
    for (c_, cont), (ll, _) in zip(pairs, got, strict=True):
        whole, n_ctx = tok.encode(c_ + cont), len(tok.encode(c_))
        native = _native((url, key), whole, prompt_logprobs=True)["prompt_logprobs"]
        assert ll == pytest.approx(sum(native[n_ctx:]), abs=1e-3)
