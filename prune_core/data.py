"""Images in, batches out: ImageFolder scanning by class name, decoding, stable splits, batching.

Decoded images are kept as uint8 tensors at the model's input size (3 bytes/pixel), which is
what a device-local buffer of a few thousand samples costs; batches are normalised on the fly.
How an image of any shape becomes that input is one `Preprocess`, taken from the model card by
every caller (serving, cycles, the CLI), so a model sees the same pixels wherever it runs.
"""
from __future__ import annotations

import hashlib
import io
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Iterator, Sequence, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"})
UNLABELLED = -1
# Decompression-bomb guard: refuse images with more pixels than this before decoding them.
MAX_PIXELS = 40_000_000


class DataError(ValueError):
    """A problem with the user's data, reported as one line."""


@dataclass
class ImageSet:
    """Decoded images (uint8, N×3×S×S), labels (model class index, -1 unlabelled) and stable keys."""

    images: torch.Tensor
    labels: torch.Tensor
    keys: list[str]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, index: torch.Tensor | Sequence[int]) -> "ImageSet":
        idx = torch.as_tensor(index, dtype=torch.long)
        return ImageSet(self.images[idx], self.labels[idx], [self.keys[i] for i in idx.tolist()])

    @property
    def labelled(self) -> int:
        return int((self.labels >= 0).sum())

    def class_counts(self, num_classes: int) -> list[int]:
        lab = self.labels[self.labels >= 0]
        return torch.bincount(lab, minlength=num_classes).tolist()

    @staticmethod
    def concat(parts: Sequence["ImageSet"]) -> "ImageSet":
        return ImageSet(
            torch.cat([p.images for p in parts]),
            torch.cat([p.labels for p in parts]),
            [k for p in parts for k in p.keys],
        )


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


def decode_image(source: bytes | str | Path, policy: PreprocessLike) -> torch.Tensor:
    """Decode any common image (grey, alpha, palette, 16-bit) to a uint8 3×S×S tensor, S the
    policy's crop size (an int policy: the whole image scaled to S×S).

    Raises DataError for empty, truncated, unrecognised or over-large images.
    """
    policy = as_preprocess(policy)
    try:
        fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else open(source, "rb")
        with fp, Image.open(fp) as img:
            if img.width * img.height > MAX_PIXELS:
                raise DataError(f"image of {img.width}x{img.height} pixels exceeds the {MAX_PIXELS} pixel limit")
            img.load()
            arr = np.asarray(policy.apply(_to_rgb(img)), dtype=np.uint8)
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot decode image: {exc}") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def scan_image_folder(
    root: str | Path, class_names: Sequence[str], skip_unknown: bool = False
) -> list[tuple[Path, int]]:
    """List (path, class index) for an ImageFolder, matching sub-folders to `class_names` by name.

    A folder holding only some of the classes is normal; a folder named after no class is an
    error unless `skip_unknown`.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder '{root}' does not exist or is not a directory")
    index = {name: i for i, name in enumerate(class_names)}
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError(f"data folder '{root}' has no class sub-folders (expected {root}/<class>/<image>)")
    unknown = [f.name for f in folders if f.name not in index]
    if unknown and not skip_unknown:
        raise DataError(
            f"data folder '{root}' has classes the model lacks: {', '.join(unknown[:5])}"
            f"{' …' if len(unknown) > 5 else ''} (use --skip-unknown to ignore them)"
        )
    items = [
        (path, index[folder.name])
        for folder in folders
        if folder.name in index
        for path in sorted(folder.rglob("*"))
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()
    ]
    if not items:
        raise DataError(f"data folder '{root}' holds no images of the model's classes")
    return items


def load_image_folder(
    root: str | Path,
    class_names: Sequence[str],
    policy: PreprocessLike,
    skip_unknown: bool = False,
    limit_per_class: int | None = None,
) -> ImageSet:
    """Decode an ImageFolder into memory by `policy` (the model card's `preprocess`, or a square
    size) with two threads: PIL releases the GIL while decoding."""
    root = Path(root)
    items = scan_image_folder(root, class_names, skip_unknown)
    if limit_per_class is not None:
        seen: dict[int, int] = {}
        kept = []
        for path, label in items:
            seen[label] = seen.get(label, 0) + 1
            if seen[label] <= limit_per_class:
                kept.append((path, label))
        items = kept

    def load(item: tuple[Path, int]) -> torch.Tensor:
        try:
            return decode_image(item[0], policy)
        except DataError as exc:
            raise DataError(f"{item[0]}: {exc}") from None

    with ThreadPoolExecutor(max_workers=2) as pool:
        images = list(pool.map(load, items))
    return ImageSet(
        torch.stack(images),
        torch.tensor([label for _, label in items], dtype=torch.long),
        [str(path.relative_to(root)) for path, _ in items],
    )


def holdout_mask(keys: Sequence[str], fraction: float, salt: str = "edgetune") -> torch.Tensor:
    """True for the keys reserved for validation: a hash of each key, so the split is stable as data grows."""
    cut = int(fraction * 10_000)
    return torch.tensor(
        [int.from_bytes(hashlib.blake2b(f"{salt}:{k}".encode(), digest_size=4).digest(), "big") % 10_000 < cut for k in keys],
        dtype=torch.bool,
    )


def split_holdout(data: ImageSet, fraction: float = 0.2, salt: str = "edgetune") -> tuple[ImageSet, ImageSet]:
    """(train, held-out) by `holdout_mask`; deterministic for a given set of keys."""
    mask = holdout_mask(data.keys, fraction, salt)
    return data.subset(torch.nonzero(~mask).flatten()), data.subset(torch.nonzero(mask).flatten())


def _augment(x: torch.Tensor, gen: torch.Generator, pad: int = 4, flip: bool = True) -> torch.Tensor:
    """Random crop with zero padding and optional horizontal flip on a uint8 batch."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen).tolist()
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen).tolist()
    out = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])
    if flip:
        mask = torch.rand(n, generator=gen) < 0.5
        out = torch.where(mask[:, None, None, None], out.flip(3), out)
    return out


def batches(
    data: ImageSet,
    batch_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    shuffle: bool = False,
    augment: bool = False,
    flip: bool = True,
    seed: int = 0,
    device: torch.device | str = "cpu",
    max_batches: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield normalised float batches (x, y); y is -1 where a sample has no label."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data), generator=gen) if shuffle else torch.arange(len(data))
    m = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1) * 255.0
    s = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1) * 255.0
    for count, start in enumerate(range(0, len(data), batch_size)):
        if max_batches is not None and count >= max_batches:
            return
        idx = order[start : start + batch_size]
        x = data.images[idx]
        if augment:
            x = _augment(x, gen, flip=flip)
        x = (x.to(device, non_blocking=True).float() - m) / s
        yield x, data.labels[idx].to(device, non_blocking=True)
