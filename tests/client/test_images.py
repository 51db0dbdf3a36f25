"""twinkle_client image helpers against the real gateway + a transformers worker on builtin://tiny-vl (in process)."""

from __future__ import annotations

import httpx
import pytest
from PIL import Image, ImageDraw

import twinkle_client
from twinkle.types import ImageChunk, ModelInput, SamplingParams
from twinkle_client._transport import SyncASGITransport
from twinkle_client.images import image_datum, render_chat, vision_info
from twinkle_client.model import TransformersModel
from twinkle_client.sampler import Sampler

URL = "http://twinkle.test"
VL = "builtin://tiny-vl"


@pytest.fixture(scope="module")
def transport(tmp_path_factory):
    from twinkle.server.app import create_app, worker_config
    from twinkle.server.config import ServerConfig
    from twinkle.server.worker import ModelWorker

    tmp = tmp_path_factory.mktemp("vl")
    cfg = ServerConfig.model_validate({
        "persistence": {"sqlite_path": str(tmp / "server.db"), "checkpoint_root": str(tmp / "ckpt")},
        "models": [{"backend": "transformers", "model_id": VL}],
    })
    m = cfg.models[0]
    app = create_app(cfg, {m.served_name: [ModelWorker(worker_config(m))]})
    app.state.service.add_bootstrap_key("key-v", "v")
    t = SyncASGITransport(app, startup=app.state.service.start, shutdown=app.state.service.stop)
    yield t
    t.shutdown_app()


def _pic(colour: str) -> Image.Image:
    im = Image.new("RGB", (64, 48), "white")
    ImageDraw.Draw(im).rectangle([10, 10, 40, 36], fill=colour)
    return im


@pytest.mark.slow
def test_native_client_trains_and_samples_with_images(transport) -> None:
    s = twinkle_client.connect(URL, "key-v", transport=transport, heartbeat=False)
    v = vision_info(s, VL)
    assert v.patch_size == 8 and v.merge_size == 2
    model = TransformersModel(VL, session=s)
    model.add_adapter_to_model("img", r=8)
    model.set_optimizer("AdamW", lr=5e-3)
    tok = model.get_tokenizer()
    msgs = [{"role": "user", "content": [{"type": "image", "image": _pic("red")},
                                         {"type": "text", "text": "Colour?"}]}]
    prompt = render_chat(msgs, tok, v)
    img = [c for c in prompt.chunks if isinstance(c, ImageChunk)]
    assert len(img) == 1 and img[0].expected_tokens == 12  # 64x48 → 8x6 patches → 12 tokens
    d = image_datum(prompt, tok.encode("red<|im_end|>", add_special_tokens=False))
    n = d.model_input.length
    assert len(d.loss_fn_inputs["weights"].data) == n and sum(d.loss_fn_inputs["weights"].data) == 2
    losses = []
    for _ in range(6):
        out = model.forward_backward(inputs=[d])
        model.clip_grad_and_step()
        losses.append(out.metrics["loss:sum"])
    assert losses[-1] < losses[0]
    sampler = Sampler(model)
    r = sampler.sample(prompt, SamplingParams(max_tokens=3, temperature=0.0), prompt_logprobs=True)
    assert len(r.sequences[0].tokens) >= 1
    plp = r.prompt_logprobs
    assert len(plp) == prompt.length and sum(v_ is None for v_ in plp) == 1 + 12
    whole = sampler.generate(msgs, max_tokens=3)
    assert isinstance(whole, str)
    assert "".join(sampler.generate(msgs, max_tokens=3, stream=True)) == whole  # streamed too (was a 400)
    # the native API may omit expected_tokens: the server counts
    bare = ModelInput(chunks=[c if not isinstance(c, ImageChunk) else c.model_copy(update={"expected_tokens": None})
                              for c in prompt.chunks])
    assert len(sampler.sample(bare, SamplingParams(max_tokens=1)).sequences) == 1
    # a wrong count is a 400 naming the field
    wrong = ModelInput(chunks=[c if not isinstance(c, ImageChunk) else c.model_copy(update={"expected_tokens": 11})
                               for c in prompt.chunks])
    http = httpx.Client(transport=transport, base_url=URL, headers={"Authorization": "Bearer key-v"})
    resp = http.post("/api/v1/twinkle/sample", json={"base_model": VL, "prompt": wrong.model_dump(mode="json"),
                                             "sampling_params": {"max_tokens": 1}})
    assert resp.status_code == 400, resp.text
    assert "Expected 11 tokens, got 12 from image" in resp.json()["error"]
    assert resp.json()["detail"]["field"].startswith("prompt.chunks[1]")
    s.close()


def test_text_only_model_refuses_images_naming_the_model(tmp_path) -> None:
    """The mock backend (like megatron) has no vision tower: the gateway answers 400 before queuing."""
    import base64
    import io

    from inprocess_server import InProcessServer

    srv = InProcessServer(tmp_path)
    try:
        buf = io.BytesIO()
        _pic("red").save(buf, format="PNG")
        prompt = {"chunks": [{"type": "encoded_text", "tokens": [5, 6]},
                             {"type": "image", "data": base64.b64encode(buf.getvalue()).decode(), "format": "png",
                              "expected_tokens": 12}]}
        http = httpx.Client(transport=srv.transport, base_url=URL, headers={"Authorization": "Bearer key-alice"})
        resp = http.post("/api/v1/twinkle/sample", json={"base_model": "mock://tiny", "prompt": prompt,
                                                         "sampling_params": {"max_tokens": 1}})
        assert resp.status_code == 400, resp.text
        body = resp.json()
        assert "text-only" in body["error"] and "mock://tiny" in body["error"]
        assert body["detail"]["field"] == "prompt.chunks[1].type"
        assert http.get("/api/v1/healthz").status_code == 200
    finally:
        srv.close()
