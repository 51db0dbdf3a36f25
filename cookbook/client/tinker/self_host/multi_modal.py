"""Image LoRA with the unmodified Tinker SDK against a self-hosted Twinkle server: "what is in this picture?"

    twinkle-server launch -c cookbook/client/server/transformer_vl/server_config.yaml   # builtin://tiny-vl
    TWINKLE_API_KEY=tml-... python cookbook/client/tinker/self_host/multi_modal.py --steps=60

Pictures of coloured shapes are drawn with PIL; the prompt is the same for every row, so only the image
carries the answer. Images go over the wire as standard ``ImageChunk``s with the vision markers sent as
text around them (as tinker-cookbook's Qwen3-VL renderer does); ``expected_tokens`` is counted here with
the model's published patch/merge sizes. Prints greedy accuracy on fresh pictures before and after, the
loss per step and a final ``RESULT {json}`` line. builtin://tiny-vl is a toy that knows nothing until trained.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import random
import sys
from dataclasses import dataclass

import httpx
import tinker
from PIL import Image, ImageDraw
from tinker import types

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 60, 220), "yellow": (230, 210, 20)}
SHAPES = ("circle", "square", "triangle")


@dataclass
class Config:
    base_url: str = os.environ.get("TWINKLE_SERVER_URL", "http://127.0.0.1:8000")
    api_key: str = os.environ.get("TWINKLE_API_KEY", "")
    base_model: str = os.environ.get("TWINKLE_BASE_MODEL", "builtin://tiny-vl")
    lora_rank: int = 32
    learning_rate: float = 2e-3
    batch_size: int = 16
    steps: int = int(os.environ.get("TWINKLE_STEPS", "60"))
    answer: str = "colour"  # "colour" or "colour shape"
    image_size: int = 64
    eval_images: int = 24
    seed: int = 0


def parse_args(cfg: Config) -> Config:
    """``--name=value`` flags override the defaults above."""
    for arg in sys.argv[1:]:
        name, _, value = arg.lstrip("-").partition("=")
        field = name.replace("-", "_")
        cfg = dataclasses.replace(cfg, **{field: type(getattr(cfg, field))(value)})
    return cfg


def draw(colour: str, shape: str, size: int, rng: random.Random) -> bytes:
    im = Image.new("RGB", (size, size), (255, 255, 255))
    d = ImageDraw.Draw(im)
    j = rng.randint(-1, 1)
    a, b = size * 7 // 32 + j, size * 25 // 32 + j
    fill = COLOURS[colour]
    if shape == "circle":
        d.ellipse([a, a, b, b], fill=fill)
    elif shape == "square":
        d.rectangle([a, a, b, b], fill=fill)
    else:
        d.polygon([(size // 2 + j, a), (a, b), (b, b)], fill=fill)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def image_tokens(width: int, height: int, vision: dict) -> int:
    """Qwen-VL's count (smart_resize), from the numbers the server publishes for the model."""
    factor = vision["patch_size"] * vision["merge_size"]
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > vision["max_pixels"]:
        beta = math.sqrt(height * width / vision["max_pixels"])
        h, w = max(factor, math.floor(height / beta / factor) * factor), max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < vision["min_pixels"]:
        beta = math.sqrt(vision["min_pixels"] / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return (h // vision["patch_size"]) * (w // vision["patch_size"]) // vision["merge_size"] ** 2


def vision_params(cfg: Config) -> dict:
    """The model's image-token rule, from Twinkle's public model list (GET /api/v1/twinkle/capabilities)."""
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    caps = httpx.get(f"{cfg.base_url}/api/v1/twinkle/capabilities", headers=headers, timeout=30).json()
    for m in caps["base_models"]:
        if m["name"] == cfg.base_model and m.get("vision"):
            return m["vision"]
    raise SystemExit(f"{cfg.base_model} does not accept images on this server")


def prompt(tokenizer, png: bytes, n_tokens: int) -> types.ModelInput:
    pre = tokenizer.encode("<|im_start|>user\n<|vision_start|>", add_special_tokens=False)
    post = tokenizer.encode("<|vision_end|>What is in the picture?<|im_end|>\n<|im_start|>assistant\n",
                            add_special_tokens=False)
    return types.ModelInput(chunks=[types.EncodedTextChunk(tokens=pre),
                                    types.ImageChunk(data=png, format="png", expected_tokens=n_tokens),
                                    types.EncodedTextChunk(tokens=post)])


def datum(tokenizer, png: bytes, n_tokens: int, answer: str) -> types.Datum:
    p = prompt(tokenizer, png, n_tokens)
    ans = tokenizer.encode(answer + "<|im_end|>", add_special_tokens=False)
    chunks = list(p.chunks)
    chunks[-1] = types.EncodedTextChunk(tokens=list(chunks[-1].tokens) + ans[:-1])
    n = p.length
    return types.Datum(model_input=types.ModelInput(chunks=chunks),
                       loss_fn_inputs={"target_tokens": [0] * (n - 1) + ans, "weights": [0.0] * (n - 1) + [1.0] * len(ans)})


def label(cfg: Config, colour: str, shape: str) -> str:
    return colour if cfg.answer == "colour" else f"{colour} {shape}"


def accuracy(cfg: Config, sampler, tokenizer, n_tokens: int, rng: random.Random) -> float:
    futs = []
    for _ in range(cfg.eval_images):
        c, s = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        png = draw(c, s, cfg.image_size, rng)
        futs.append((label(cfg, c, s), sampler.sample(prompt(tokenizer, png, n_tokens), 1,
                                                       types.SamplingParams(max_tokens=8, temperature=0.0))))
    ok = 0
    for want, f in futs:
        got = tokenizer.decode(f.result().sequences[0].tokens, skip_special_tokens=True).strip()
        ok += got == want
    return ok / len(futs)


def main(cfg: Config) -> dict:
    vision = vision_params(cfg)
    n_tokens = image_tokens(cfg.image_size, cfg.image_size, vision)
    service = tinker.ServiceClient(base_url=cfg.base_url, api_key=cfg.api_key or None)
    training = service.create_lora_training_client(base_model=cfg.base_model, rank=cfg.lora_rank).result()
    tokenizer = training.get_tokenizer()
    rng = random.Random(cfg.seed)

    before = accuracy(cfg, training.save_weights_and_get_sampling_client("before").result(), tokenizer, n_tokens,
                      random.Random(cfg.seed + 1))
    print(f"accuracy before: {before:.2f}  ({n_tokens} tokens per image)")
    losses = []
    for step in range(cfg.steps):
        batch = []
        for _ in range(cfg.batch_size):
            c, s = rng.choice(list(COLOURS)), rng.choice(SHAPES)
            batch.append(datum(tokenizer, draw(c, s, cfg.image_size, rng), n_tokens, label(cfg, c, s)))
        fwd_bwd = training.forward_backward(batch, "cross_entropy")
        optim = training.optim_step(types.AdamParams(learning_rate=cfg.learning_rate))
        out = fwd_bwd.result()
        optim.result()
        n = sum(sum(d.loss_fn_inputs["weights"].tolist()) for d in batch)
        losses.append(out.metrics["loss:sum"] / max(n, 1.0))
        print(f"step {step:3d}  loss/token {losses[-1]:.4f}", flush=True)

    sampler = training.save_weights_and_get_sampling_client("multi-modal").result()
    after = accuracy(cfg, sampler, tokenizer, n_tokens, random.Random(cfg.seed + 1))
    print(f"accuracy after: {after:.2f}")
    service.close("success").result()
    result = {"first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
              "losses": losses, "accuracy_before": before, "accuracy_after": after, "image_tokens": n_tokens}
    print("RESULT " + json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main(parse_args(Config()))
