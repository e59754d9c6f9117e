"""CIFAR-10 for the protocol: the tarball unpacked once, train/validation/held-out splits by file name,
and the class subsets a device sees."""
from __future__ import annotations

import math
import os
import random
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from prune_core import ImageSet, load_image_folder, split_holdout

from .progress import log

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "cifar10-train.tar.gz"
DEFAULT_CACHE = REPO / "bench" / "out" / "cache"

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
HOLDOUT = 0.2
VAL_SALT = "paper-protocol-val"


def unpack(tarball: Path, cache: Path) -> Path:
    """Unpack the tarball once into `cache` (atomically: a partial unpack is never reused); the ImageFolder root."""
    if not tarball.is_file():
        raise SystemExit(f"paper_protocol: data tarball '{tarball}' not found (use --data)")
    st = tarball.stat()
    dest = cache / f"{tarball.name.split('.')[0]}-{st.st_size}"
    if not (dest / ".complete").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        log(f"unpacking {tarball} into {dest}")
        tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=cache))
        try:
            with tarfile.open(tarball) as tf:
                try:
                    tf.extractall(tmp, filter="data")
                except TypeError:  # Python without extraction filters
                    tf.extractall(tmp)
            (tmp / ".complete").touch()
            shutil.rmtree(dest, ignore_errors=True)
            os.replace(tmp, dest)
        except OSError:
            if not (dest / ".complete").is_file():  # a concurrent run did not win the race either
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    roots = [d for d in [dest / "train", dest] if d.is_dir() and all((d / c).is_dir() for c in CLASSES)]
    if not roots:
        raise SystemExit(f"paper_protocol: {tarball} does not hold train/<class>/ folders for the CIFAR-10 classes")
    return roots[0]


@dataclass
class Splits:
    fit: ImageSet  # training images
    val: ImageSet  # early stopping / best-epoch selection
    test: ImageSet  # held-out images everything is scored on


def load_splits(root: Path, size: int, per_class: int | None, val_fraction: float, test_per_class: int | None = None) -> Splits:
    """Train/validation/held-out splits of the first `per_class` images of each class. With `test_per_class`, the
    held-out images are those of a larger cap: the split is by file name, so they are a superset of the small cap's
    held-out images and hold none of its training images (less noise in each score, the same training data)."""
    data = load_image_folder(root, CLASSES, size, limit_per_class=per_class)
    trainval, test = split_holdout(data, HOLDOUT)
    fit, val = split_holdout(trainval, val_fraction, salt=VAL_SALT)
    if test_per_class is not None:
        _, test = split_holdout(load_image_folder(root, CLASSES, size, limit_per_class=test_per_class), HOLDOUT)
    return Splits(fit, val, test)


def restrict(data: ImageSet, classes: tuple[int, ...]) -> ImageSet:
    keep = torch.isin(data.labels, torch.tensor(classes, dtype=torch.long))
    return data.subset(torch.nonzero(keep).flatten())


def make_subsets(sizes: list[int], per_size: int, seed: int) -> list[tuple[int, ...]]:
    """Distinct random class subsets; the first m of a size are the same whatever `per_size` is."""
    subsets = []
    for k in sizes:
        rng = random.Random(f"{seed}:{k}")
        want = min(per_size, math.comb(len(CLASSES), k))
        chosen: list[tuple[int, ...]] = []
        while len(chosen) < want:
            c = tuple(sorted(rng.sample(range(len(CLASSES)), k)))
            if c not in chosen:
                chosen.append(c)
        subsets += chosen
    return subsets


def subset_name(classes: tuple[int, ...]) -> str:
    return "+".join(CLASSES[i] for i in classes)
