"""Bytes to pixels without torch: any common image to the model's uint8 3×S×S input, as numpy.

The serving process decodes every request with this and never imports torch (its engine takes
numpy); `data.decode_image` wraps the same function for the training side, so a model sees the
same pixels wherever it runs. JPEGs much larger than the model needs are decoded at a reduced
scale (`draft`, PIL's DCT scaling) before the resize: see `DRAFT_MARGIN`.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, UnidentifiedImageError

# Decompression-bomb guard: refuse images with more pixels than this before decoding them.
MAX_PIXELS = 40_000_000
# A JPEG is decoded at 1/2, 1/4 or 1/8 scale (PIL's draft) only as far as it stays at least this
# many times the resize target on both sides, so the final resize still averages over pixels
# (bench/decode_bench.py measured the speed and the pixel difference: bench/RESULTS.md).
DRAFT_MARGIN = 2


class DataError(ValueError):
    """A problem with the user's data, reported as one line."""


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = arr.max() if arr.size else 1.0
        arr = (arr * (255.0 / hi) if hi > 0 else arr).clip(0, 255).astype(np.uint8)
        img = Image.fromarray(arr, mode="L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


class Interpolation(str, Enum):
    """Resampling filter of the resize (PIL's, antialiased when shrinking, as torchvision's on PIL images)."""

    NEAREST = "nearest"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"

    @property
    def pil(self) -> int:
        return {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[self.value]


@dataclass(frozen=True)
class Preprocess:
    """How an image of any shape becomes the model's square `crop_size` input.

    With `resize_size`, as torchvision's classification presets do (``Resize(resize_size)`` then
    ``CenterCrop(crop_size)``): the shorter side is scaled to `resize_size`, the aspect ratio kept,
    and the centre `crop_size` square cut out. Without it (edgetune's original policy, the one of
    model cards that name only ``input_size``), the whole image is scaled to the square.
    """

    crop_size: int
    resize_size: int | None = None
    interpolation: Interpolation = Interpolation.BILINEAR

    def __post_init__(self) -> None:
        if self.crop_size < 1:
            raise ValueError(f"crop size must be positive, got {self.crop_size}")
        if self.resize_size is not None and self.resize_size < self.crop_size:
            raise ValueError(f"resize size {self.resize_size} is smaller than the crop size {self.crop_size}")
        object.__setattr__(self, "interpolation", Interpolation(self.interpolation))

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after the resize; torchvision's rule: the longer side is truncated."""
        if self.resize_size is None:
            return self.crop_size, self.crop_size
        if width <= height:
            return self.resize_size, int(self.resize_size * height / width)
        return int(self.resize_size * width / height), self.resize_size

    def apply(self, img: Image.Image) -> Image.Image:
        """`img` resized and centre-cropped to crop_size×crop_size."""
        size = self.resized_size(*img.size)
        if img.size != size:
            img = img.resize(size, self.interpolation.pil)
        width, height = size
        if (width, height) == (self.crop_size, self.crop_size):
            return img
        top = int(round((height - self.crop_size) / 2.0))
        left = int(round((width - self.crop_size) / 2.0))
        return img.crop((left, top, left + self.crop_size, top + self.crop_size))


# A plain int is a square input size: the whole image scaled to it (Preprocess(size)).
PreprocessLike = Union[Preprocess, int]


def as_preprocess(policy: PreprocessLike) -> Preprocess:
    return policy if isinstance(policy, Preprocess) else Preprocess(int(policy))


def decode_array(source: bytes | str | Path, policy: PreprocessLike, draft: bool = True) -> np.ndarray:
    """Decode any common image (grey, alpha, palette, 16-bit) to a uint8 3×S×S array (C-contiguous),
    S the policy's crop size (an int policy: the whole image scaled to S×S). `draft=False` decodes
    JPEGs at full scale.

    Raises DataError for empty, truncated, unrecognised or over-large images.
    """
    policy = as_preprocess(policy)
    try:
        fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else open(source, "rb")
        with fp, Image.open(fp) as img:
            if img.width * img.height > MAX_PIXELS:
                raise DataError(f"image of {img.width}x{img.height} pixels exceeds the {MAX_PIXELS} pixel limit")
            if draft and img.format == "JPEG":
                width, height = policy.resized_size(img.width, img.height)
                img.draft(img.mode, (width * DRAFT_MARGIN, height * DRAFT_MARGIN))
            img.load()
            arr = np.asarray(policy.apply(_to_rgb(img)), dtype=np.uint8)
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot decode image: {exc}") from None
    return np.ascontiguousarray(arr.transpose(2, 0, 1))
