"""Images through the OpenAI-compatible chat route: ``image_url`` content parts (``data:`` URLs) on a
vision-language model (builtin://tiny-vl, in process, real transformers worker), driven by the real ``openai``
package. The chat template places each image; the prompt equals the one the native client builds for the same
conversation, and every bad image is a 400 naming its content part."""

from __future__ import annotations

import asyncio
import base64
import io
import sys
from pathlib import Path

import httpx
import pytest
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).parent))
from _mock_app import inprocess_app  # noqa: E402

openai = pytest.importorskip("openai")
API = "/api/v1/twinkle"
VL = "builtin://tiny-vl"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    app, keys, _ = inprocess_app(tmp_path_factory.mktemp("oai-vl"), [
        {"backend": "transformers", "model_id": VL},
        {"name": "text", "backend": "transformers", "model_id": "builtin://tiny"}])
    return app, keys["alice"]


def _png(colour: str, size: tuple[int, int] = (64, 48), fmt: str = "PNG") -> bytes:
    im = Image.new("RGB", size, "white")
    ImageDraw.Draw(im).rectangle([10, 10, 40, 36], fill=colour)
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def _url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _oai(app, key):
    return openai.AsyncOpenAI(base_url="http://t/v1", api_key=key, max_retries=0,
                              http_client=httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t"))


def _msgs(*parts):
    return [{"role": "user", "content": list(parts)}]


@pytest.mark.slow
def test_chat_with_images_samples_what_the_native_api_samples(env):
    app, key = env
    red, blue = _png("red"), _png("blue", (32, 80))
    text = {"type": "text", "text": "Which colours?"}

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t",
                                     headers={"X-API-Key": key}, timeout=60) as c:
            # the native prompt for the same conversation, built by the native client's own ChatML renderer
            from twinkle.types import VisionInfo
            from twinkle_client.images import render_chat
            from twinkle_client.tokenizer import load_tokenizer

            caps = (await c.get(f"{API}/capabilities")).json()
            info = next(m for m in caps["base_models"] if m["name"] == VL)
            tok = load_tokenizer(info["tokenizer_id"])
            prompt = render_chat([{"role": "user", "content": [
                {"type": "image", "image": red}, {"type": "image", "image": blue}, text]}], tok,
                VisionInfo.model_validate(info["vision"]))
            r = await c.post(f"{API}/sample", params={"wait": 30}, json={
                "base_model": VL, "prompt": prompt.model_dump(mode="json"),
                "sampling_params": {"max_tokens": 8, "temperature": 0, "stop": []}})
            native = r.json()["result"]["sequences"][0]["tokens"] if "result" in r.json() else None
            if native is None:
                fid = r.json()["future_id"]
                native = (await c.get(f"{API}/futures/{fid}", params={"timeout": 30})).json()["result"]["sequences"][0]["tokens"]
        oa = _oai(app, key)
        msgs = _msgs({"type": "image_url", "image_url": {"url": _url(red)}},
                     {"type": "image_url", "image_url": {"url": _url(blue)}}, text)
        out = await oa.chat.completions.create(model=VL, messages=msgs, max_tokens=8, temperature=0, logprobs=True)
        choice = out.choices[0]
        assert out.usage.prompt_tokens == prompt.length  # the images count as their tokens
        assert out.usage.completion_tokens == len(native) and choice.message.content == tok.decode(native)
        stream = await oa.chat.completions.create(model=VL, messages=msgs, max_tokens=8, temperature=0, stream=True,
                                                  stream_options={"include_usage": True})
        chunks = [ch async for ch in stream]
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == choice.message.content
        assert chunks[-1].usage.prompt_tokens == prompt.length
        # a jpeg works too; and a text-only model refuses images by name
        jpg = await oa.chat.completions.create(model=VL, max_tokens=2, messages=_msgs(
            {"type": "image_url", "image_url": {"url": _url(_png("green", fmt="JPEG"), "image/jpeg")}}, text))
        assert jpg.choices[0].finish_reason in ("stop", "length")
        with pytest.raises(openai.BadRequestError) as e:  # image prompts take the backend's whole-batch path
            await oa.chat.completions.create(model=VL, messages=msgs, max_tokens=2, logprobs=True, top_logprobs=2)
        assert e.value.param == "top_logprobs", e.value
        bad = {"type": "image_url", "image_url": {"url": "data:image/png;base64,!!!!"}}
        with pytest.raises(openai.BadRequestError) as e:  # the second image of a conversation, named as sent
            await oa.chat.completions.create(model=VL, max_tokens=2, messages=[
                msgs[0], {"role": "assistant", "content": "red"}, {"role": "user", "content": [text, bad]}])
        assert e.value.param == "messages.2.content.1.image_url" and "base64" in e.value.message
        with pytest.raises(openai.BadRequestError) as e:
            await oa.chat.completions.create(model="text", max_tokens=2, messages=msgs)
        assert "text-only" in e.value.message and e.value.param == "messages"

    asyncio.run(main())


BAD = [
    ({"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}, "messages.0.content.0.image_url",
     "data: URL"),
    ({"type": "image_url", "image_url": {"url": _url(b"RIFF....WEBP", "image/webp")}}, "messages.0.content.0.image_url",
     "image/webp"),
    ({"type": "image_url", "image_url": {"url": "data:image/png,not-base64"}}, "messages.0.content.0.image_url",
     "base64"),
    ({"type": "image_url", "image_url": {"url": "data:image/png;base64,!!!!"}}, "messages.0.content.0.image_url",
     "base64"),
    ({"type": "image_url", "image_url": {"url": _url(_png("red", fmt="JPEG"))}}, "messages.0.content.0.image_url",
     "png"),
    ({"type": "image_url", "image_url": {"url": _url(_png("red", (5000, 5000)))}}, "messages.0.content.0.image_url",
     "pixels"),
    ({"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}, "messages.0.content.0.type", "input_audio"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("part", "param", "words"), BAD, ids=["http", "webp", "not-base64", "bad-base64",
                                                               "jpeg-said-png", "too-many-pixels", "audio"])
def test_bad_images_are_400_naming_the_part(env, part, param, words):
    app, key = env

    async def main():
        oa = _oai(app, key)
        with pytest.raises(openai.BadRequestError) as e:
            await oa.chat.completions.create(model=VL, max_tokens=2, messages=_msgs(part, {"type": "text", "text": "?"}))
        assert e.value.param == param and words in e.value.message, e.value
        ok = await oa.chat.completions.create(model=VL, max_tokens=2, messages=[{"role": "user", "content": "hi"}])
        assert ok.choices[0].finish_reason in ("stop", "length")  # still serving

    asyncio.run(main())


def test_a_chat_template_that_refuses_the_messages_is_a_400():
    """A template's own ``raise_exception`` (roles out of order, ...) was an unhandled error on the worker."""
    from twinkle.server.openai_text import tokenize
    from twinkle.types import InvalidInputError
    from twinkle_client.tokenizer import load_tokenizer

    tok = load_tokenizer("builtin://tiny")
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' and not loop.first %}"
                         "{{ raise_exception('system must come first') }}{% endif %}{{ m['content'] }}{% endfor %}")
    assert tokenize(tok, messages=[{"role": "system", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(InvalidInputError) as e:
        tokenize(tok, messages=[{"role": "user", "content": "b"}, {"role": "system", "content": "a"}])
    assert e.value.field == "messages" and "system must come first" in str(e.value)
