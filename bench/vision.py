"""Image rows vs text-only rows: LoRA training tokens/s on builtin://tiny-vl at the same token count.

    PYTHONPATH=. python bench/vision.py [--rows=16] [--steps=10]

Both batches have the same number of rows and the same tokens per row: an image row is a chat prompt with a
64x64 picture (16 placeholder tokens) plus a short answer; the text row replaces the image by 16 text tokens.
The image row additionally runs the vision tower and the image processor. Timed alternately in one process
(forward_backward + optim_step through the transformers backend), so the printed ratio is side by side.
"""

from __future__ import annotations

import sys
import time

import numpy as np
from PIL import Image, ImageDraw

from twinkle.data.images import image_chunk
from twinkle.model.base import BatchItem
from twinkle.model.transformers import TransformersBackend
from twinkle.types import AdamParams, Datum, EncodedTextChunk, LoraConfig, ModelInput


def args() -> dict[str, int]:
    out = {"rows": 16, "steps": 10}
    for a in sys.argv[1:]:
        k, _, v = a.lstrip("-").partition("=")
        out[k] = int(v)
    return out


def main() -> None:
    cfg = args()
    be = TransformersBackend("builtin://tiny-vl")
    tok, v = be.tokenizer(), be.model_info().vision
    be.add_adapter("img", LoraConfig(rank=32, seed=0))
    be.add_adapter("txt", LoraConfig(rank=32, seed=0))
    pre = tok.encode("<|im_start|>user\n<|vision_start|>")
    post = tok.encode("<|vision_end|>What is in the picture?<|im_end|>\n<|im_start|>assistant\nred circle<|im_end|>")
    rng = np.random.default_rng(0)

    def image_row() -> Datum:
        im = Image.new("RGB", (64, 64), "white")
        ImageDraw.Draw(im).ellipse([10, 10, 54, 54], fill=tuple(int(x) for x in rng.integers(0, 255, 3)))
        ch = image_chunk(im, v)
        n = len(pre) + ch.expected_tokens + len(post) - 1
        mi = ModelInput(chunks=[EncodedTextChunk(tokens=pre), ch, EncodedTextChunk(tokens=post[:-1])])
        return Datum(model_input=mi, loss_fn_inputs={"target_tokens": np.array([0] * (n - 5) + post[-5:]),
                                                     "weights": np.array([0.0] * (n - 5) + [1.0] * 5, np.float32)})

    def text_row() -> Datum:
        filler = [int(t) for t in rng.integers(10, 1000, 16)]
        ids = pre + filler + post
        return Datum(model_input=ModelInput.from_ints(ids[:-1]),
                     loss_fn_inputs={"target_tokens": np.array([0] * (len(ids) - 6) + ids[-5:]),
                                     "weights": np.array([0.0] * (len(ids) - 6) + [1.0] * 5, np.float32)})

    timings: dict[str, list[float]] = {"img": [], "txt": []}
    tokens: dict[str, int] = {}
    for step in range(cfg["steps"] + 1):  # step 0 warms up
        for name, make in (("img", image_row), ("txt", text_row)):
            rows = [make() for _ in range(cfg["rows"])]
            tokens[name] = sum(d.model_input.length for d in rows)
            t0 = time.perf_counter()
            be.run_batch([BatchItem(name, rows)])
            be.optim_step(name, AdamParams(learning_rate=1e-3))
            if step:
                timings[name].append(time.perf_counter() - t0)
    rate = {k: tokens[k] / float(np.median(t)) for k, t in timings.items()}
    print(f"tokens per batch: image rows {tokens['img']}, text rows {tokens['txt']} ({cfg['rows']} rows)")
    print(f"image rows: {rate['img']:.0f} tokens/s   text rows: {rate['txt']:.0f} tokens/s   "
          f"ratio image/text: {rate['img'] / rate['txt']:.2f}")


if __name__ == "__main__":
    main()
