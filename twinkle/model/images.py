"""Server side of image input: decode and check ``ImageChunk``s, count and expand them into placeholder tokens.

The same rules serve the native and the Tinker API (the gateway calls ``check_data`` / ``resolve_prompt``
before anything is queued, and the backend calls ``resolve_model_input`` again to get the pixels):

* the format is ``png`` or ``jpeg`` (declared and sniffed from the bytes); anything else is a 400;
* the encoded size and the decoded ``width x height`` are checked against the model's limits *before* the
  pixels are decoded (the header is read first), so a small file cannot expand into a huge allocation;
* the token count comes from ``twinkle.data.images.image_tokens`` (the processor's rule); a chunk whose
  ``expected_tokens`` disagrees gets "Expected N tokens, got M from image"; a missing one is filled in;
* the image becomes ``n`` copies of the model's image token; text chunks may not contain that token
  themselves (it would desynchronise the placeholders from the images);
* a model without a vision tower answers a 400 naming the model.

Torch-free (Pillow and numpy only), so the gateway can run it.
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass
from typing import Any

from twinkle.data.images import FORMATS, image_grid, sniff_format
from twinkle.types import (
    Datum,
    EncodedTextChunk,
    ImageChunk,
    InvalidInputError,
    ModelInfo,
    ModelInput,
    VisionInfo,
)


@dataclass
class ResolvedImage:
    image: Any  # PIL.Image.Image, RGB
    grid: tuple[int, int, int]
    tokens: int


def decode_image(chunk: ImageChunk, vision: VisionInfo, field: str) -> tuple[Any, tuple[int, int, int], int]:
    """``(RGB PIL image, grid (t, h, w), token count)``; every problem is a 4xx naming ``field``."""
    from PIL import Image, UnidentifiedImageError

    fmt = (chunk.format or "").lower()
    if fmt == "jpg":
        fmt = "jpeg"
    if fmt not in FORMATS:
        raise InvalidInputError(f"image format {chunk.format!r} is not supported; use one of {list(FORMATS)}",
                                field=f"{field}.format")
    raw = chunk.data
    if not isinstance(raw, str):
        raise InvalidInputError("image data must be base64 text", field=f"{field}.data")
    if len(raw) // 4 * 3 > vision.max_image_bytes:
        raise InvalidInputError(f"image data is about {len(raw) // 4 * 3} bytes; the limit is "
                                 f"{vision.max_image_bytes}", field=f"{field}.data")
    try:
        data = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInputError("image data is not valid base64", field=f"{field}.data") from None
    kind = sniff_format(data)
    if kind != fmt:
        what = f"{kind} data" if kind else "not a png or jpeg image"
        raise InvalidInputError(f"image declared as {fmt} but the bytes are {what}", field=f"{field}.data")
    try:
        im = Image.open(io.BytesIO(data))  # reads the header only
        w, h = im.size
        if w * h > vision.max_image_pixels:
            raise InvalidInputError(f"image is {w}x{h} pixels; the limit is {vision.max_image_pixels} pixels",
                                     field=f"{field}.data")
        im.load()
        rgb = im.convert("RGB")
    except InvalidInputError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise InvalidInputError(f"image data cannot be decoded as {fmt}: {e}", field=f"{field}.data") from None
    grid = image_grid(w, h, vision)
    return rgb, grid, grid[0] * grid[1] * grid[2] // (vision.merge_size ** 2)


def resolve_model_input(mi: ModelInput, info: ModelInfo, field: str) -> tuple[list[int], list[ResolvedImage]]:
    """Expanded token ids (images as placeholder runs) and the images in order. Fills missing
    ``expected_tokens`` in place."""
    vision = info.vision
    tokens: list[int] = []
    images: list[ResolvedImage] = []
    for j, c in enumerate(mi.chunks):
        where = f"{field}.chunks[{j}]"
        if isinstance(c, EncodedTextChunk):
            if vision is not None and vision.image_token_id in c.tokens:
                raise InvalidInputError(
                    f"token id {vision.image_token_id} is the image placeholder; send the image as an image chunk",
                    field=f"{where}.tokens")
            tokens.extend(c.tokens)
        elif isinstance(c, ImageChunk):
            if vision is None:
                raise InvalidInputError(f"model {info.model_name!r} is text-only; it does not accept images",
                                        field=f"{where}.type")
            img, grid, n = decode_image(c, vision, where)
            if c.expected_tokens is not None and c.expected_tokens != n:
                raise InvalidInputError(f"Expected {c.expected_tokens} tokens, got {n} from image",
                                        field=f"{where}.expected_tokens")
            c.expected_tokens = n
            tokens.extend([vision.image_token_id] * n)
            images.append(ResolvedImage(img, grid, n))
        else:
            raise InvalidInputError(f"unsupported chunk type {getattr(c, 'type', None)!r}", field=f"{where}.type")
    return tokens, images


def has_images(mi: Any) -> bool:
    return isinstance(mi, ModelInput) and any(isinstance(c, ImageChunk) for c in mi.chunks)


def check_data(data: list[Datum], info: ModelInfo) -> None:
    """Gateway check of a training/forward request: images decode and count, and ``loss_fn_inputs`` match
    the expanded length. Datums without images are left to the usual checks."""
    for i, d in enumerate(data):
        if not isinstance(d, Datum) or not has_images(d.model_input):
            continue
        where = f"data[{i}]"
        tokens, _ = resolve_model_input(d.model_input, info, f"{where}.model_input")
        n = len(tokens)
        for key, td in d.loss_fn_inputs.items():
            shape = td.shape if td.shape is not None else [len(td.data)]
            if not shape or shape[0] != n:
                raise InvalidInputError(
                    f"{where}.loss_fn_inputs[{key!r}] has {shape[0] if shape else 0} entries but model_input has {n} "
                    "tokens (images expanded)", field=f"{where}.loss_fn_inputs.{key}")


def resolve_prompt(prompt: ModelInput, info: ModelInfo, field: str = "prompt") -> tuple[list[int], list[ImageChunk]]:
    """A sampling prompt with images: expanded tokens and the image chunks in order (expected_tokens set)."""
    tokens, _ = resolve_model_input(prompt, info, field)
    return tokens, [c for c in prompt.chunks if isinstance(c, ImageChunk)]


def _need_info(info: ModelInfo | None, model: str, field: str) -> ModelInfo:
    if info is None:
        raise InvalidInputError(f"model {model!r} has not published its model info yet; retry images later",
                                field=field)
    return info


def check_image_data(data: Any, info: ModelInfo | None, model: str) -> None:
    """Gateway hook for forward/forward_backward: a no-op for text-only requests."""
    if isinstance(data, list) and any(isinstance(d, Datum) and has_images(d.model_input) for d in data):
        check_data(data, _need_info(info, model, "data"))


def expand_prompt(prompt: Any, info: ModelInfo | None, model: str) -> tuple[list[int], list[ImageChunk]]:
    """Gateway hook for sampling: a ``ModelInput`` prompt with images becomes (expanded tokens, images)."""
    if isinstance(prompt, ModelInput):
        if not has_images(prompt):
            return prompt.to_ints(), []
        return resolve_prompt(prompt, _need_info(info, model, "prompt"))
    return prompt, []


def prompt_arg(prompt: ModelInput) -> Any:
    """What a route puts in ``SampleOp.prompt``: token ids, or the ModelInput itself when it holds images."""
    return prompt if has_images(prompt) else prompt.to_ints()


def prompt_from_json(raw: Any) -> ModelInput:
    """A Tinker JSON prompt ``{chunks: [...]}`` holding image chunks, validated into a ``ModelInput``."""
    from pydantic import ValidationError

    try:
        return ModelInput.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first.get("loc", ()))
        raise InvalidInputError(f"prompt.{loc}: {first.get('msg')}", field=f"prompt.{loc}") from None


__all__ = ["ResolvedImage", "check_data", "check_image_data", "expand_prompt", "prompt_arg", "prompt_from_json", "decode_image", "has_images", "resolve_model_input", "resolve_prompt"]
