"""JPEG decoding at the size the model needs: PIL's draft mode against a full decode (issue 21).

prune_core.imagedecode.decode_array decodes a JPEG at 1/2, 1/4 or 1/8 scale (PIL's `draft`, the DCT
scaling of libjpeg) when the image stays at least DRAFT_MARGIN times the resize target on both sides,
then resizes as before. Per JPEG size and target this prints, for a full decode, draft with the margin
of 2 (what serving does) and draft straight to the target (margin 1):

  ms          median decode time per image (decode + resize + crop, to the uint8 3×S×S array)
  mean|Δ|     mean absolute pixel difference from the full decode (0..255), and the largest one
  top-1       (with --model, 32 px targets only) the model's top-1 on unseen CIFAR-10 images upscaled to
              the JPEG size, and how many answers changed against the full decode

The photos are the three real JPEGs shipped with matplotlib and scikit-learn (512×600 and two
427×640), re-encoded (quality 90) at each size: 224 px is a downscale, 1280 and 1920 px upscales
(their fine detail is interpolated, so their pixel differences are a lower bound). CIFAR-10's own
32 px JPEGs show the case where draft cannot apply.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python bench/decode_bench.py
    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python bench/decode_bench.py --model bench/out/label_shift/models/cifar_small
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from protocol.data import CLASSES, DEFAULT_CACHE, DEFAULT_DATA, unpack  # noqa: E402

from prune_core import imagedecode  # noqa: E402
from prune_core.imagedecode import Preprocess, decode_array  # noqa: E402

PHOTOS = (("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"), ("sklearn", "datasets/images/china.jpg"),
          ("sklearn", "datasets/images/flower.jpg"))
SIZES = (224, 640, 1280, 1920)  # the JPEG's longer side
TARGETS = {"32 px (whole image)": Preprocess(32), "224 px (resize 256, crop)": Preprocess(224, 256)}
VARIANTS = {"full": (False, 2), "draft, margin 2": (True, 2), "draft, margin 1": (True, 1)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=15, help="decodes of each image per variant (the median is reported)")
    p.add_argument("--cifar", type=int, default=300, help="CIFAR-10 JPEGs for the 32 px row and the top-1 check")
    p.add_argument("--model", default=None, help="a 32 px CIFAR-10 model directory for the top-1 check (e.g. bench/label_shift.py's)")
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--cache", default=str(DEFAULT_CACHE))
    return p.parse_args(argv)


def photo_paths() -> list[Path]:
    out = []
    for package, rel in PHOTOS:
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.origin and (Path(spec.origin).parent / rel).is_file():
            out.append(Path(spec.origin).parent / rel)
    if not out:
        raise SystemExit("decode_bench: none of the sample photos (matplotlib, scikit-learn) is installed")
    return out


def jpeg(img: Image.Image, longer: int) -> bytes:
    w, h = img.size
    scale = longer / max(w, h)
    buf = io.BytesIO()
    img.convert("RGB").resize((round(w * scale), round(h * scale)), Image.BICUBIC).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def decode(data: bytes, policy: Preprocess, variant: str) -> np.ndarray:
    draft, margin = VARIANTS[variant]
    imagedecode.DRAFT_MARGIN = margin  # read at every call: the bench's only way to vary it
    return decode_array(data, policy, draft=draft)


def timed(images: list[bytes], policy: Preprocess, repeats: int) -> dict[str, float]:
    """Median ms per image of each variant over `repeats` passes over `images`; the variants take
    turns within each pass, so a busy moment of the shared machine costs them alike."""
    runs: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for variant in VARIANTS:  # warm-up: file caches, PIL's plugin and resampling set-up
        decode(images[0], policy, variant)
    for _ in range(repeats):
        for variant in VARIANTS:
            start = time.perf_counter()
            for data in images:
                decode(data, policy, variant)
            runs[variant].append((time.perf_counter() - start) * 1000 / len(images))
    return {v: statistics.median(r) for v, r in runs.items()}


def pixel_diff(images: list[bytes], policy: Preprocess, variant: str) -> tuple[float, int]:
    diffs = [np.abs(decode(d, policy, variant).astype(np.int16) - decode(d, policy, "full").astype(np.int16)) for d in images]
    return float(np.mean([d.mean() for d in diffs])), int(max(d.max() for d in diffs))


def cifar_jpegs(args, n: int) -> tuple[list[bytes], list[int]]:
    """`n` CIFAR-10 JPEGs (balanced) from beyond the first 4,000 of each class: bench/label_shift.py's
    base model never saw them."""
    root = unpack(Path(args.data), Path(args.cache))
    data, labels = [], []
    for label, name in enumerate(CLASSES):
        for path in sorted((root / name).iterdir())[4000:4000 + n // len(CLASSES)]:
            data.append(path.read_bytes())
            labels.append(label)
    return data, labels


def top1_rows(model_dir: Path, cifar: list[bytes], labels: list[int], repeats: int) -> list[str]:
    import torch

    from prune_core.model_format import load_model

    model, card = load_model(model_dir)
    mean = torch.tensor(card.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(card.std).view(1, 3, 1, 1) * 255
    y = np.asarray(labels)

    def predict(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model((torch.from_numpy(batch).float() - mean) / std).argmax(1).numpy()

    rows = []
    for size in (224, 640):
        upscaled = [jpeg(Image.open(io.BytesIO(d)), size) for d in cifar]
        preds = {v: predict(np.stack([decode(d, card.preprocess, v) for d in upscaled])) for v in VARIANTS}
        for v, p in preds.items():
            changed = int((p != preds["full"]).sum())
            rows.append(f"| {size} px upscaled CIFAR | {v} | {100 * (p == y).mean():.1f} % | {changed} of {len(y)} |")
    native = predict(np.stack([decode(d, card.preprocess, "full") for d in cifar]))
    rows.append(f"| 32 px CIFAR (native) | full | {100 * (native == y).mean():.1f} % | — |")
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    photos = [Image.open(p) for p in photo_paths()]
    cifar, labels = cifar_jpegs(args, args.cifar)
    print(f"photos: {', '.join(f'{p.size[0]}×{p.size[1]}' for p in photos)}; {len(cifar)} CIFAR-10 JPEGs; "
          f"{args.repeats} repeats; PIL {Image.__version__}")
    print("\n| JPEG | target | variant | ms/image | mean abs Δ (max) |\n|---|---|---|---|---|")
    sets = {"32 px CIFAR": cifar} | {f"{s} px photo": [jpeg(p, s) for p in photos] for s in SIZES}
    for name, images in sets.items():
        for target, policy in TARGETS.items():
            if name.startswith("32 px") and policy.crop_size > 32:
                continue
            ms_of = timed(images, policy, args.repeats if len(images) < 10 else max(3, args.repeats // 3))
            for variant, ms in ms_of.items():
                diff = "—" if variant == "full" else "{:.2f} ({})".format(*pixel_diff(images, policy, variant))
                print(f"| {name} | {target} | {variant} | {ms:.2f} | {diff} |", flush=True)
    if args.model:
        print("\n| JPEG | variant | top-1 | answers changed vs full |\n|---|---|---|---|")
        for row in top1_rows(Path(args.model), cifar, labels, args.repeats):
            print(row, flush=True)
    imagedecode.DRAFT_MARGIN = 2


if __name__ == "__main__":
    main()
