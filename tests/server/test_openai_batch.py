"""Several prompts in one ``/v1/completions`` request, as OpenAI takes them and evaluation harnesses send them
(lm-evaluation-harness's ``local-completions`` always sends ``prompt`` as a list, even of one: a batch of token
lists with ``echo``, ``logprobs: 1``, ``max_tokens: 1`` to score texts). Choice ``p * n + j`` is prompt ``p``'s
``j``-th sample; each prompt is sampled exactly as it would be alone. In process, real transformers worker on
builtin://tiny."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _mock_app import inprocess_app  # noqa: E402

API = "/api/v1/twinkle"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    app, keys, workers = inprocess_app(tmp_path_factory.mktemp("oai-batch"),
                                       [{"name": "tiny", "backend": "transformers", "model_id": "builtin://tiny"}])
    return app, keys["alice"], workers["tiny"]


def _client(app, key):
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t",
                             headers={"Authorization": f"Bearer {key}"}, timeout=60)


async def _native_prompt_logprobs(c, ids):
    r = await c.post(f"{API}/sample", params={"wait": 30}, json={
        "base_model": "tiny", "prompt": {"chunks": [{"type": "encoded_text", "tokens": ids}]},
        "sampling_params": {"max_tokens": 1}, "prompt_logprobs": True})
    body = r.json()
    res = body["state"]["result"] if body.get("state") else (await c.get(
        f"{API}/futures/{body['future_id']}", params={"timeout": 30})).json()["result"]
    return res["prompt_logprobs"]


@pytest.mark.slow
def test_a_harness_scores_a_batch_of_token_lists(env):
    """lm-evaluation-harness's loglikelihood payload: the sum of ``token_logprobs[ctxlen:-1]`` and whether each
    was the likeliest token, read from each choice in index order."""
    app, key, _ = env
    batch = [[5, 9, 17, 33, 8], [40, 41, 42], [7, 7, 7, 7, 7, 7, 7]]

    async def main():
        async with _client(app, key) as c:
            r = await c.post("/v1/completions", json={"model": "tiny", "prompt": batch, "temperature": 0,
                                                       "max_tokens": 1, "logprobs": 1, "seed": 1234, "echo": True})
            assert r.status_code == 200, r.text
            out = r.json()
            assert [ch["index"] for ch in out["choices"]] == [0, 1, 2]
            assert out["usage"]["prompt_tokens"] == sum(map(len, batch))
            for ids, ch in zip(batch, out["choices"], strict=True):
                lp = ch["logprobs"]
                assert len(lp["token_logprobs"]) == len(ids) + 1  # the prompt's tokens, then the one sampled
                native = await _native_prompt_logprobs(c, ids)
                assert lp["token_logprobs"][0] is None
                assert lp["token_logprobs"][1:len(ids)] == pytest.approx(native[1:], abs=1e-5)
                for tok, top in zip(lp["token_logprobs"][1:], lp["top_logprobs"][1:], strict=True):
                    assert max(top.values()) >= tok - 1e-6  # what the harness compares for is_greedy
            # a list of one prompt answers as the prompt alone
            one = (await c.post("/v1/completions", json={"model": "tiny", "prompt": [batch[1]], "max_tokens": 1,
                                                         "logprobs": 1, "echo": True, "temperature": 0})).json()
            assert one["choices"][0]["logprobs"]["token_logprobs"] == out["choices"][1]["logprobs"]["token_logprobs"]

    asyncio.run(main())


@pytest.mark.slow
def test_each_prompt_samples_as_it_would_alone(env):
    app, key, _ = env
    texts = ["once upon a time", "héllo", "x"]

    async def main():
        async with _client(app, key) as c:
            args = {"model": "tiny", "max_tokens": 6, "n": 2, "seed": 5, "stop": []}
            both = (await c.post("/v1/completions", json={**args, "prompt": texts})).json()
            assert [ch["index"] for ch in both["choices"]] == list(range(6))
            for p, text in enumerate(texts):
                alone = (await c.post("/v1/completions", json={**args, "prompt": text})).json()
                assert [ch["text"] for ch in both["choices"][2 * p:2 * p + 2]] == [ch["text"] for ch in alone["choices"]]
            # streamed: each choice's pieces add up to its text, each choice finishes once, usage covers all
            r = await c.post("/v1/completions", json={**args, "prompt": texts, "stream": True,
                                                       "stream_options": {"include_usage": True}})
            chunks = [json.loads(line[6:]) for line in r.text.split("\n") if line.startswith("data: {")]
            got: dict[int, str] = {}
            finished = []
            for ch in chunks:
                for cc in ch["choices"]:
                    got[cc["index"]] = got.get(cc["index"], "") + cc["text"]
                    if cc["finish_reason"]:
                        finished.append(cc["index"])
            assert got == {ch["index"]: ch["text"] for ch in both["choices"]}
            assert sorted(finished) == list(range(6))
            assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == both["usage"]
            assert r.text.rstrip().endswith("data: [DONE]")

    asyncio.run(main())


@pytest.mark.slow
def test_batch_limits_and_a_refused_prompt_drop_the_started_ones(env):
    app, key, worker = env
    sched = worker._scheduler

    async def main():
        async with _client(app, key) as c:
            for body, status, param in (
                ({"prompt": [[5]] * 129}, 413, "prompt"),
                ({"prompt": [[5]] * 65, "n": 2}, 413, "prompt"),
                ({"prompt": [[5, 6], []]}, 400, "prompt.1"),
                ({"prompt": ["once", ""]}, 400, "prompt.1"),
                ({"prompt": [[5, 6], [5, True]]}, 400, None),
            ):
                r = await c.post("/v1/completions", json={"model": "tiny", "max_tokens": 2, **body})
                assert r.status_code == status, (body, r.text)
                if param:
                    assert r.json()["error"]["param"] == param, r.text
            # the third prompt is over the token limit: the two already started are dropped, not left running
            before = sched.stats["samples_cancelled"]
            r = await c.post("/v1/completions", json={"model": "tiny", "max_tokens": 1000, "temperature": 0,
                                                       "prompt": [[5, 6], [7, 8], [5] * 100_000]})
            assert r.status_code == 413 and r.json()["error"]["param"] == "prompt", r.text
            for _ in range(100):
                if not worker._hub()._streams and not sched._samples and not sched._in_engine:
                    break
                await asyncio.sleep(0.02)
            assert not worker._hub()._streams and not sched._samples and not sched._in_engine
            assert sched.stats["samples_cancelled"] == before + 2  # (1000 greedy tokens each: far from done)

    asyncio.run(main())
