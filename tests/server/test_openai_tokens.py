"""The tokenizer routes in vLLM's shapes (``/tokenizer_info``, ``/tokenize``, ``/detokenize``), driven as
lm-evaluation-harness's remote tokenizer drives them (its probe: ``eos_token`` in the info, ``tokens`` from a
``{"prompt": "test", "add_special_tokens": false}`` tokenize), on the in-process app with builtin://tiny: the
answers equal the model's own tokenizer's, bad ids and sizes are 4xx naming the field, and a key is needed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

sys.path.insert(0, str(Path(__file__).parent))
from _mock_app import inprocess_app  # noqa: E402


def _app(tmp: Path, models: list[dict]) -> tuple[TestClient, str]:
    app, keys, _ = inprocess_app(tmp, models)
    return TestClient(app, headers={"Authorization": f"Bearer {keys['alice']}"}), keys["alice"]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    c, _ = _app(tmp_path_factory.mktemp("tok"), [{"name": "tiny", "backend": "transformers",
                                                  "model_id": "builtin://tiny"}])
    return c


@pytest.fixture(scope="module")
def tok():
    from twinkle_client.tokenizer import load_tokenizer

    return load_tokenizer("builtin://tiny")


def test_a_harness_tokenizes_and_decodes_like_the_model(client, tok):
    info = client.get("/tokenizer_info").json()  # the only model: no `model` needed
    assert info["model"] == "tiny" and info["eos_token"] == tok.eos_token and info["chat_template"]
    assert info["model_max_length"] > 0
    assert client.get("/tokenizer_info", params={"model": "tiny"}).json() == info
    text = "once upon a time, héllo 😀"
    r = client.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()
    assert r["tokens"] == tok.encode(text, add_special_tokens=False) and r["count"] == len(r["tokens"])
    assert r["max_model_len"] > 0
    assert client.post("/tokenize", json={"model": "tiny", "prompt": "test"}).json()["tokens"] == tok.encode("test")
    back = client.post("/detokenize", json={"tokens": r["tokens"]}).json()
    assert back == {"prompt": tok.decode(r["tokens"], skip_special_tokens=True)} and back["prompt"] == text
    msgs = [{"role": "user", "content": "hi there"}]
    ids = client.post("/tokenize", json={"messages": msgs}).json()["tokens"]
    want = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    assert ids == list(want["input_ids"] if hasattr(want, "keys") else want)
    bare = client.post("/tokenize", json={"messages": msgs, "add_generation_prompt": False}).json()["tokens"]
    assert bare == ids[:len(bare)] and len(bare) < len(ids)  # without the assistant's turn opening
    chat = client.post("/v1/chat/completions", json={"model": "tiny", "messages": msgs, "max_tokens": 1}).json()
    assert chat["usage"]["prompt_tokens"] == len(ids)  # the same prompt the chat route samples


@pytest.mark.parametrize(("path", "body", "status", "param"), [
    ("/detokenize", {"tokens": [5, 10**9]}, 400, "tokens"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
    ("/detokenize", {"tokens": [5, True]}, 400, "tokens"),
    ("/detokenize", {"tokens": [5] * 10**6}, 413, "tokens"),
    ("/tokenize", {}, 400, "prompt"),
    ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, 400, "prompt"),
    ("/tokenize", {"prompt": "x" * 10**7}, 413, "prompt"),
    ("/tokenize", {"prompt": "a", "model": "nope"}, 404, "model"),
    ("/tokenize", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}, 400,
     "messages.0.content.0.image_url"),
])
def test_bad_requests_are_4xx_naming_the_field(client, path, body, status, param):
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]  # OpenAI's error shape, as on /v1
    assert err["param"] in (param, f"{param}[1]") and err["message"], err
    assert client.post("/tokenize", json={"prompt": "still serving"}).status_code == 200


def test_a_key_is_needed_and_several_models_need_a_name(tmp_path):
    c, _ = _app(tmp_path, [{"name": "a", "backend": "mock", "model_id": "mock://tiny"},
                           {"name": "b", "backend": "mock", "model_id": "mock://tiny"}])
    for path, kw in (("/tokenizer_info", {}), ("/tokenize", {"json": {"prompt": "x"}})):
        r = (c.get if path == "/tokenizer_info" else c.post)(path, **kw)
        assert r.status_code == 400 and r.json()["error"]["param"] == "model" and "a, b" in r.text, r.text
        anon = TestClient(c.app)
        r = (anon.get if path == "/tokenizer_info" else anon.post)(path, **kw)
        assert r.status_code == 401
    r = c.post("/tokenize", json={"prompt": "xy", "model": "a"})  # named: the mock's byte tokenizer answers
    assert r.status_code == 200 and r.json()["count"] == 2, r.text
