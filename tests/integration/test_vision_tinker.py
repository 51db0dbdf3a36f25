"""Images through a real Twinkle server and the unmodified tinker 0.38 SDK on builtin://tiny-vl.

The model learns "what is in this picture?" from images of coloured shapes; the prompt is identical for
every row, so only the image carries the answer. Also: the image error cases answer 400 and the server
keeps serving; a text-only model refuses images naming the model.
"""

from __future__ import annotations

import io
import random
import socket
import tempfile
import threading
import time

import pytest

tinker = pytest.importorskip("tinker")
from PIL import Image, ImageDraw  # noqa: E402
from tinker import types as tt  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.slow]

VL, TEXT = "builtin://tiny-vl", "builtin://tiny"
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 60, 220), "yellow": (230, 210, 20)}
SHAPES = ("circle", "square", "triangle")
_KEY = "tml-vision-it"


def draw(colour: str, kind: str, rng: random.Random, jitter: int = 0) -> bytes:
    im = Image.new("RGB", (64, 64), (255, 255, 255))
    d = ImageDraw.Draw(im)
    j = rng.randint(-jitter, jitter)
    a, b = 14 + j, 50 + j
    fill = COLOURS[colour]
    if kind == "circle":
        d.ellipse([a, a, b, b], fill=fill)
    elif kind == "square":
        d.rectangle([a, a, b, b], fill=fill)
    else:
        d.polygon([(32 + j, a), (a, b), (b, b)], fill=fill)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def srv():
    import uvicorn

    from twinkle.server.app import create_app, worker_config
    from twinkle.server.config import parse_config
    from twinkle.server.worker import ModelWorker

    d = tempfile.mkdtemp(prefix="twinkle-vision-it-")
    cfg = parse_config({
        "models": [{"backend": "transformers", "model_id": VL}, {"backend": "mock", "model_id": TEXT}],
        "persistence": {"sqlite_path": f"{d}/server.db", "checkpoint_root": f"{d}/checkpoints"},
        "auth": {"bootstrap_key_env": None},
    })
    workers = {m.served_name: [ModelWorker(worker_config(m), 0)] for m in cfg.models}
    app = create_app(cfg, workers)
    app.state.service.add_bootstrap_key(_KEY, "vision-it")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=server.run, daemon=True, name="twinkle-vision-it")
    th.start()
    deadline = time.time() + 300
    while not server.started:
        assert time.time() < deadline, "server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    th.join(timeout=30)


@pytest.fixture(scope="module")
def tok():
    from twinkle.model.hub import load_tokenizer

    return load_tokenizer(VL)


def _prompt(tok, png: bytes, n: int | None = 16) -> tt.ModelInput:
    pre = tok.encode("<|im_start|>user\n<|vision_start|>")
    post = tok.encode("<|vision_end|>What is in the picture?<|im_end|>\n<|im_start|>assistant\n")
    return tt.ModelInput(chunks=[tt.EncodedTextChunk(tokens=pre), tt.ImageChunk(data=png, format="png",
                                                                                   expected_tokens=n),
                                 tt.EncodedTextChunk(tokens=post)])


def _datum(tok, png: bytes, answer: str) -> tt.Datum:
    p = _prompt(tok, png)
    ans = tok.encode(answer + "<|im_end|>")
    chunks = list(p.chunks)
    chunks[-1] = tt.EncodedTextChunk(tokens=list(chunks[-1].tokens) + ans[:-1])
    n_prompt = p.length
    tg = [0] * (n_prompt - 1) + ans
    w = [0.0] * (n_prompt - 1) + [1.0] * len(ans)
    return tt.Datum(model_input=tt.ModelInput(chunks=chunks),
                    loss_fn_inputs={"target_tokens": tg, "weights": w})


def _accuracy(sampler, tok, rng: random.Random, n: int, full: bool, jitter: int) -> float:
    futs, truth = [], []
    for _ in range(n):
        c, s = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        futs.append(sampler.sample(_prompt(tok, draw(c, s, rng, jitter)), 1,
                                   tt.SamplingParams(max_tokens=8, temperature=0.0)))
        truth.append((c, s))
    ok = 0
    for f, (c, s) in zip(futs, truth, strict=True):
        text = tok.decode(f.result().sequences[0].tokens).replace("<|im_end|>", "").strip()
        ok += text == (f"{c} {s}" if full else c)
    return ok / n


def test_learns_colours_and_shapes_from_images(srv, tok) -> None:
    """Two adapters train side by side (their rows share the server's batches): ``colour`` answers the colour
    of shapes drawn with a little jitter (checked on fresh images at step 20), ``shape`` answers colour and
    shape with a fixed layout (checked at step 80). Rank 32, lr 2e-3, batch 16, as the issue measured."""
    sc = tinker.ServiceClient(base_url=srv, api_key=_KEY)
    colour = sc.create_lora_training_client(base_model=VL, rank=32).result()
    shape = sc.create_lora_training_client(base_model=VL, rank=32).result()
    rng = random.Random(0)
    losses: dict[str, list[float]] = {"colour": [], "shape": []}
    colour_acc = None
    for step in range(1, 81):
        jobs = [("shape", shape, True, 0)] + ([("colour", colour, False, 1)] if step <= 20 else [])
        futs = []
        for name, tc, full, jitter in jobs:
            rows = []
            for _ in range(16):
                c, s = rng.choice(list(COLOURS)), rng.choice(SHAPES)
                rows.append(_datum(tok, draw(c, s, rng, jitter), f"{c} {s}" if full else c))
            futs.append((name, tc, rows, tc.forward_backward(rows, "cross_entropy"),
                         tc.optim_step(tt.AdamParams(learning_rate=2e-3))))
        for name, _tc, rows, fb, opt in futs:
            out = fb.result()
            opt.result()
            tokens = sum(sum(d.loss_fn_inputs["weights"].tolist()) for d in rows)
            losses[name].append(out.metrics["loss:sum"] / tokens)
        if step == 20:
            colour_acc = _accuracy(colour.save_weights_and_get_sampling_client("c20"), tok, random.Random(1), 40,
                                   False, 1)
    full_acc = _accuracy(shape.save_weights_and_get_sampling_client("s80"), tok, random.Random(2), 36, True, 0)
    figures = {"colour_loss_step1": losses["colour"][0], "colour_loss_step20": losses["colour"][19],
               "colour_acc_step20": colour_acc, "shape_loss_step80": losses["shape"][-1],
               "colour_shape_acc_step80": full_acc}
    print("VISION", figures)
    assert losses["colour"][19] < 1.2, figures
    assert colour_acc is not None and colour_acc >= 0.9, figures
    assert full_acc >= 0.9, figures


def test_image_errors_answer_400_and_the_server_keeps_serving(srv, tok) -> None:
    sc = tinker.ServiceClient(base_url=srv, api_key=_KEY)
    tc = sc.create_lora_training_client(base_model=VL, rank=4).result()
    rng = random.Random(3)
    good = draw("red", "circle", rng, 1)
    webp = io.BytesIO()
    Image.open(io.BytesIO(good)).save(webp, format="WEBP")
    big = io.BytesIO()
    Image.new("RGB", (4200, 4100)).save(big, format="PNG")
    cases = {
        "Expected 15 tokens, got 16 from image": _prompt(tok, good, 15),
        "cannot be decoded": _prompt(tok, good[:50]),
        "webp": _prompt(tok, webp.getvalue()),
        "4200x4100": _prompt(tok, big.getvalue()),
    }
    for needle, mi in cases.items():
        n = mi.length
        d = tt.Datum(model_input=mi, loss_fn_inputs={"target_tokens": [0] * n, "weights": [0.0] * n})
        with pytest.raises(tinker.BadRequestError) as e:
            tc.forward_backward([d], "cross_entropy").result()
        assert needle in str(e.value) and "chunks[1]" in str(e.value), str(e.value)
    text = sc.create_lora_training_client(base_model=TEXT, rank=4).result()
    mi = _prompt(tok, good)
    d = tt.Datum(model_input=mi, loss_fn_inputs={"target_tokens": [0] * mi.length, "weights": [0.0] * mi.length})
    with pytest.raises(tinker.BadRequestError) as e:
        text.forward_backward([d], "cross_entropy").result()
    assert "text-only" in str(e.value) and TEXT in str(e.value)
    # still serving: a good image row trains and samples
    ok = _datum(tok, good, "red circle")
    assert tc.forward_backward([ok], "cross_entropy").result().metrics["loss:sum"] > 0
    s = tc.save_weights_and_get_sampling_client("e").sample(_prompt(tok, good), 1,
                                                           tt.SamplingParams(max_tokens=2)).result()
    assert len(s.sequences[0].tokens) >= 1


class _Srv:
    def __init__(self, url: str) -> None:
        self.url, self.api_key, self.base_model = url, _KEY, VL


@pytest.mark.parametrize("kind", ["tinker", "twinkle"])
def test_multi_modal_recipe_runs(srv, kind, monkeypatch) -> None:
    """cookbook/client/<kind>/self_host/multi_modal.py with short settings prints its RESULT."""
    import dataclasses

    from _cookbook import load_script

    monkeypatch.setenv("TINKER_TELEMETRY", "0")
    module = load_script(kind, "multi_modal")
    s = _Srv(srv)
    cfg = dataclasses.replace(module.Config(), base_url=s.url, api_key=s.api_key, base_model=s.base_model,
                              steps=8, batch_size=8, eval_images=4)
    r = module.main(cfg)
    assert len(r["losses"]) == 8 and r["last_loss"] < r["first_loss"], r["losses"]
    assert 0.0 <= r["accuracy_before"] <= 1.0 and 0.0 <= r["accuracy_after"] <= 1.0
