"""prune_core.data: decoding any common image, ImageFolder scanning by class name, stable
hold-out splits and batching."""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from prune_core import imagedecode
from prune_core.data import (
    DataError,
    ImageSet,
    batches,
    decode_image,
    holdout_mask,
    load_image_folder,
    scan_image_folder,
    split_holdout,
)


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width×height (8-bit RGB) with no pixel data."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def rng_image(h: int, w: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    shape = (h, w, channels) if channels > 1 else (h, w)
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


# ---------------------------------------------------------------------------
# decode_image
# ---------------------------------------------------------------------------

class TestDecode:
    def test_png_rgb_exact_at_native_size(self):
        arr = rng_image(32, 32)
        out = decode_image(encode(Image.fromarray(arr)), 32)
        assert out.dtype == torch.uint8 and out.shape == (3, 32, 32)
        assert torch.equal(out, torch.from_numpy(arr).permute(2, 0, 1))

    def test_jpeg_resized(self):
        img = Image.new("RGB", (48, 40), (200, 30, 90))
        out = decode_image(encode(img, "JPEG", quality=95), 32)
        assert out.shape == (3, 32, 32) and out.dtype == torch.uint8
        mean = out.float().mean(dim=(1, 2))
        assert torch.allclose(mean, torch.tensor([200.0, 30.0, 90.0]), atol=4)

    def test_from_path_and_str(self, tmp_path):
        arr = rng_image(20, 20, seed=1)
        path = tmp_path / "x.png"
        Image.fromarray(arr).save(path)
        a = decode_image(path, 16)
        b = decode_image(str(path), 16)
        assert a.shape == (3, 16, 16) and torch.equal(a, b)

    def test_grayscale_becomes_three_equal_channels(self):
        arr = rng_image(32, 32, channels=1, seed=2)
        out = decode_image(encode(Image.fromarray(arr)), 32)
        assert out.shape == (3, 32, 32)
        for c in range(3):
            assert torch.equal(out[c], torch.from_numpy(arr))

    def test_rgba_composited_on_black(self):
        arr = np.zeros((32, 32, 4), dtype=np.uint8)
        arr[:, :16] = (255, 0, 0, 255)  # opaque red
        arr[:, 16:24] = (0, 255, 0, 0)  # fully transparent green
        arr[:, 24:] = (255, 255, 255, 128)  # half-transparent white
        out = decode_image(encode(Image.fromarray(arr)), 32)
        assert out.shape == (3, 32, 32)
        assert out[:, :, :16].eq(torch.tensor([255, 0, 0], dtype=torch.uint8)[:, None, None]).all()
        assert out[:, :, 16:24].eq(0).all()
        assert ((out[:, :, 24:].int() - 128).abs() <= 1).all()

    def test_la_grey_with_alpha(self):
        arr = np.zeros((32, 32, 2), dtype=np.uint8)
        arr[..., 0] = 200
        arr[:16, :, 1] = 255
        arr[16:, :, 1] = 0
        img = Image.fromarray(arr)
        assert img.mode == "LA"
        out = decode_image(encode(img), 32)
        assert out[:, :16].eq(200).all() and out[:, 16:].eq(0).all()

    def test_palette_colours(self):
        img = Image.new("P", (32, 32), 0)
        img.putpalette([10, 20, 30, 250, 240, 230] + [0] * 762)
        img.paste(1, (0, 0, 32, 8))
        out = decode_image(encode(img), 32)
        assert out[:, :8].eq(torch.tensor([250, 240, 230], dtype=torch.uint8)[:, None, None]).all()
        assert out[:, 8:].eq(torch.tensor([10, 20, 30], dtype=torch.uint8)[:, None, None]).all()

    def test_palette_with_transparency(self):
        img = Image.new("P", (32, 32), 0)
        img.putpalette([10, 20, 30, 250, 240, 230] + [0] * 762)
        img.paste(1, (0, 0, 32, 8))
        data = encode(img, transparency=0)  # index 0 transparent
        assert Image.open(io.BytesIO(data)).info.get("transparency") == 0
        out = decode_image(data, 32)
        assert out[:, :8].eq(torch.tensor([250, 240, 230], dtype=torch.uint8)[:, None, None]).all()
        assert out[:, 8:].eq(0).all()

    def test_16bit_png(self):
        arr = np.tile(np.linspace(0, 65535, 32).astype(np.uint16), (32, 1))
        img = Image.fromarray(arr)
        data = encode(img)
        assert Image.open(io.BytesIO(data)).mode.startswith("I")
        out = decode_image(data, 32)
        assert out.shape == (3, 32, 32) and out.dtype == torch.uint8
        row = out[0, 0].int()
        assert row[0] == 0 and row[-1] == 255
        assert (row[1:] >= row[:-1]).all()  # monotone: no wrap-around from 16 bits to 8
        assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])

    @pytest.mark.parametrize(
        "payload",
        [
            pytest.param(b"", id="empty"),
            pytest.param(b"not an image at all" * 10, id="garbage"),
            pytest.param(b"\x89PNG\r\n\x1a\n", id="png-signature-only"),
        ],
    )
    def test_unrecognised_bytes(self, payload):
        with pytest.raises(DataError, match="cannot decode"):
            decode_image(payload, 32)

    @pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
    def test_truncated(self, fmt):
        data = encode(Image.fromarray(rng_image(64, 64, seed=3)), fmt)
        with pytest.raises(DataError):
            decode_image(data[: len(data) // 2], 32)

    def test_corrupt_png_data(self):
        data = bytearray(encode(Image.fromarray(rng_image(64, 64, seed=4))))
        idat = data.index(b"IDAT")
        for i in range(idat + 20, idat + 60):
            data[i] ^= 0xFF
        with pytest.raises(DataError):
            decode_image(bytes(data), 32)

    def test_missing_file(self, tmp_path):
        with pytest.raises(DataError):
            decode_image(tmp_path / "nope.png", 32)

    def test_header_claiming_huge_size_is_refused_before_decoding(self):
        # 8000×8000 = 64M pixels: over MAX_PIXELS (40M) but under Pillow's own bomb limit.
        with pytest.raises(DataError, match="pixel limit"):
            decode_image(png_header_only(8000, 8000), 32)

    def test_header_beyond_pillow_bomb_limit(self):
        with pytest.raises(DataError):
            decode_image(png_header_only(30000, 30000), 32)

    def test_max_pixels_monkeypatched(self, monkeypatch):
        monkeypatch.setattr(imagedecode, "MAX_PIXELS", 100)  # the one place decoding reads it
        assert decode_image(encode(Image.new("RGB", (10, 10))), 8).shape == (3, 8, 8)
        with pytest.raises(DataError, match="exceeds"):
            decode_image(encode(Image.new("RGB", (11, 10))), 8)



def smooth_photo(width: int, height: int) -> Image.Image:
    """A photo-like image: smooth gradients plus some texture (what JPEG and draft are made for)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    arr = np.stack([128 + 100 * np.sin(x / 37), 128 + 100 * np.cos(y / 23), 128 + 60 * np.sin((x + y) / 11)], -1)
    arr += np.random.default_rng(0).normal(0, 6, arr.shape)
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


class TestDecodeArray:
    """imagedecode.decode_array: the torch-free decoder serving uses; decode_image wraps it."""

    def test_decode_image_is_decode_array_as_a_tensor(self):
        data = encode(smooth_photo(200, 150), "JPEG", quality=90)
        arr = imagedecode.decode_array(data, 32)
        assert arr.dtype == np.uint8 and arr.shape == (3, 32, 32) and arr.flags.c_contiguous
        assert torch.equal(decode_image(data, 32), torch.from_numpy(arr))

    def test_draft_applies_only_to_jpegs_at_least_twice_the_target(self):
        """A JPEG under twice the resize target, or any PNG, is decoded exactly as without draft; a
        larger JPEG is decoded at reduced scale: close to the full decode, not identical."""
        small = encode(smooth_photo(60, 60), "JPEG", quality=90)  # under 2×32: no reduction possible
        assert np.array_equal(imagedecode.decode_array(small, 32), imagedecode.decode_array(small, 32, draft=False))
        png = encode(smooth_photo(640, 480))
        assert np.array_equal(imagedecode.decode_array(png, 32), imagedecode.decode_array(png, 32, draft=False))
        large = encode(smooth_photo(640, 480), "JPEG", quality=90)
        drafted = imagedecode.decode_array(large, 32).astype(np.int16)
        full = imagedecode.decode_array(large, 32, draft=False).astype(np.int16)
        assert not np.array_equal(drafted, full)  # draft ran
        assert np.abs(drafted - full).mean() < 4  # and kept the picture

    def test_draft_keeps_the_resize_rule_for_resize_and_crop(self):
        """resize 256 / crop 224 of a 1920×1440 JPEG (decoded at half scale, 960×720, still over twice
        the 341×256 resize): the output shape is kept and the pixels stay close to the full decode."""
        from prune_core.imagedecode import Preprocess

        data = encode(smooth_photo(1920, 1440), "JPEG", quality=90)
        policy = Preprocess(224, 256)
        drafted, full = imagedecode.decode_array(data, policy), imagedecode.decode_array(data, policy, draft=False)
        assert drafted.shape == full.shape == (3, 224, 224) and not np.array_equal(drafted, full)
        assert np.abs(drafted.astype(np.int16) - full.astype(np.int16)).mean() < 4


# ---------------------------------------------------------------------------
# Scanning and loading folders
# ---------------------------------------------------------------------------

def make_folder(root: Path, layout: dict[str, int]) -> Path:
    for cls, n in layout.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("RGB", (8, 8), (i * 20 % 256, 0, 0)).save(root / cls / f"{i}.png")
    return root


class TestScan:
    def test_matches_by_name_not_position(self, mnist_folder):
        names = [str(d) for d in reversed(range(10))] + ["extra"]
        items = scan_image_folder(mnist_folder, names)
        assert len(items) == 400
        for path, label in items:
            assert names[label] == path.parent.name

    def test_subset_of_classes(self, tmp_path):
        root = make_folder(tmp_path / "d", {"cat": 2, "ship": 3})
        names = ["airplane", "cat", "dog", "ship"]
        items = scan_image_folder(root, names)
        labels = [label for _, label in items]
        assert sorted(labels) == [1, 1, 3, 3, 3]

    def test_ignores_non_images_and_hidden_folders_and_recurses(self, tmp_path):
        root = make_folder(tmp_path / "d", {"a": 2, ".cache": 3})
        (root / "a" / "notes.txt").write_text("hello")
        (root / "a" / "nested").mkdir()
        Image.new("RGB", (8, 8)).save(root / "a" / "nested" / "deep.PNG")
        (root / "README.md").write_text("top-level files are not classes")
        items = scan_image_folder(root, ["a"])
        assert sorted(p.name for p, _ in items) == ["0.png", "1.png", "deep.PNG"]

    def test_unknown_class_is_an_error(self, tmp_path):
        root = make_folder(tmp_path / "d", {"a": 1, "zebra": 1})
        with pytest.raises(DataError, match="zebra") as err:
            scan_image_folder(root, ["a", "b"])
        assert "--skip-unknown" in str(err.value)
        assert "\n" not in str(err.value)

    def test_unknown_class_skipped(self, tmp_path):
        root = make_folder(tmp_path / "d", {"a": 1, "zebra": 2})
        items = scan_image_folder(root, ["a", "b"], skip_unknown=True)
        assert [(p.parent.name, label) for p, label in items] == [("a", 0)]

    def test_only_unknown_classes_skipped_is_an_error(self, tmp_path):
        root = make_folder(tmp_path / "d", {"zebra": 2})
        with pytest.raises(DataError, match="no images"):
            scan_image_folder(root, ["a"], skip_unknown=True)

    def test_missing_and_empty_folders(self, tmp_path):
        with pytest.raises(DataError, match="does not exist"):
            scan_image_folder(tmp_path / "missing", ["a"])
        (tmp_path / "empty").mkdir()
        with pytest.raises(DataError, match="no class sub-folders"):
            scan_image_folder(tmp_path / "empty", ["a"])
        (tmp_path / "file").write_text("x")
        with pytest.raises(DataError):
            scan_image_folder(tmp_path / "file", ["a"])

    def test_load_cifar_subset(self, cifar_folder):
        names = ["cat", "dog", "ship", "unicorn"]
        data = load_image_folder(cifar_folder, names, 32, skip_unknown=True, limit_per_class=5)
        assert data.images.shape == (15, 3, 32, 32) and data.images.dtype == torch.uint8
        assert data.class_counts(len(names)) == [5, 5, 5, 0]
        assert all(names[label] == Path(key).parts[0] for key, label in zip(data.keys, data.labels.tolist()))
        assert data.images.float().std() > 10  # real photographs, not blank
        with pytest.raises(DataError, match="lacks"):
            load_image_folder(cifar_folder, names, 32)

    def test_load_mnist_folder(self, mnist_folder):
        names = [str(d) for d in range(10)]
        data = load_image_folder(mnist_folder, names, 32)
        assert len(data) == 400 and data.labelled == 400
        assert data.class_counts(10) == [40] * 10
        assert data.keys[0].startswith("0/")
        # grayscale PNGs come back as three identical channels
        assert torch.equal(data.images[:, 0], data.images[:, 1])

    def test_load_reports_the_bad_file(self, tmp_path):
        root = make_folder(tmp_path / "d", {"a": 2})
        (root / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
        with pytest.raises(DataError, match="broken.png"):
            load_image_folder(root, ["a"], 8)


# ---------------------------------------------------------------------------
# Hold-out split
# ---------------------------------------------------------------------------

class TestHoldout:
    def test_fraction(self):
        keys = [f"cls/{i:05d}.png" for i in range(4000)]
        mask = holdout_mask(keys, 0.2)
        assert mask.dtype == torch.bool and mask.shape == (4000,)
        assert 0.17 < mask.float().mean().item() < 0.23

    def test_stable_when_keys_are_added(self):
        keys = [f"k{i}" for i in range(1000)]
        more = keys + [f"new{i}" for i in range(3000)]
        assert torch.equal(holdout_mask(keys, 0.2), holdout_mask(more, 0.2)[:1000])

    def test_independent_of_order(self):
        keys = [f"k{i}" for i in range(500)]
        order = torch.randperm(500, generator=torch.Generator().manual_seed(0)).tolist()
        assert torch.equal(holdout_mask(keys, 0.3)[order], holdout_mask([keys[i] for i in order], 0.3))

    def test_extremes_and_salt(self):
        keys = [f"k{i}" for i in range(500)]
        assert not holdout_mask(keys, 0.0).any()
        assert holdout_mask(keys, 1.0).all()
        assert not torch.equal(holdout_mask(keys, 0.5), holdout_mask(keys, 0.5, salt="other"))
        # a larger fraction only adds keys to the held-out set
        small, large = holdout_mask(keys, 0.1), holdout_mask(keys, 0.4)
        assert (large | ~small).all()

    def test_split_holdout(self):
        n = 300
        data = ImageSet(torch.zeros(n, 3, 4, 4, dtype=torch.uint8), torch.arange(n) % 3, [f"k{i}" for i in range(n)])
        train_set, held = split_holdout(data, 0.2)
        assert len(train_set) + len(held) == n
        assert set(train_set.keys).isdisjoint(held.keys)
        assert set(train_set.keys) | set(held.keys) == set(data.keys)
        for part in (train_set, held):
            assert all(int(k[1:]) % 3 == y for k, y in zip(part.keys, part.labels.tolist()))


# ---------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------

MEAN = (0.5, 0.25, 0.125)
STD = (0.25, 0.5, 0.2)


def image_set(n: int = 10, size: int = 8, seed: int = 0) -> ImageSet:
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(1, 256, (n, 3, size, size), generator=gen, dtype=torch.uint8)
    labels = torch.arange(n) % 4 - 1  # includes -1 (unlabelled)
    return ImageSet(images, labels, [f"k{i}" for i in range(n)])


def denormalise(x: torch.Tensor) -> torch.Tensor:
    m = torch.tensor(MEAN).view(1, 3, 1, 1)
    s = torch.tensor(STD).view(1, 3, 1, 1)
    return ((x * s + m) * 255).round().to(torch.uint8)


class TestBatches:
    def test_normalisation_and_order(self):
        data = image_set(10)
        out = list(batches(data, 4, MEAN, STD))
        assert [x.shape[0] for x, _ in out] == [4, 4, 2]
        x = torch.cat([b[0] for b in out])
        y = torch.cat([b[1] for b in out])
        assert x.dtype == torch.float32 and x.shape == (10, 3, 8, 8)
        want = (data.images.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
        assert torch.allclose(x, want, atol=1e-5)
        assert torch.equal(y, data.labels)

    def test_max_batches(self):
        assert len(list(batches(image_set(10), 3, MEAN, STD, max_batches=2))) == 2

    def test_shuffle_is_a_seeded_permutation(self):
        data = image_set(20)
        data.labels = torch.arange(20)

        def order(seed):
            return torch.cat([y for _, y in batches(data, 6, MEAN, STD, shuffle=True, seed=seed)])

        a, b, c = order(1), order(1), order(2)
        assert sorted(a.tolist()) == list(range(20))
        assert torch.equal(a, b)
        assert not torch.equal(a, c)

    def test_augment_shapes_and_determinism(self):
        data = image_set(16)

        def run(seed, flip=True):
            return [b for b in batches(data, 5, MEAN, STD, shuffle=True, augment=True, flip=flip, seed=seed)]

        a, b, c = run(7), run(7), run(8)
        assert [x.shape for x, _ in a] == [(5, 3, 8, 8)] * 3 + [(1, 3, 8, 8)]
        for (xa, ya), (xb, yb) in zip(a, b):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert not all(torch.equal(xa, xc) for (xa, _), (xc, _) in zip(a, c))

    @pytest.mark.parametrize("flip", [False, True])
    def test_augment_is_a_padded_crop_and_maybe_flip(self, flip):
        data = image_set(16)
        data.labels = torch.arange(16)
        pad = 4
        padded = torch.nn.functional.pad(data.images, (pad, pad, pad, pad))
        flipped_any = False
        for x, y in batches(data, 16, MEAN, STD, shuffle=True, augment=True, flip=flip, seed=3):
            got = denormalise(x)
            for img, label in zip(got, y.tolist()):
                src = padded[label]
                crops = [src[:, dy : dy + 8, dx : dx + 8] for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)]
                plain = any(torch.equal(img, c) for c in crops)
                mirrored = any(torch.equal(img, c.flip(2)) for c in crops)
                assert plain or (flip and mirrored)
                flipped_any |= mirrored and not plain
        assert flipped_any == flip

    def test_unlabelled_labels_pass_through(self):
        data = image_set(8)
        data.labels = torch.full((8,), -1)
        ys = torch.cat([y for _, y in batches(data, 3, MEAN, STD, shuffle=True, augment=True)])
        assert ys.eq(-1).all()
