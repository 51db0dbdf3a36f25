"""builtin://tiny-vl and image rows in the transformers backend: token counts, wire errors, mixed batches, sampling."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from twinkle.data.images import image_chunk, image_tokens
from twinkle.model.base import BatchItem, SampleItem
from twinkle.model.images import check_data, expand_prompt, resolve_model_input
from twinkle.model.transformers import TransformersBackend
from twinkle.types import (
    AdamParams,
    Datum,
    EncodedTextChunk,
    ImageChunk,
    InvalidInputError,
    LoraConfig,
    ModelInfo,
    ModelInput,
    SamplingParams,
    VisionInfo,
    datum_from_tokens,
)


def shape(colour: str, kind: str = "circle", size: int = 64) -> Image.Image:
    im = Image.new("RGB", (size, size), (255, 255, 255))
    d = ImageDraw.Draw(im)
    box = [size // 6, size // 6, size - size // 6, size - size // 6]
    (d.ellipse if kind == "circle" else d.rectangle)(box, fill=colour)
    return im


@pytest.fixture(scope="module")
def be() -> TransformersBackend:
    return TransformersBackend("builtin://tiny-vl")


def _row(be: TransformersBackend, im: Image.Image, answer: str) -> tuple[Datum, list[int]]:
    tok = be.tokenizer()
    v = be.model_info().vision
    ch = image_chunk(im, v)
    pre = tok.encode("<|im_start|>user\n<|vision_start|>")
    post = tok.encode("<|vision_end|>What is in the picture?<|im_end|>\n<|im_start|>assistant\n")
    ans = tok.encode(answer + "<|im_end|>")
    n_prompt = len(pre) + ch.expected_tokens + len(post)
    mi = ModelInput(chunks=[EncodedTextChunk(tokens=pre), ch, EncodedTextChunk(tokens=post + ans[:-1])])
    tg = [0] * (n_prompt - 1) + ans
    w = [0.0] * (n_prompt - 1) + [1.0] * len(ans)
    d = Datum(model_input=mi, loss_fn_inputs={"target_tokens": np.array(tg), "weights": np.array(w, np.float32)})
    return d, pre + [v.image_token_id] * ch.expected_tokens + post


@pytest.mark.slow
def test_builtin_tiny_vl_loads_with_auto_classes_and_counts_like_the_processor(be: TransformersBackend) -> None:
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    from twinkle.model.hub import resolve_model

    path = resolve_model("builtin://tiny-vl")
    text = AutoTokenizer.from_pretrained(str(resolve_model("builtin://tiny")))
    tok = AutoTokenizer.from_pretrained(str(path))
    s = "What is 3 + 4? A red circle, a blue square."
    assert tok.encode(s) == text.encode(s)  # text ids identical to builtin://tiny
    v = be.model_info().vision
    assert v is not None and tok.convert_tokens_to_ids("<|image_pad|>") == v.image_token_id >= len(text)
    assert v == _info().vision and be.model_info().vocab_size == _info().vocab_size
    assert type(AutoModelForImageTextToText.from_pretrained(str(path))).__name__ == "Qwen3VLForConditionalGeneration"
    proc = AutoImageProcessor.from_pretrained(str(path))
    for w, h in [(64, 64), (17, 90), (300, 41), (1000, 700), (8, 8), (250, 251)]:
        g = proc(images=[Image.new("RGB", (w, h))], return_tensors="pt")["image_grid_thw"][0]
        assert image_tokens(w, h, v) == int(g.prod()) // 4, (w, h)
    assert image_tokens(64, 64, v) == 16
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    assert "<|vision_start|><|image_pad|><|vision_end|>hi" in tok.apply_chat_template(msgs, tokenize=False)


def _info(be: object = None) -> ModelInfo:
    """builtin://tiny-vl's model info, without loading the model (the backend test checks the same numbers)."""
    return ModelInfo(model_name="builtin://tiny-vl", backend="transformers", vocab_size=2112, max_length=2048,
                     vision=VisionInfo(patch_size=8, merge_size=2, min_pixels=256, max_pixels=65536,
                                       image_token_id=2048, vision_start_token_id=2046, vision_end_token_id=2047))


def _chunk(data: bytes, fmt: str = "png", n: int | None = None) -> ImageChunk:
    return ImageChunk(data=base64.b64encode(data).decode(), format=fmt, expected_tokens=n)


def _png(im: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("case", ["wrong_count", "corrupt", "webp", "declared_webp", "oversized", "text_only",
                                  "pad_in_text"])
def test_image_errors_name_the_field(case: str) -> None:
    info = _info()
    good = _png(shape("red"))
    chunks: list = [EncodedTextChunk(tokens=[5, 6])]
    if case == "wrong_count":
        chunks.append(_chunk(good, n=15))
    elif case == "corrupt":
        chunks.append(_chunk(good[:40]))
    elif case == "webp":
        chunks.append(_chunk(_png(shape("red"), "WEBP"), fmt="png"))
    elif case == "declared_webp":
        chunks.append(_chunk(_png(shape("red"), "WEBP"), fmt="webp"))
    elif case == "oversized":
        chunks.append(_chunk(_png(Image.new("RGB", (4100, 4100)))))
    elif case == "text_only":
        chunks.append(_chunk(good))
        info = info.model_copy(update={"vision": None})
    elif case == "pad_in_text":
        chunks.append(EncodedTextChunk(tokens=[info.vision.image_token_id]))
    mi = ModelInput(chunks=chunks)
    with pytest.raises(InvalidInputError) as e:
        resolve_model_input(mi, info, "data[0].model_input")
    msg, field = str(e.value), e.value.field
    assert field.startswith("data[0].model_input.chunks[1]")
    if case == "wrong_count":
        assert "Expected 15 tokens, got 16 from image" in msg and field.endswith("expected_tokens")
    if case == "text_only":
        assert "text-only" in msg and info.model_name in msg
    if case == "oversized":
        assert "4100x4100" in msg


def test_missing_expected_tokens_is_filled_and_targets_checked_against_expanded_length() -> None:
    info = _info()
    ch = _chunk(_png(shape("blue")))
    d = Datum(model_input=ModelInput(chunks=[EncodedTextChunk(tokens=[5]), ch]),
              loss_fn_inputs={"target_tokens": np.zeros(2, np.int64)})
    with pytest.raises(InvalidInputError) as e:
        check_data([d], info)
    assert e.value.field == "data[0].loss_fn_inputs.target_tokens" and "17 tokens" in str(e.value)
    assert ch.expected_tokens == 16
    toks, imgs = expand_prompt(ModelInput(chunks=[EncodedTextChunk(tokens=[5]), _chunk(_png(shape("red")))]),
                               info, "m")
    assert len(toks) == 17 and len(imgs) == 1


def _grads(be: TransformersBackend, name: str) -> list[torch.Tensor]:
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in be._get(name).parameters()]


@pytest.mark.slow
def test_mixed_batch_equals_separate_passes(be: TransformersBackend) -> None:
    for n in ("m1", "m2"):
        if n in be.list_adapters():
            be.remove_adapter(n)
    be.add_adapter("m1", LoraConfig(rank=4, seed=1))
    be.add_adapter("m2", LoraConfig(rank=4, seed=2, train_vision=True))
    assert any(".visual." in m for m in be._get("m2").modules)
    assert not any(".visual." in m for m in be._get("m1").modules)
    for n in ("m1", "m2"):  # non-zero B so every LoRA path contributes
        for p in be._get(n).parameters():
            with torch.no_grad():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    d1, _ = _row(be, shape("red"), "red circle")
    d2, _ = _row(be, shape("blue", "square", 48), "blue square")
    t1 = datum_from_tokens(be.tokenizer().encode("a plain text row, longer than the others by some way"))
    batch = [BatchItem("m1", [d1, t1]), BatchItem("m2", [d2, d1])]
    together = be.run_batch(batch)
    g_together = {n: _grads(be, n) for n in ("m1", "m2")}
    for n in ("m1", "m2"):
        for p in be._get(n).parameters():
            p.grad = None
    apart = [be.run_batch([b])[0] for b in batch]
    for a, b in zip(together, apart, strict=True):
        for x, y in zip(a.loss_fn_outputs, b.loss_fn_outputs, strict=True):
            np.testing.assert_allclose(x["logprobs"].to_numpy(), y["logprobs"].to_numpy(), rtol=1e-4, atol=1e-4)
    for n in ("m1", "m2"):
        for x, y in zip(g_together[n], _grads(be, n), strict=True):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)
    vis = [p for m, p in zip(be._get("m2").modules, be._get("m2").parameters()[1::2], strict=False)
           if ".visual." in m]
    assert vis and any(float(p.grad.abs().sum()) > 0 for p in vis if p.grad is not None)
    for n in ("m1", "m2"):
        be.optim_step(n, AdamParams(learning_rate=1e-3))


@pytest.mark.slow
def test_image_sampling_equals_hf_generate_with_the_peft_checkpoint(be: TransformersBackend, tmp_path) -> None:
    from peft import PeftModel
    from transformers import AutoImageProcessor, AutoModelForImageTextToText

    if "s" in be.list_adapters():
        be.remove_adapter("s")
    be.add_adapter("s", LoraConfig(rank=8, seed=3))
    d, prompt = _row(be, shape("green"), "green circle")
    for _ in range(3):
        be.run_batch([BatchItem("s", [d])])
        be.optim_step("s", AdamParams(learning_rate=2e-2))
    ch = d.model_input.chunks[1]
    item = SampleItem("s", prompt, 1, SamplingParams(max_tokens=8, temperature=0.0, stop=[]), prompt_logprobs=True,
                      images=[ch])
    text_item = SampleItem("s", be.tokenizer().encode("hello"), 1, SamplingParams(max_tokens=3, temperature=0.0, stop=[]))
    out, text_out = be.sample([item, text_item])
    ours = out.sequences[0].tokens
    assert len(ours) == 8 and len(text_out.sequences[0].tokens) == 3
    img_id = be.model_info().vision.image_token_id
    plp = out.prompt_logprobs
    assert plp[0] is None and all(v is None for t, v in zip(prompt, plp, strict=True) if t == img_id)
    assert all(v is not None for j, (t, v) in enumerate(zip(prompt, plp, strict=True)) if j and t != img_id)

    be.save("s", tmp_path / "ck", optimizer=False)
    base = AutoModelForImageTextToText.from_pretrained(str(be.path))
    hf = PeftModel.from_pretrained(base, str(tmp_path / "ck")).eval()
    proc = AutoImageProcessor.from_pretrained(str(be.path))
    px = proc(images=[shape("green")], return_tensors="pt")
    ids = torch.tensor([prompt])
    with torch.no_grad():
        gen = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=px["pixel_values"],
                          image_grid_thw=px["image_grid_thw"], mm_token_type_ids=(ids == img_id).int(),
                          max_new_tokens=8, do_sample=False, eos_token_id=None, min_new_tokens=8)
    assert gen[0, len(prompt):].tolist() == ours


@pytest.mark.slow
def test_builtin_small_vl_counts_like_the_processor_and_learns_an_image_row() -> None:
    """builtin://small-vl (the demo-sized VL model): the standard processor agrees on image token counts, and a
    few LoRA steps on one image row lower its loss."""
    from transformers import AutoImageProcessor

    from twinkle.model.hub import resolve_model

    big = TransformersBackend("builtin://small-vl")
    v = big.model_info().vision
    assert v is not None and v.patch_size == 16 and image_tokens(128, 128, v) == 16
    proc = AutoImageProcessor.from_pretrained(str(resolve_model("builtin://small-vl")))
    for w, h in [(128, 128), (300, 41), (1000, 700), (8, 8)]:
        g = proc(images=[Image.new("RGB", (w, h))], return_tensors="pt")["image_grid_thw"][0]
        assert image_tokens(w, h, v) == int(g.prod()) // 4, (w, h)
    big.add_adapter("s", LoraConfig(rank=8, seed=0))
    d, _ = _row(big, shape("green", size=128), "green circle")
    losses = []
    for _ in range(4):
        losses.append(big.run_batch([BatchItem("s", [d])])[0].metrics["loss:sum"])
        big.optim_step("s", AdamParams(learning_rate=5e-3))
    assert losses[-1] < losses[0], losses
    big.close()
