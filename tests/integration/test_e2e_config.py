"""End to end: ONE real server (Ray Serve) launched from exactly ``cookbook/client/server/transformer/server_config_e2e.yaml``
(every feature on: a text and a vision-language model side by side, sampler/scheduler settings, limits, leases,
persistence, telemetry), driven by both clients through train -> save -> sample on both models.

The file is launched as shipped; only its ``${TWINKLE_E2E_*}`` environment variables are set: a free port, a temp
persistence root, the OTLP receiver of ``tests/otlp_receiver.py`` and an admin bootstrap key. One launch for the
module; a few steps per model (the cost is the server start).
"""

from __future__ import annotations

import io
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

tinker = pytest.importorskip("tinker")
from tinker import types as tt  # noqa: E402

from tests.integration.conftest import ServerHandle, _free_port, native_lora_losses  # noqa: E402
from tests.integration.test_vision_tinker import _datum as vl_datum  # noqa: E402
from tests.integration.test_vision_tinker import _prompt as vl_prompt  # noqa: E402
from tests.integration.test_vision_tinker import draw  # noqa: E402
from tests.otlp_receiver import OtlpReceiver  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.integration]

CONFIG = Path(__file__).resolve().parents[2] / "cookbook" / "client" / "server" / "transformer" / "server_config_e2e.yaml"
TEXT, VISION = "text", "vision"  # the served names in the file
ADMIN_KEY = "tml-e2e-admin-" + "z" * 20
GREEDY = {"max_tokens": 6, "temperature": 0.0}
_TRAINED: set[str] = set()  # models the tests above trained on in this session (their tokens show in telemetry)


@pytest.fixture(scope="module")
def e2e(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    pytest.importorskip("ray.serve")
    root = tmp_path_factory.mktemp("twinkle-e2e")
    otlp = OtlpReceiver()
    port = _free_port()
    env = {"TWINKLE_E2E_PORT": str(port), "TWINKLE_E2E_ROOT": str(root),
           "TWINKLE_E2E_OTLP": f"http://127.0.0.1:{otlp.port}", "TWINKLE_E2E_ADMIN_KEY": ADMIN_KEY}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the launched server and the `keys create` CLI read them from the file's ${...}
    handle = ServerHandle(url=f"http://127.0.0.1:{port}", port=port, workdir=root, config_path=CONFIG,
                          log_path=root / "server.log")
    handle.otlp = otlp  # type: ignore[attr-defined]
    try:
        handle.create_key("alice")
        handle.start()
        try:
            yield handle
        finally:
            handle.stop()
    finally:
        otlp.close()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_native_client_train_save_sample_on_both_models(e2e: ServerHandle) -> None:
    from PIL import Image

    from twinkle.types import LoraConfig, SamplingParams
    from twinkle_client import connect
    from twinkle_client.images import image_datum, render_chat, vision_info
    from twinkle_client.model import TransformersModel
    from twinkle_client.sampler import Sampler

    with connect(e2e.url, api_key=e2e.api_key) as session:
        text = TransformersModel(TEXT, session=session)
        losses = native_lora_losses(text, "e2e-text", 4)
        assert losses[-1] < 0.8 * losses[0], losses
        path = text.save("native-text")
        prompt = list(range(10, 20))
        live = Sampler(text).sample(prompt, GREEDY).sequences[0].tokens
        saved = Sampler(checkpoint=path, session=session).sample(prompt, GREEDY).sequences[0].tokens
        assert saved == live and len(saved) >= 1, (saved, live)
        _TRAINED.add(TEXT)

        vision = vision_info(session, VISION)
        vl = TransformersModel(VISION, session=session)
        vl.add_adapter_to_model("e2e-vision", LoraConfig(rank=8, seed=0))
        vl.set_optimizer("AdamW", lr=5e-3)
        tok = vl.get_tokenizer()
        image = draw("red", "circle", random.Random(0))
        msgs = [{"role": "user", "content": [{"type": "image", "image": Image.open(io.BytesIO(image))},
                                             {"type": "text", "text": "What is in the picture?"}]}]
        q = render_chat(msgs, tok, vision)
        batch = [image_datum(q, tok.encode("red circle<|im_end|>", add_special_tokens=False))]
        vl_losses = []
        for _ in range(3):
            vl.forward_backward(inputs=batch)
            vl.clip_grad_and_step()
            vl_losses.append(float(vl.calculate_metric()["loss"]))
        assert vl_losses[-1] < vl_losses[0], vl_losses
        vpath = vl.save("native-vision")
        params = SamplingParams(max_tokens=4, temperature=0.0)
        live_v = Sampler(vl).sample(q, params).sequences[0].tokens
        saved_v = Sampler(checkpoint=vpath, session=session).sample(q, params).sequences[0].tokens
        assert saved_v == live_v and len(saved_v) >= 1
        _TRAINED.add(VISION)
    # persistence lives under the root the test chose (TWINKLE_E2E_ROOT)
    assert (e2e.workdir / "server.db").is_file()
    assert len(list((e2e.workdir / "checkpoints").rglob("adapter_model.safetensors"))) >= 2


def test_streaming_and_openai_routes_reach_the_worker_replicas(e2e: ServerHandle) -> None:
    """Two models: each runs in a worker replica of its own, so streamed sampling and the OpenAI routes'
    tokenizing cross the Ray handle to the worker deployment (which once lacked those methods: a 500)."""
    with httpx.Client(base_url=e2e.url, headers={"X-API-Key": e2e.api_key}, timeout=120) as c:
        body = {"base_model": TEXT, "sampling_params": GREEDY,
                "prompt": {"chunks": [{"type": "encoded_text", "tokens": list(range(10, 20))}]}}
        with c.stream("POST", "/api/v1/twinkle/sample/stream", json=body) as r:
            assert r.status_code == 200, r.read()
            events = "".join(r.iter_text())
        assert "event: token" in events and "event: done" in events and "event: error" not in events, events[-800:]
        r = c.post("/v1/completions", json={"model": TEXT, "prompt": "Hello", "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200, r.text
        assert isinstance(r.json()["choices"][0]["text"], str)
        r = c.post("/v1/chat/completions", json={"model": TEXT, "max_tokens": 4,
                                                 "messages": [{"role": "user", "content": "Hi"}]})
        assert r.status_code == 200, r.text


def test_tinker_sdk_train_save_sample_on_both_models(e2e: ServerHandle) -> None:
    sc = tinker.ServiceClient(base_url=e2e.url, api_key=e2e.api_key)
    try:
        tc = sc.create_lora_training_client(base_model=TEXT, rank=8, seed=1).result()
        ids = tc.get_tokenizer().encode("The quick brown fox jumps over the lazy dog.")
        batch = [tt.Datum(model_input=tt.ModelInput.from_ints(ids[:-1]),
                          loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)})]
        losses = []
        for _ in range(6):
            fb = tc.forward_backward(batch, "cross_entropy")
            tc.optim_step(tt.AdamParams(learning_rate=1e-2))
            losses.append(fb.result().metrics["loss:sum"])
        assert losses[-1] < 0.8 * losses[0], losses
        sampler = tc.save_weights_and_get_sampling_client("tinker-text")
        prompt = tt.ModelInput.from_ints(ids[:4])
        got = sampler.sample(prompt, 1, tt.SamplingParams(max_tokens=6, temperature=0.0)).result()
        assert len(got.sequences[0].tokens) >= 1
        # a checkpoint saved for the sampler is a path any client can sample from: the same greedy tokens
        saved = tc.save_weights_for_sampler("tinker-text-2").result().path
        again = sc.create_sampling_client(model_path=saved).sample(
            prompt, 1, tt.SamplingParams(max_tokens=6, temperature=0.0)).result()
        assert again.sequences[0].tokens == got.sequences[0].tokens

        from twinkle.model.hub import load_tokenizer

        vtok = load_tokenizer("builtin://tiny-vl")
        vc = sc.create_lora_training_client(base_model=VISION, rank=8).result()
        png = draw("blue", "square", random.Random(1))
        rows = [vl_datum(vtok, png, "blue square")]
        vl_losses = []
        for _ in range(3):
            fb = vc.forward_backward(rows, "cross_entropy")
            vc.optim_step(tt.AdamParams(learning_rate=5e-3))
            vl_losses.append(fb.result().metrics["loss:sum"])
        assert vl_losses[-1] < vl_losses[0], vl_losses
        out = vc.save_weights_and_get_sampling_client("tinker-vision").sample(
            vl_prompt(vtok, png), 1, tt.SamplingParams(max_tokens=4, temperature=0.0)).result()
        assert len(out.sequences[0].tokens) >= 1
        _TRAINED.add(VISION)
    finally:
        sc.close("success").result()


def test_telemetry_reached_the_receiver_and_the_metrics_endpoint(e2e: ServerHandle) -> None:
    """After the two tests above (or alone: it trains a step itself): traces, and pushed metrics of every model trained
    at the OTLP receiver named in the file; /metrics answers the bootstrap admin key and refuses a user key."""
    rx: OtlpReceiver = e2e.otlp  # type: ignore[attr-defined]
    with httpx.Client(base_url=e2e.url + "/api/v1/twinkle", headers={"X-API-Key": e2e.api_key}, timeout=60) as c:
        sid = c.post("/sessions", json={"lease_seconds": 120}).json()["session_id"]
        for base in (TEXT,):  # at least one step here, so the test also passes alone
            ref = c.post("/runs", json={"session_id": sid, "base_model": base, "lora": {"rank": 4}}).json()
            run = c.get(f"/futures/{ref['future_id']}", params={"timeout": 50}).json()["result"]["run_id"]
            toks = list(range(5, 15))
            r = c.post(f"/runs/{run}/forward_backward", json={"data": [{
                "model_input": {"chunks": [{"type": "encoded_text", "tokens": toks}]},
                "loss_fn_inputs": {"target_tokens": {"data": toks[1:] + [2], "dtype": "int64"},
                                   "weights": {"data": [1] * 10, "dtype": "float32"}}}]})
            assert c.get(f"/futures/{r.json()['future_id']}", params={"timeout": 50}).json()["status"] == "complete"
        assert httpx.get(e2e.url + "/metrics", headers={"X-API-Key": e2e.api_key}).status_code == 403
    scrape = httpx.get(e2e.url + "/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30)
    assert scrape.status_code == 200 and "twinkle_tokens" in scrape.text
    deadline = time.monotonic() + 30
    trained: set[str] = set()
    while time.monotonic() < deadline:
        fams = rx.last_metrics()
        trained = {p["attrs"].get("base_model") for p in fams.get("twinkle_tokens", {}).get("points", [])
                   if p["attrs"].get("kind") == "trained" and p["value"] > 0}
        with rx.lock:
            names = {s["name"] for s in rx.spans}
            services = {s["resource"].get("service.name") for s in rx.spans}
        if _TRAINED | {TEXT} <= trained and "batch" in names:
            break
        time.sleep(0.5)
    assert _TRAINED | {TEXT} <= trained, (_TRAINED, trained)
    assert {"batch", "queue"} <= names and services == {"twinkle-e2e"}, (names, services)
