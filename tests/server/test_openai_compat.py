"""The OpenAI-compatible endpoint and native SSE streaming, on the in-process app with the real transformers
backend (builtin tiny model), driven by the real ``openai`` package."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from twinkle.server.app import create_app, worker_config
from twinkle.server.config import parse_config
from twinkle.server.store import Store
from twinkle.server.worker import ModelWorker

openai = pytest.importorskip("openai")
API = "/api/v1/twinkle"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp: Path = tmp_path_factory.mktemp("oai")
    cfg = parse_config({
        "persistence": {"sqlite_path": str(tmp / "db.sqlite"), "checkpoint_root": str(tmp / "ck")},
        "models": [{"name": "tiny", "backend": "transformers", "model_id": "builtin://tiny"}],
    })
    store = Store(cfg.persistence.sqlite_file())
    keys = {"alice": store.create_key("alice")[1], "bob": store.create_key("bob")[1]}
    app = create_app(cfg, {"tiny": [ModelWorker(worker_config(cfg.models[0]))]}, store=store)
    return app, keys


def _http(app, key):
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t",
                             headers={"X-API-Key": key}, timeout=60)


def _oai(app, key):
    return openai.AsyncOpenAI(base_url="http://t/v1", api_key=key, max_retries=0,
                              http_client=httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t"))


async def _done(c, ref):
    r = await c.get(f"{API}/futures/{ref['future_id']}", params={"timeout": 30})
    body = r.json()
    assert body["status"] == "complete", body
    return body["result"]


async def _run_and_ckpt(c):
    sid = (await c.post(f"{API}/sessions", json={"lease_seconds": 120})).json()["session_id"]
    r = await c.post(f"{API}/runs", json={"session_id": sid, "base_model": "tiny", "lora": {"rank": 4}})
    run = (await _done(c, r.json()))["run_id"]
    datum = {"model_input": {"chunks": [{"type": "encoded_text", "tokens": [5, 9, 17, 33]}]},
             "loss_fn_inputs": {"target_tokens": {"data": [9, 17, 33, 2], "dtype": "int64"}}}
    for _ in range(2):  # move the adapter away from the base model
        await _done(c, (await c.post(f"{API}/runs/{run}/forward_backward", json={"data": [datum]})).json())
        await _done(c, (await c.post(f"{API}/runs/{run}/optim_step",
                                     json={"adam_params": {"learning_rate": 0.05}})).json())
    ck = await _done(c, (await c.post(f"{API}/runs/{run}/checkpoints", json={"name": "s1", "kind": "sampler"})).json())
    return run, ck["path"]


@pytest.mark.slow
def test_openai_package_and_sse(env):
    app, keys = env

    async def main():
        async with _http(app, keys["alice"]) as c:
            run, ck_path = await _run_and_ckpt(c)
            # native SSE: the token events add up to the final SampleResponse
            body = {"run_id": run, "prompt": {"chunks": [{"type": "encoded_text", "tokens": [5, 6, 7]}]},
                    "num_samples": 2, "sampling_params": {"max_tokens": 6, "temperature": 1.0, "seed": 3, "stop": []}}
            r = await c.post(f"{API}/sample/stream", json=body)
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            events = [(b.split("\n")[0][7:], json.loads(b.split("\n")[1][6:])) for b in r.text.strip().split("\n\n")]
            assert events[-1][0] == "done"
            final = events[-1][1]["sequences"]
            for i in range(2):
                assert [e["token"] for k, e in events if k == "token" and e["index"] == i] == final[i]["tokens"]
            plain = await _done(c, (await c.post(f"{API}/sample", json=body)).json())
            assert [s["tokens"] for s in plain["sequences"]] == [s["tokens"] for s in final]  # same seed
            r = await c.post(f"{API}/sample/stream", json={**body, "run_id": "nope"})
            assert r.status_code == 404
            # the k most likely tokens at each sampled position, with each token event
            r = await c.post(f"{API}/sample/stream", json={**body, "topk_logprobs": 3})
            ranked = [json.loads(b.split("\n")[1][6:]) for b in r.text.strip().split("\n\n") if b.startswith("event: token")]
            assert [e["token"] for e in ranked if e["index"] == 0] == final[0]["tokens"]  # same seed, same tokens
            for e in ranked:
                lps = [lp for _, _, lp in e["top"]]
                assert len(e["top"]) == 3 and lps == sorted(lps, reverse=True) and e["logprob"] <= lps[0] + 1e-5
                assert e["token"] not in [t for t, _, _ in e["top"]] or e["logprob"] >= lps[-1] - 1e-5
            assert "top" not in events[1][1]  # not asked: not sent

        oa = _oai(app, keys["alice"])
        ids = [m.id for m in (await oa.models.list()).data]
        assert "tiny" in ids and run in ids and ck_path in ids
        for name in ("tiny", run, ck_path, f"{run}/s1"):  # one by any name `model` takes
            got = await oa.models.retrieve(name)
            assert got.id == name and getattr(got, "root", None) == "tiny", got
        for name in ("nope", f"{run}/nope", "tinker://nope/sampler_weights/x"):
            with pytest.raises(openai.NotFoundError):
                await oa.models.retrieve(name)
        with pytest.raises(openai.NotFoundError):  # another user's run: the same 404
            await _oai(app, keys["bob"]).models.retrieve(run)
        msgs = [{"role": "user", "content": "hello there"}]
        full = await oa.chat.completions.create(model=run, messages=msgs, max_tokens=12, temperature=0)
        text = full.choices[0].message.content
        assert full.usage.completion_tokens > 0 and full.choices[0].finish_reason in ("stop", "length")
        stream = await oa.chat.completions.create(model=run, messages=msgs, max_tokens=12, temperature=0, stream=True)
        pieces = [ch.choices[0].delta.content or "" async for ch in stream if ch.choices]
        assert "".join(pieces) == text and len([p for p in pieces if p]) >= 1
        # the same adapter by its checkpoint, by run/name, and the base model: all answer
        for model in (ck_path, f"{run}/s1", "tiny"):
            out = await oa.completions.create(model=model, prompt="once upon", max_tokens=5, temperature=0)
            assert out.choices[0].finish_reason in ("stop", "length")
        ck = await oa.chat.completions.create(model=ck_path, messages=msgs, max_tokens=12, temperature=0)
        assert ck.choices[0].message.content == text  # the saved adapter is the live one

        ob = _oai(app, keys["bob"])
        for model in (run, ck_path, f"{run}/s1"):
            with pytest.raises(openai.NotFoundError):
                await ob.chat.completions.create(model=model, messages=msgs, max_tokens=4)
        with pytest.raises(openai.AuthenticationError):
            await _oai(app, "wrong-key").models.list()
        with pytest.raises(openai.BadRequestError):
            await oa.chat.completions.create(model="tiny", messages=[], max_tokens=4)

    asyncio.run(main())


@pytest.mark.slow
def test_client_sampler_stream_yields_text_pieces(env):
    import twinkle_client
    from twinkle.types import InvalidInputError, SamplingParams
    from twinkle_client._transport import SyncASGITransport
    from twinkle_client.sampler import Sampler

    app, keys = env
    transport = SyncASGITransport(app)
    try:
        sess = twinkle_client.connect("http://t", keys["alice"], transport=transport, heartbeat=False,
                                      make_current=False)
        sampler = Sampler(base_model="tiny", session=sess)
        pieces = list(sampler.generate("hello", max_tokens=10, temperature=0.0, stream=True))
        assert pieces and "".join(pieces) == sampler.generate("hello", max_tokens=10, temperature=0.0)
        events = list(sampler.stream([5, 6, 7], SamplingParams(max_tokens=5, temperature=0.0, stop=[])))
        final = events[-1]["done"]
        assert [e["token"] for e in events[:-1]] == final.sequences[0].tokens
        ranked = list(sampler.stream([5, 6, 7], SamplingParams(max_tokens=5, temperature=0.0, stop=[]),
                                     topk_logprobs=2))
        assert all(len(e["top"]) == 2 and e["top"][0][0] == e["token"] for e in ranked[:-1])  # greedy: the top one
        with pytest.raises(InvalidInputError) as e:  # refused before the stream starts: a plain 4xx
            list(Sampler(base_model="nope", session=sess).stream([5], SamplingParams(max_tokens=2)))
        assert e.value.field == "base_model"
    finally:
        transport.close()


@pytest.mark.slow
def test_a_stop_string_across_tokens_is_not_streamed_in_part(env):
    """builtin://tiny answers "onon..." a token "on" at a time: the stop "non" spans two tokens. The stream
    held back nothing, so it sent "on" before the stop completed ("o" is the answer)."""
    app, keys = env

    async def main():
        oa = _oai(app, keys["alice"])
        args = {"model": "tiny", "prompt": "once upon", "max_tokens": 8, "temperature": 0}
        plain = (await oa.completions.create(**args)).choices[0].text
        assert plain.startswith("onon")  # the premise: what the tiny model says
        for stop in ("non", ["xyz", "non"]):
            full = await oa.completions.create(**args, stop=stop)
            assert full.choices[0].text == "o" and full.choices[0].finish_reason == "stop"
            stream = await oa.completions.create(**args, stop=stop, stream=True)
            pieces = [c.choices[0].text async for c in stream if c.choices]
            assert "".join(pieces) == "o", pieces
        stream = await oa.completions.create(**args, stop="nox", stream=True)  # held back, never a stop: all sent
        assert "".join([c.choices[0].text async for c in stream if c.choices]) == plain

    asyncio.run(main())


@pytest.mark.slow
def test_openai_logprobs_are_the_sampled_tokens_logprobs(env):
    """``logprobs`` (chat: ``logprobs: true``; completions: ``logprobs: 0``) give each returned token's logprob:
    the same numbers as the native API's for the same seeded request, the tokens' texts adding up to the
    returned text, streamed or not, and a stop string's tokens left out with its text."""
    app, keys = env

    async def main():
        oa = _oai(app, keys["alice"])
        args = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 8, "temperature": 1.0, "seed": 11}
        out = (await oa.completions.create(**args, logprobs=0)).choices[0]
        async with _http(app, keys["alice"]) as c:
            native = await _done(c, (await c.post(f"{API}/sample", json={
                "base_model": "tiny", "prompt": {"chunks": [{"type": "encoded_text", "tokens": [5, 6, 7]}]},
                "sampling_params": {"max_tokens": 8, "temperature": 1.0, "seed": 11}})).json())
        seq = native["sequences"][0]
        lp = out.logprobs
        assert "".join(lp.tokens) == out.text and len(lp.token_logprobs) == len(seq["tokens"]) - (
            seq["stop_reason"] == "stop")  # an EOS token adds no text and no entry
        assert lp.token_logprobs == pytest.approx(seq["logprobs"][:len(lp.token_logprobs)], abs=1e-4)
        assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
        streamed = [c.choices[0] async for c in await oa.completions.create(**args, logprobs=0, stream=True)]
        assert [x for ch in streamed if ch.logprobs for x in ch.logprobs.token_logprobs] == lp.token_logprobs
        # a stop string: its tokens are left out as its text is
        greedy = {**args, "prompt": "once upon", "temperature": 0}  # "onon...", a token "on" at a time
        cut = (await oa.completions.create(**greedy, logprobs=0, stop="non")).choices[0]
        assert cut.text == "o" and cut.logprobs.tokens == ["o"]  # the token "on" the stop starts inside, cut there
        lps = [x for ch in [c.choices[0] async for c in await oa.completions.create(
            **greedy, logprobs=0, stop="non", stream=True)] if ch.logprobs for x in ch.logprobs.tokens]
        assert lps == ["o"]  # streamed too, though no text follows it

        msgs = [{"role": "user", "content": "hello there"}]
        chat = (await oa.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, logprobs=True,
                                                 temperature=0)).choices[0]
        content = chat.logprobs.content
        assert content and "".join(e.token for e in content) == chat.message.content
        assert all(e.logprob <= 0 and bytes(e.bytes) == e.token.encode() and e.top_logprobs == [] for e in content)
        stream = await oa.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, logprobs=True,
                                                  temperature=0, stream=True)
        pieces = [e for ch in [c async for c in stream] if ch.choices and ch.choices[0].logprobs
                  for e in ch.choices[0].logprobs.content]
        assert [(e.token, e.logprob) for e in pieces] == [(e.token, e.logprob) for e in content]
        plain = (await oa.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, temperature=0)).choices[0]
        assert plain.logprobs is None
        for role in ("system", "developer"):  # OpenAI's newer name for the system message: the same prompt
            sys_ = await oa.chat.completions.create(model="tiny", max_tokens=4, temperature=0, logprobs=True,
                                                    messages=[{"role": role, "content": "be brief"}, *msgs])
            if role == "system":
                want = sys_.usage.prompt_tokens, sys_.choices[0].logprobs.content[0].logprob
        assert (sys_.usage.prompt_tokens, sys_.choices[0].logprobs.content[0].logprob) == want

    asyncio.run(main())


@pytest.mark.slow
def test_a_deleted_runs_checkpoint_still_answers(env):
    """``model`` = run id is looked up directly (it was searched among the user's first 1000 runs); a deleted
    run is a 404, its saved sampler checkpoint still answers by ``<run>/<name>``."""
    app, keys = env

    async def main():
        async with _http(app, keys["alice"]) as c:
            run, _ = await _run_and_ckpt(c)
            r = await c.delete(f"{API}/runs/{run}")
            assert r.status_code == 200, r.text
        oa = _oai(app, keys["alice"])
        with pytest.raises(openai.NotFoundError):
            await oa.completions.create(model=run, prompt=[5, 6], max_tokens=2)
        out = await oa.completions.create(model=f"{run}/s1", prompt=[5, 6], max_tokens=2)
        assert out.choices[0].finish_reason in ("stop", "length")
        with pytest.raises(openai.NotFoundError) as e:  # someone else's: unknown, nothing more
            await _oai(app, keys["bob"]).completions.create(model=run, prompt=[5, 6], max_tokens=2)
        assert "not found" in str(e.value.body), e.value.body

    asyncio.run(main())


@pytest.mark.slow
def test_openai_top_logprobs_are_the_models_most_likely_tokens(env):
    """``top_logprobs`` (chat) / ``logprobs: k`` (completions) list the k most likely tokens at each returned
    position: the same logprobs a full forward gives (the native API's top-k prompt logprobs over prompt +
    completion), likeliest first, the greedy choice first of all; streamed or not."""
    app, keys = env

    async def main():
        oa = _oai(app, keys["alice"])
        args = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 6, "temperature": 0}
        out = (await oa.completions.create(**args, logprobs=3)).choices[0]
        async with _http(app, keys["alice"]) as c:
            body = {"base_model": "tiny", "prompt": {"chunks": [{"type": "encoded_text", "tokens": [5, 6, 7]}]},
                    "sampling_params": {"max_tokens": 6, "temperature": 0}}
            toks = (await _done(c, (await c.post(f"{API}/sample", json=body)).json()))["sequences"][0]["tokens"]
            full = [5, 6, 7, *toks]
            body = {**body, "prompt": {"chunks": [{"type": "encoded_text", "tokens": full}]},
                    "sampling_params": {"max_tokens": 1}, "topk_prompt_logprobs": 3}
            ref = (await _done(c, (await c.post(f"{API}/sample", json=body)).json()))["topk_prompt_logprobs"]
        lp = out.logprobs
        assert lp.top_logprobs and len(lp.top_logprobs) == len(lp.tokens)
        for i, alts in enumerate(lp.top_logprobs):
            want = sorted((v for _, v in ref[3 + i]), reverse=True)  # position 3 + i predicts completion token i
            assert sorted(alts.values(), reverse=True) == pytest.approx(want[:len(alts)], abs=1e-4)
            assert max(alts.values()) == pytest.approx(lp.token_logprobs[i], abs=1e-6)  # greedy: the likeliest
        streamed = [c.choices[0] async for c in await oa.completions.create(**args, logprobs=3, stream=True)]
        assert [a for ch in streamed if ch.logprobs for a in ch.logprobs.top_logprobs] == lp.top_logprobs

        msgs = [{"role": "user", "content": "hello there"}]
        chat = (await oa.chat.completions.create(model="tiny", messages=msgs, max_tokens=5, temperature=0,
                                                 logprobs=True, top_logprobs=4)).choices[0]
        for e in chat.logprobs.content:
            alts = [a.logprob for a in e.top_logprobs]
            assert len(alts) == 4 and alts == sorted(alts, reverse=True)
            assert e.top_logprobs[0].token == e.token and alts[0] == pytest.approx(e.logprob, abs=1e-6)

    asyncio.run(main())


@pytest.mark.slow
def test_openai_echo_scores_the_prompt(env):
    """``echo`` (completions): the prompt's text comes back before the completion, and with ``logprobs`` the
    prompt's tokens are scored too (the first has none), as evaluation harnesses ask (``max_tokens: 0``): the
    same numbers as the native API's prompt logprobs."""
    app, keys = env

    async def main():
        oa = _oai(app, keys["alice"])
        scored = (await oa.completions.create(model="tiny", prompt="once upon a time", max_tokens=0, echo=True,
                                              logprobs=2)).choices[0]
        lp = scored.logprobs
        assert scored.text == "once upon a time" == "".join(lp.tokens)
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
        ids = [5, 6, 7, 8, 9]
        by_ids = (await oa.completions.create(model="tiny", prompt=ids, max_tokens=0, echo=True,
                                              logprobs=0)).choices[0].logprobs.token_logprobs
        async with _http(app, keys["alice"]) as c:
            native = await _done(c, (await c.post(f"{API}/sample", json={
                "base_model": "tiny", "prompt": {"chunks": [{"type": "encoded_text", "tokens": ids}]},
                "sampling_params": {"max_tokens": 1}, "prompt_logprobs": True})).json())
        assert by_ids[0] is None and by_ids[1:] == pytest.approx(native["prompt_logprobs"][1:], abs=1e-5)
        for i in range(1, len(lp.tokens)):
            assert len(lp.top_logprobs[i]) <= 2 and max(lp.top_logprobs[i].values()) >= lp.token_logprobs[i] - 1e-6
        both = (await oa.completions.create(model="tiny", prompt="once upon a time", max_tokens=3, echo=True,
                                            logprobs=0, temperature=0)).choices[0]
        assert both.text.startswith("once upon a time") and len(both.text) > len("once upon a time")
        assert both.logprobs.token_logprobs[:len(lp.tokens)] == pytest.approx(lp.token_logprobs, abs=1e-4)
        assert "".join(both.logprobs.tokens) == both.text
        plain = (await oa.completions.create(model="tiny", prompt="once upon", max_tokens=2, echo=True)).choices[0]
        assert plain.text.startswith("once upon") and plain.logprobs is None
        with pytest.raises(openai.BadRequestError):
            await oa.completions.create(model="tiny", prompt="once", max_tokens=2, echo=True, stream=True)

    asyncio.run(main())


@pytest.mark.slow
def test_an_empty_stop_list_still_stops_at_eos(env):
    """To OpenAI ``stop: []`` means no stop strings (some clients always send the list); it was passed on as
    the native "no stops at all", so the generation ran past EOS to max_tokens."""
    app, keys = env

    async def main():
        oa = _oai(app, keys["alice"])
        # seed 4 samples EOS after ~40 tokens on builtin://tiny (checked by the first assertion)
        plain = (await oa.completions.create(model="tiny", prompt=[5, 6], max_tokens=300, seed=4)).choices[0]
        assert plain.finish_reason == "stop"
        empty = (await oa.completions.create(model="tiny", prompt=[5, 6], max_tokens=300, seed=4,
                                             stop=[])).choices[0]
        assert (empty.finish_reason, empty.text) == ("stop", plain.text)

    asyncio.run(main())


@pytest.mark.slow
def test_stream_usage_top_k_and_unsupported_knobs(env):
    """``stream_options.include_usage`` adds OpenAI's usage chunk (no choices) before ``[DONE]``; ``top_k`` (an
    extension, as vLLM's) reaches the sampler: ``top_k: 1`` at temperature 1 is greedy; knobs that would change
    the answer and are not implemented are refused by name instead of ignored."""
    app, keys = env

    async def main():
        oa = _oai(app, keys["alice"])
        chunks = [c async for c in await oa.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5, n=2, stream=True,
            stream_options={"include_usage": True}, stop=[])]
        last = chunks[-1]
        assert last.choices == [] and last.usage.completion_tokens == 10
        assert last.usage.total_tokens == last.usage.prompt_tokens + 10 and last.usage.prompt_tokens > 0
        assert all(c.usage is None for c in chunks[:-1])
        plain = [c async for c in await oa.completions.create(model="tiny", prompt=[5, 6], max_tokens=3,
                                                                stream=True)]
        assert all(c.usage is None for c in plain)
        greedy = await oa.completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=8, temperature=0)
        top1 = await oa.completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=8, temperature=1,
                                           extra_body={"top_k": 1})
        assert top1.choices[0].text == greedy.choices[0].text
        for kw, field in [({"frequency_penalty": 0.5}, "frequency_penalty"),
                          ({"presence_penalty": -1}, "presence_penalty"),
                          ({"logit_bias": {"5": 10}}, "logit_bias"),
                          ({"stream_options": {"include_usage": True}}, "stream_options"),
                          ({"extra_body": {"top_k": -2}}, "top_k")]:
            with pytest.raises(openai.BadRequestError) as e:
                await oa.completions.create(model="tiny", prompt=[5], max_tokens=2, **kw)
            assert e.value.param == field and field in e.value.message, (kw, e.value)  # OpenAI's error shape
        with pytest.raises(openai.AuthenticationError) as e:
            await _oai(app, "not-a-key").models.list()
        assert e.value.type == "authentication_error" and "key" in e.value.message.lower(), e.value
        with pytest.raises(openai.NotFoundError) as e:
            await oa.completions.create(model="no-such-model", prompt=[5], max_tokens=2)
        assert e.value.param == "model" and "no-such-model" in e.value.message, e.value
        ok = await oa.completions.create(model="tiny", prompt=[5], max_tokens=2, frequency_penalty=0,
                                         logit_bias={}, user="someone")
        assert ok.choices[0].finish_reason in ("stop", "length")

    asyncio.run(main())
