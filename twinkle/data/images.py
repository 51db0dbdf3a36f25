"""Images as model input, without torch or transformers: token counts, encoding, ``ImageChunk`` building.

The token count follows the Qwen-VL image processor (``smart_resize``): both sides are rounded to multiples
of ``patch_size * merge_size``, the area is kept within ``[min_pixels, max_pixels]`` (aspect ratio kept),
and each ``merge_size x merge_size`` block of patches becomes one token. The numbers come from the model's
``VisionInfo`` (the server publishes it in its model info), so a client counts exactly what the server's
processor will produce. Pillow is needed only to encode a PIL image or read a file's size.
"""

from __future__ import annotations

import base64
import io
import math
import os
import struct
from typing import Any

from twinkle.types import ImageChunk, InvalidInputError, VisionInfo

FORMATS = ("png", "jpeg")


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The size the processor resizes a ``height x width`` image to (Qwen-VL's rule)."""
    if min(height, width) < 1:
        raise InvalidInputError(f"image of {width}x{height} pixels is empty", field="image")
    if max(height, width) / min(height, width) > 200:
        raise InvalidInputError(f"image aspect ratio of {width}x{height} is above 200", field="image")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def image_grid(width: int, height: int, vision: VisionInfo) -> tuple[int, int, int]:
    """``(t, h, w)`` in patches, as the processor's ``image_grid_thw``."""
    h, w = smart_resize(height, width, vision.patch_size * vision.merge_size, vision.min_pixels, vision.max_pixels)
    return 1, h // vision.patch_size, w // vision.patch_size


def image_tokens(width: int, height: int, vision: VisionInfo) -> int:
    """How many tokens a ``width x height`` image becomes for this model."""
    t, gh, gw = image_grid(width, height, vision)
    return t * gh * gw // (vision.merge_size ** 2)


def sniff_format(data: bytes) -> str | None:
    """``png`` / ``jpeg`` from the magic bytes, ``webp``/``gif``/``bmp`` for those, else None."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if data[:2] == b"BM":
        return "bmp"
    return None


def png_size(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` from a PNG header, without Pillow."""
    if len(data) >= 24 and data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
        w, h = struct.unpack(">II", data[16:24])
        return int(w), int(h)
    return None


def encode_image(image: Any, fmt: str = "png") -> tuple[bytes, str, int, int]:
    """``(bytes, format, width, height)`` of a PIL image, raw PNG/JPEG bytes or a file path."""
    if isinstance(image, (str, os.PathLike)):
        with open(image, "rb") as f:
            image = f.read()
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        kind = sniff_format(data)
        if kind not in FORMATS:
            raise InvalidInputError(f"image bytes are {kind or 'not a known format'}; send png or jpeg", field="image")
        size = png_size(data)
        if size is None:
            from PIL import Image

            with Image.open(io.BytesIO(data)) as im:
                size = im.size
        return data, kind, size[0], size[1]
    if hasattr(image, "save") and hasattr(image, "size"):  # a PIL image
        if fmt not in FORMATS:
            raise InvalidInputError(f"format {fmt!r} is not one of {FORMATS}", field="format")
        im = image if image.mode in ("RGB", "L") else image.convert("RGB")
        buf = io.BytesIO()
        im.save(buf, format="PNG" if fmt == "png" else "JPEG")
        return buf.getvalue(), fmt, int(image.size[0]), int(image.size[1])
    raise InvalidInputError("image must be a PIL image, png/jpeg bytes or a file path", field="image")


def image_chunk(image: Any, vision: VisionInfo | dict[str, Any] | None = None, fmt: str = "png") -> ImageChunk:
    """An ``ImageChunk`` for ``image`` (PIL image | bytes | path); ``expected_tokens`` filled when ``vision``
    (the server's ``model_info().vision``) is given, else left for the server to fill in (native API)."""
    data, kind, w, h = encode_image(image, fmt)
    n = None
    if vision is not None:
        v = vision if isinstance(vision, VisionInfo) else VisionInfo.model_validate(vision)
        n = image_tokens(w, h, v)
    return ImageChunk(data=base64.b64encode(data).decode("ascii"), format=kind, expected_tokens=n)


__all__ = ["FORMATS", "encode_image", "image_chunk", "image_grid", "image_tokens", "png_size", "smart_resize",
           "sniff_format"]
