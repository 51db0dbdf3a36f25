"""Image LoRA through the native client: teach a vision-language model to say what is in a picture.

    twinkle-server launch -c cookbook/client/server/transformer_vl/server_config.yaml   # builtin://tiny-vl
    TWINKLE_API_KEY=... python cookbook/client/twinkle/self_host/multi_modal.py --steps=60

Pictures of coloured shapes are drawn with PIL; every row asks the same question, so only the image carries
the answer. ``twinkle_client.images`` renders chat messages with ``{"type": "image"}`` parts into a
``ModelInput`` (image tokens counted from the vision parameters the server publishes; no transformers on
the client) and builds the shifted datum. Prints greedy accuracy on fresh pictures before and after, a live
loss curve (plain text outside a notebook) and a final ``RESULT {json}`` line. The builtin model is a toy.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import sys
from dataclasses import dataclass

from PIL import Image, ImageDraw

import twinkle_client
from twinkle.types import LoraConfig, SamplingParams
from twinkle_client.images import image_datum, render_chat, vision_info
from twinkle_client.model import TransformersModel
from twinkle_client.sampler import Sampler
from twinkle_client.widgets import LiveCurve

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 30), "blue": (30, 60, 220), "yellow": (230, 210, 20)}
SHAPES = ("circle", "square", "triangle")


@dataclass
class Config:
    base_url: str = os.environ.get("TWINKLE_SERVER_URL", "http://127.0.0.1:8000")
    api_key: str = os.environ.get("TWINKLE_API_KEY", "")
    base_model: str = os.environ.get("TWINKLE_BASE_MODEL") or os.environ.get("TWINKLE_MODEL") or "builtin://tiny-vl"
    lora_rank: int = 32
    lr: float = 2e-3
    batch_size: int = 16
    steps: int = int(os.environ.get("TWINKLE_STEPS", "60"))
    answer: str = "colour"  # "colour" or "colour shape"
    image_size: int = 64
    eval_images: int = 24
    seed: int = 0


def parse_args(cfg: Config, argv: list[str]) -> Config:
    """``--name=value`` flags override the defaults above."""
    for arg in argv:
        key, _, value = arg.lstrip("-").partition("=")
        field = key.replace("-", "_")
        cfg = dataclasses.replace(cfg, **{field: type(getattr(cfg, field))(value)})
    return cfg


def draw(colour: str, shape: str, size: int, rng: random.Random) -> Image.Image:
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
    return im


def question(image: Image.Image) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": image},
                                         {"type": "text", "text": "What is in the picture?"}]}]


def label(cfg: Config, colour: str, shape: str) -> str:
    return colour if cfg.answer == "colour" else f"{colour} {shape}"


def accuracy(cfg: Config, sampler: Sampler, rng: random.Random) -> float:
    ok = 0
    for _ in range(cfg.eval_images):
        c, s = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        ok += sampler.generate(question(draw(c, s, cfg.image_size, rng)), max_tokens=8).strip() == label(cfg, c, s)
    return ok / cfg.eval_images


def main(cfg: Config) -> dict:
    with twinkle_client.init_twinkle_client(cfg.base_url, cfg.api_key or None) as session:
        vision = vision_info(session, cfg.base_model)
        model = TransformersModel(cfg.base_model, seed=cfg.seed)
        model.add_adapter_to_model("multi-modal", LoraConfig(rank=cfg.lora_rank, seed=cfg.seed))
        model.set_optimizer("AdamW", lr=cfg.lr)
        tokenizer = model.get_tokenizer()
        sampler = Sampler(model)
        before = accuracy(cfg, sampler, random.Random(cfg.seed + 1))
        print(f"accuracy before: {before:.2f}")

        rng = random.Random(cfg.seed)
        curve = LiveCurve(metrics=("loss",), title="what is in the picture?", total=cfg.steps)
        losses = []
        for _ in curve.range(cfg.steps):
            batch = []
            for _ in range(cfg.batch_size):
                c, s = rng.choice(list(COLOURS)), rng.choice(SHAPES)
                prompt = render_chat(question(draw(c, s, cfg.image_size, rng)), tokenizer, vision)
                answer = tokenizer.encode(label(cfg, c, s) + "<|im_end|>", add_special_tokens=False)
                batch.append(image_datum(prompt, answer))
            model.forward_backward(inputs=batch)
            model.clip_grad_and_step()
            metrics = model.calculate_metric()
            losses.append(float(metrics["loss"]))
            curve.log(metrics, run="multi-modal")
        curve.close()

        after = accuracy(cfg, sampler, random.Random(cfg.seed + 1))
        probe = draw("red", "circle", cfg.image_size, random.Random(7))
        reply = sampler.sample(render_chat(question(probe), tokenizer, vision),
                               SamplingParams(max_tokens=8, temperature=0.0)).sequences[0].tokens
        print(f"accuracy after: {after:.2f}; a red circle -> {tokenizer.decode(reply, skip_special_tokens=True)!r}")
    result = {"first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
              "losses": losses, "accuracy_before": before, "accuracy_after": after,
              "image_tokens": vision.model_dump()}
    print("RESULT " + json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main(parse_args(Config(), sys.argv[1:]))
