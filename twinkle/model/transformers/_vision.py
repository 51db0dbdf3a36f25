"""Vision-language models in the transformers backend (Qwen-VL family: Qwen2-VL, Qwen2.5-VL, Qwen3-VL).

Images arrive as placeholder runs in the token rows (``twinkle.model.images``). For one forward pass this
module turns the rows' images into ``pixel_values`` / ``image_grid_thw`` with the model's own image
processor (the PIL one: no torchvision), computes the 3-D rope positions explicitly for the whole padded
batch (``get_rope_index``; text-only rows get plain positions), and gives the per-row rope deltas that decode
steps add to the text position. It also maps the batch's row segments to *patch* segments, so LoRA on the
vision tower (``train_vision``) routes each image's patches to its row's adapter.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from twinkle.model.images import ResolvedImage
from twinkle.types import InternalError, VisionInfo

from ._lora import Segment

VISION_PREFIXES = ("model.visual.", "visual.", "model.vision_tower.", "vision_tower.")


def is_vision_module(name: str) -> bool:
    return name.startswith(VISION_PREFIXES)


def merger_unit(name: str, merge_size: int) -> int:
    """Rows of a vision linear's input per patch segment unit: mergers see ``merge_size**2`` patches per row."""
    return merge_size ** 2 if "merger" in name else 1


@dataclass
class VisionInputs:
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor
    position_ids: torch.Tensor  # (3, B, L)
    rope_deltas: torch.Tensor  # (B, 1)
    patch_segments: list[Segment]


class VisionSupport:
    """The image processor, the published ``VisionInfo`` and the batch builder of one VL model."""

    def __init__(self, path: Path, model: Any, config: Any) -> None:
        from transformers import AutoImageProcessor

        self.model = model
        self.processor = AutoImageProcessor.from_pretrained(str(path))
        p = self.processor
        size: Any = getattr(p, "size", None) or {}
        min_px = int(size.get("shortest_edge") or getattr(p, "min_pixels", 56 * 56))
        max_px = int(size.get("longest_edge") or getattr(p, "max_pixels", 28 * 28 * 1280))
        self.info = VisionInfo(
            patch_size=int(p.patch_size), merge_size=int(p.merge_size),
            temporal_patch_size=int(getattr(p, "temporal_patch_size", 2)), min_pixels=min_px, max_pixels=max_px,
            image_token_id=int(config.image_token_id),
            vision_start_token_id=getattr(config, "vision_start_token_id", None),
            vision_end_token_id=getattr(config, "vision_end_token_id", None),
        )

    def inputs(self, ids: torch.Tensor, row_images: list[list[ResolvedImage]], row_segments: list[Segment],
               mask: torch.Tensor | None = None) -> VisionInputs | None:
        """Model inputs for a padded batch whose row ``r`` holds ``row_images[r]`` (None: no image at all)."""
        flat = [im for imgs in row_images for im in imgs]
        if not flat:
            return None
        out = self.processor(images=[im.image for im in flat], return_tensors="pt")
        grid = out["image_grid_thw"].to(ids.device)
        want = torch.tensor([im.grid for im in flat], dtype=grid.dtype, device=grid.device)
        if not torch.equal(grid, want):
            raise InternalError("the image processor's grid differs from the counted one")
        mm_types = (ids == self.info.image_token_id).int()
        pos, deltas = self.model.model.get_rope_index(ids, mm_token_type_ids=mm_types, image_grid_thw=grid,
                                                      attention_mask=mask)
        patches = [sum(im.grid[0] * im.grid[1] * im.grid[2] for im in imgs) for imgs in row_images]
        psegs: list[Segment] = []
        acc = 0
        starts = [0]
        for n in patches:
            acc += n
            starts.append(acc)
        for s, e, name in row_segments:
            ps, pe = starts[s], starts[e]
            if pe > ps:
                psegs.append((ps, pe, name))
        pixel_values = out["pixel_values"].to(ids.device, dtype=self.model.dtype)
        return VisionInputs(pixel_values, grid, pos, deltas.reshape(-1, 1), psegs)
