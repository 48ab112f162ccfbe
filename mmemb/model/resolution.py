"""One image resolution per run, shared by the teacher, the embedder and the evaluation.

Qwen-VL turns an image into ``(H / f) * (W / f)`` tokens, ``f = patch_size * merge_size``
(28 for Qwen2/2.5-VL, 32 for Qwen3-VL), after resizing it onto that grid within
``[min_pixels, max_pixels]`` (transformers' ``smart_resize``). The hub processors allow up
to 12.8 MP (Qwen2-VL) / 16.8 MP (Qwen3-VL): a 1700x2200 page is 4,819 / 3,657 tokens, a
3000x4000 one 15,301 / 11,750. A run therefore sets one ``[min_pixels, max_pixels]``
(``run.resolution``, wired into every stage) and every component resizes the image onto
the grid itself (:func:`fit_image`) before its processor sees it, so vLLM and transformers,
teacher and student, get the same pixels and the same token count; a processor whose own
limits are narrower (the tiny model's) shrinks it further, identically everywhere.

:func:`image_tokens` counts without decoding pixels beyond the header, which is what the
teacher's prompt budget (and the preflight) need.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MAX_PIXELS = 1024 * 1024


@dataclass(frozen=True)
class Grid:
    """A processor's resize rule: ``factor = patch * merge`` and its own pixel limits."""

    patch_size: int = 14
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @classmethod
    def of(cls, processor_or_path) -> Grid:
        """From a processor object, its image processor, or a checkpoint folder."""
        if isinstance(processor_or_path, (str, Path)):
            f = Path(processor_or_path) / "preprocessor_config.json"
            if not f.is_file():
                return cls()
            d = json.loads(f.read_text())
            size = d.get("size") or {}
            return cls(int(d.get("patch_size", 14)), int(d.get("merge_size", 2)),
                       int(d.get("min_pixels") or size.get("shortest_edge") or 56 * 56),
                       int(d.get("max_pixels") or size.get("longest_edge") or 28 * 28 * 1280))
        ip = getattr(processor_or_path, "image_processor", processor_or_path)
        size = getattr(ip, "size", None) or {}
        get = size.get if hasattr(size, "get") else lambda k, d=None: getattr(size, k, d)
        return cls(int(getattr(ip, "patch_size", 14)), int(getattr(ip, "merge_size", 2)),
                   int(getattr(ip, "min_pixels", None) or get("shortest_edge") or 56 * 56),
                   int(getattr(ip, "max_pixels", None) or get("longest_edge")
                       or 28 * 28 * 1280))


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int
                 ) -> tuple[int, int]:
    """The Qwen-VL resize rule (transformers' ``qwen2_vl.smart_resize``, re-derived): both
    sides a multiple of ``factor``, area within ``[min_pixels, max_pixels]``, aspect kept."""
    import math

    if max(height, width) / max(1, min(height, width)) > 200:
        raise ValueError(f"image of {width}x{height}: aspect ratio above 200, which Qwen-VL "
                         "processors refuse; crop or pad it")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def target_size(width: int, height: int, grid: Grid, max_pixels: int | None,
                min_pixels: int | None = None) -> tuple[int, int]:
    """(width, height) an image of this size is resized to under the run's limits, then
    the processor's own (narrower ones win)."""
    lo = max(grid.min_pixels, min_pixels or 0)
    hi = min(grid.max_pixels, max_pixels or grid.max_pixels)
    lo = min(lo, hi)
    h, w = smart_resize(height, width, grid.factor, lo, hi)
    return w, h


def image_tokens(width: int, height: int, grid: Grid, max_pixels: int | None,
                 min_pixels: int | None = None) -> int:
    """Prompt tokens an image of ``width x height`` becomes (its ``<|image_pad|>`` run)."""
    w, h = target_size(width, height, grid, max_pixels, min_pixels)
    return (w // grid.factor) * (h // grid.factor)


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) from the file header, without decoding the pixels (regular files
    only: a FIFO would block the open)."""
    from PIL import Image

    from mmemb.model.images import regular_file

    regular_file(path)
    with Image.open(path) as im:
        return im.size


def fit_image(img, grid: Grid | None, max_pixels: int | None, min_pixels: int | None = None):
    """Resize a PIL image onto the processor grid under the run's limits (no-op when it is
    already there). Without a grid (no processor known) only the ``max_pixels`` cap."""
    if grid is None:
        if max_pixels and img.width * img.height > max_pixels:
            scale = (max_pixels / (img.width * img.height)) ** 0.5
            img = img.resize((max(1, int(img.width * scale)), max(1, int(img.height * scale))))
        return img
    if (max_pixels is None or max_pixels >= grid.max_pixels) and (min_pixels or 0) <= \
            grid.min_pixels:
        return img  # the processor's own limits bind: it resizes, the same way everywhere
    w, h = target_size(img.width, img.height, grid, max_pixels, min_pixels)
    return img if (w, h) == img.size else img.resize((w, h), resample=3)  # bicubic, as HF
