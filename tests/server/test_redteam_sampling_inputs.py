"""Red-team findings on the sampling inputs of the OpenAI-compatible routes and native SSE streaming: every
bad number is a 400 naming the field (never a 500), booleans are not numbers, stop lists are bounded (each
stop is checked after every sampled token: 10^5 of them made one 4×200-token request take 85 s), and OpenAI
limit errors name the OpenAI field. In process, mock backend: nothing here samples more than a few tokens."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from twinkle.types import SamplingParams
from twinkle.types.params import MAX_STOP_CHARS, MAX_STOP_SEQUENCES

sys.path.insert(0, str(Path(__file__).parent))
from _mock_app import mock_app_client  # noqa: E402

API = "/api/v1/twinkle"


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    yield from mock_app_client(tmp_path_factory.mktemp("redteam"))


def _post(c: TestClient, path: str, body: dict) -> tuple[int, dict]:
    """The status and body; an OpenAI route's error (OpenAI's shape, checked) as the server's usual one."""
    r = c.post(path, content=json.dumps(body, allow_nan=True), headers={"content-type": "application/json"})
    data = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
    if path.startswith("/v1/") and r.status_code >= 400:
        inner = data["error"]  # the openai package shows error.message
        assert inner["message"] and inner["type"] == "invalid_request_error", data
        assert inner["param"] == inner["detail"].get("field") and inner["code"], data
        data = {"error": inner["message"], "detail": inner["detail"]}
    return r.status_code, data


BASE = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 2}
BAD_NUMBERS = [
    ("max_tokens", 10**19), ("max_tokens", True), ("max_completion_tokens", 10**19),
    ("seed", 10**19), ("seed", -1), ("seed", True), ("seed", "x"),
    ("n", True), ("temperature", True), ("temperature", float("nan")), ("temperature", float("inf")),
    ("top_p", True), ("top_p", float("nan")), ("top_p", 1e308),
]


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize(("field", "value"), BAD_NUMBERS, ids=[f"{f}={v!r}" for f, v in BAD_NUMBERS])
def test_openai_bad_numbers_are_400_naming_the_field(client, route, field, value):
    body = dict(BASE)
    if route.endswith("chat/completions"):
        body.pop("prompt")
        body["messages"] = [{"role": "user", "content": "hi"}]
    elif field == "max_completion_tokens":
        pytest.skip("not a /v1/completions field")
    body[field] = value
    status, err = _post(client, route, body)
    assert status == 400, (status, err)
    assert err["detail"]["field"].split(".")[0] == field, err


def test_openai_prompt_booleans_are_not_token_ids(client):
    status, err = _post(client, "/v1/completions", {**BASE, "prompt": [5, True]})
    assert status == 400 and err["detail"]["field"].startswith("prompt"), err


@pytest.mark.parametrize("stop", [[5, 6], ["a"] * (MAX_STOP_SEQUENCES + 1), ["x" * (MAX_STOP_CHARS + 1)]],
                         ids=["token-ids", "too-many", "too-long"])
def test_openai_stop_is_bounded_text(client, stop):
    status, err = _post(client, "/v1/completions", {**BASE, "stop": stop})
    assert status == 400 and err["detail"]["field"].startswith("stop"), (status, err)
    if len(stop) > MAX_STOP_SEQUENCES:
        assert err["detail"]["field"] == "stop" and "at most" in err["error"], err


def test_openai_logprobs_inputs(client):
    """Chosen-token logprobs on any backend; the most likely alternatives need the continuous sampler, so the
    mock backend refuses them with a 400 naming the OpenAI field rather than answering without them; bad values
    and a reply too large to list are refused before anything runs."""
    chat = {k: v for k, v in BASE.items() if k != "prompt"} | {"messages": [{"role": "user", "content": "hi"}]}
    for route, body, field in (("/v1/completions", {**BASE, "logprobs": 5}, "logprobs"),
                               ("/v1/chat/completions", {**chat, "logprobs": True, "top_logprobs": 3}, "top_logprobs")):
        status, err = _post(client, route, body)
        assert status == 400 and err["detail"]["field"] == field and "continuous sampler" in err["error"], err
    for route, bad in (("/v1/completions", {**BASE, "logprobs": True}), ("/v1/completions", {**BASE, "logprobs": -1}),
                       ("/v1/completions", {**BASE, "logprobs": 6}),
                       ("/v1/chat/completions", {**chat, "top_logprobs": 21, "logprobs": True}),
                       ("/v1/chat/completions", {**chat, "top_logprobs": 2})):  # top_logprobs without logprobs
        status, err = _post(client, route, bad)
        assert status == 400 and err["detail"]["field"].split(".")[0] in ("logprobs", "top_logprobs"), (bad, err)
    huge = {**chat, "logprobs": True, "top_logprobs": 20, "n": 128, "max_tokens": 1000}
    status, err = _post(client, "/v1/chat/completions", huge)
    assert 400 <= status < 500 and err["detail"]["field"] == "top_logprobs", (status, err)
    status, body = _post(client, "/v1/completions", {**BASE, "logprobs": 0})
    assert status == 200 and len(body["choices"][0]["logprobs"]["token_logprobs"]) >= 1, body
    assert body["choices"][0]["logprobs"]["top_logprobs"] is None
    status, body = _post(client, "/v1/chat/completions", {**chat, "logprobs": True, "top_logprobs": 0})
    assert status == 200 and body["choices"][0]["logprobs"]["content"], body


@pytest.mark.parametrize(("field", "value"), [("n", 10_000), ("max_tokens", 10**9)])
def test_openai_limit_errors_name_the_openai_field(client, field, value):
    status, err = _post(client, "/v1/completions", {**BASE, field: value})
    assert 400 <= status < 500 and err["detail"]["field"] == field, (status, err)


def test_openai_within_limits_still_answers(client):
    status, body = _post(client, "/v1/completions", {**BASE, "stop": ["a"] * MAX_STOP_SEQUENCES, "seed": 3})
    assert status == 200 and body["choices"], body


def test_native_stream_stop_list_is_bounded(client):
    body = {"base_model": "tiny", "prompt": {"chunks": [{"type": "encoded_text", "tokens": [5, 6]}]},
            "sampling_params": {"max_tokens": 4, "stop": [f"zq{i}" for i in range(100_000)]}}
    status, err = _post(client, f"{API}/sample/stream", body)
    assert status == 400 and err["detail"]["field"] == "sampling_params.stop", (status, err)
    assert "at most 64 stop sequences" in err["error"], err


def test_native_stream_ranked_tokens_need_the_continuous_sampler(client):
    body = {"base_model": "tiny", "prompt": {"chunks": [{"type": "encoded_text", "tokens": [5, 6]}]},
            "sampling_params": {"max_tokens": 2}}
    for k, status_want in ((3, 400), (21, 400), (True, 400), (0, 200)):
        status, err = _post(client, f"{API}/sample/stream", {**body, "topk_logprobs": k})
        assert status == status_want, (k, status, err)
        if status == 400:
            assert err["detail"]["field"] == "topk_logprobs", err
    status, err = _post(client, f"{API}/sample", {**body, "topk_logprobs": 3})  # not on the non-streamed route
    assert status == 400 and err["detail"]["field"] == "topk_logprobs", err


def test_sampling_params_stop_bounds():
    SamplingParams(stop=["a"] * MAX_STOP_SEQUENCES)
    SamplingParams(stop=list(range(MAX_STOP_SEQUENCES)))
    for bad in (["a"] * (MAX_STOP_SEQUENCES + 1), "x" * (MAX_STOP_CHARS + 1), [True], list(range(10**5))):
        with pytest.raises(ValueError):
            SamplingParams(stop=bad)


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_openai_text_far_over_the_token_limit_is_refused_before_tokenizing(client, route):
    """A 2 MB prompt cost the worker ~4 s of tokenizing (200 000 chat messages ~9 s) before the 413."""
    text = "x" * 2_000_000
    body = {"model": "tiny", "max_tokens": 2}
    if route.endswith("chat/completions"):
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = text
    status, err = _post(client, route, body)
    assert status == 413 and err["detail"]["field"] == "prompt" and "characters" in err["error"], (status, err)


def test_native_misspelt_parameters_are_400_naming_them(client):
    """The parameter models ignore unknown keys (the Tinker SDK adds tags), so a native request's misspelt key
    (``max_token``, ``rnak``, ``learning_rate`` where ``lr`` is meant) was dropped silently and its default used:
    a run of rank 32, a sample of 128 tokens. The native requests refuse them by name; the Tinker routes still
    ignore what they do not know."""
    sid = client.post(f"{API}/sessions", json={}).json()["session_id"]
    prompt = {"chunks": [{"type": "encoded_text", "tokens": [5, 6]}]}
    bad = [
        (f"{API}/sample", {"base_model": "tiny", "prompt": prompt, "sampling_params": {"max_token": 4}}, "max_token"),
        (f"{API}/runs", {"session_id": sid, "base_model": "tiny", "lora": {"rnak": 8}}, "rnak"),
        (f"{API}/runs", {"session_id": sid, "base_model": "tiny", "lora": {"r": 8}}, "'r'"),
    ]
    for path, body, word in bad:
        status, err = _post(client, path, body)
        assert status == 400 and word in err["error"] and "known:" in err["error"], (path, err)
    ref = client.post(f"{API}/runs", params={"wait": 10},
                      json={"session_id": sid, "base_model": "tiny", "lora": {"rank": 4}}).json()
    run = ref["state"]["result"]["run_id"] if ref.get("state") else client.get(
        f"{API}/futures/{ref['future_id']}", params={"timeout": 10}).json()["result"]["run_id"]
    assert client.get(f"{API}/runs/{run}").json()["lora"]["rank"] == 4
    for path, body, word in [
        (f"{API}/runs/{run}/optimizer", {"optimizer": {"learning_rate": 1e-3}}, "learning_rate"),
        (f"{API}/runs/{run}/lr_scheduler", {"scheduler": {"warmup": 5}}, "warmup"),
        (f"{API}/runs/{run}/optim_step", {"adam_params": {"lr": 1e-3}}, "'lr'"),
    ]:
        status, err = _post(client, path, body)
        assert status == 400 and word in err["error"], (path, err)
    status, body = _post(client, f"{API}/sample", {"base_model": "tiny", "prompt": prompt,
                                                   "sampling_params": {"max_tokens": 2, "temperature": 0}})
    assert status == 200
