"""Images in, batches out: ImageFolder scanning by class name, decoding, stable splits, batching.

Decoded images are kept as uint8 tensors at the model's input size (3 bytes/pixel), which is
what a device-local buffer of a few thousand samples costs; batches are normalised on the fly.
How an image of any shape becomes that input is one `Preprocess`, taken from the model card by
every caller (serving, cycles, the CLI), so a model sees the same pixels wherever it runs.
"""
from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

from .imagedecode import (  # noqa: F401 (re-exported: decoding is torch-free, see imagedecode)
    MAX_PIXELS, DataError, Interpolation, Preprocess, PreprocessLike, as_preprocess, decode_array,
)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"})
UNLABELLED = -1
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
        """One set of `parts`' images, labels and keys, in order."""
        return ImageSet(
            torch.cat([p.images for p in parts]),
            torch.cat([p.labels for p in parts]),
            [k for p in parts for k in p.keys],
        )


def decode_image(source: bytes | str | Path, policy: PreprocessLike) -> torch.Tensor:
    """`imagedecode.decode_array` as a uint8 3×S×S tensor (the training side's form)."""
    return torch.from_numpy(decode_array(source, policy))


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


JUDGE_SALT = "edgetune-judge"


def split_judging(held: ImageSet, share: float) -> tuple[ImageSet, ImageSet | None]:
    """(the held-out samples a cycle chooses by, those kept to judge its candidate): `share` of `held`,
    by a hash of the key, takes no part in early stopping, the level search or the choice between
    criteria, so the verdict is not the optimistic score of the very samples that chose. (held, None)
    when `share` is 0 or either part would be empty: then the choosing samples judge too."""
    if share <= 0:
        return held, None
    choose, judge = split_holdout(held, share, salt=JUDGE_SALT)
    if len(choose) == 0 or len(judge) == 0:
        return held, None
    return choose, judge


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
