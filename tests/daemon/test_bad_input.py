"""Bad input to a real daemon: every malformed, truncated, oversized, bomb-sized or odd image,
and every wrong content type, gets a 4xx with a message (or a 200 where the image is merely
unusual), never a 5xx, and the daemon keeps serving."""
from __future__ import annotations

import base64
import io
import socket
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.slow  # a real `edgetune serve`

LIMIT = 300_000  # max_upload_bytes of this module's daemon


@pytest.fixture(scope="module")
def api(tmp_path_factory, base_model_dir):
    import conftest  # tests/daemon/conftest.py (pytest puts its folder on sys.path)

    d = conftest.Daemon(tmp_path_factory.mktemp("bad") / "state", base_model_dir, {"EDGETUNE_MAX_UPLOAD_BYTES": str(LIMIT)}).start()
    yield d
    d.stop()


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def noise(mode: str = "RGB", size=(40, 30)) -> Image.Image:
    channels = {"RGB": 3, "RGBA": 4, "L": 1, "CMYK": 4}[mode]
    arr = np.random.default_rng(0).integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(arr.squeeze(), mode if mode != "CMYK" else None) if mode != "CMYK" else Image.fromarray(arr[..., :3]).convert("CMYK")


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims `width`×`height` with almost no data (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


JPEG = encode(noise(), "JPEG")
PNG = encode(noise(), "PNG")
BAD = [
    ("empty", b"", "image/png", 400, "empty"),
    ("empty octet-stream", b"", "application/octet-stream", 400, "empty"),
    ("garbage", b"\x00\x01not an image" * 10, "image/jpeg", 400, "cannot decode"),
    ("truncated jpeg", JPEG[: len(JPEG) // 2], "image/jpeg", 400, "cannot decode"),
    ("jpeg header only", JPEG[:20], "image/jpeg", 400, "cannot decode"),
    ("truncated png", PNG[: len(PNG) // 2], "image/png", 400, "cannot decode"),
    ("corrupt png crc", PNG[:40] + bytes([PNG[40] ^ 0xFF]) + PNG[41:], "image/png", 400, "cannot decode"),
    ("bomb 100000x100000", png_header_only(100_000, 100_000), "image/png", 400, "decod"),
    ("huge 9000x9000", png_header_only(9000, 9000), "image/png", 400, "pixel limit"),
    ("text/plain", b"hello", "text/plain", 415, "send an image"),
    ("json", b"{}", "application/json", 415, "send an image"),
    ("no content type", PNG, "", 415, "send an image"),
    ("oversize", b"\xff" * (LIMIT + 1), "image/jpeg", 413, "max_upload_bytes"),
]


@pytest.mark.parametrize("name,content,ctype,status,words", BAD, ids=[b[0] for b in BAD])
def test_bad_images_get_a_4xx_with_a_message(api, name, content, ctype, status, words):
    headers = {"content-type": ctype} if ctype else {}
    r = api.client.post("/infer", content=content, headers=headers)
    assert r.status_code == status, r.text
    assert words in r.json()["detail"]


def test_oversize_without_content_length_and_in_multipart(api):
    def chunks():
        for _ in range(LIMIT // 10_000 + 2):
            yield b"\xff" * 10_000
    r = api.client.post("/infer", content=chunks(), headers={"content-type": "image/jpeg"})  # chunked: no length
    assert r.status_code == 413 and "max_upload_bytes" in r.json()["detail"]
    r = api.client.post("/infer", files={"file": ("big.jpg", b"\xff" * (LIMIT + 1), "image/jpeg")})
    assert r.status_code == 413, r.text
    r = api.client.post("/infer", files={"other": ("x.png", PNG, "image/png")})
    assert r.status_code == 422 and "'file'" in r.json()["detail"]
    r = api.client.post("/infer", content=b"--xyz\r\nbroken", headers={"content-type": "multipart/form-data; boundary=xyz"})
    assert 400 <= r.status_code < 500, r.text


ODD = [
    ("grayscale jpeg", encode(noise("L"), "JPEG")),
    ("cmyk jpeg", encode(noise("CMYK"), "JPEG")),
    ("rgba png", encode(noise("RGBA"), "PNG")),
    ("16-bit png", encode(Image.fromarray(np.arange(1200, dtype=np.uint16).reshape(30, 40) * 50), "PNG")),
    ("1-bit png", encode(noise("L").convert("1"), "PNG")),
    ("palette with transparency", encode(noise().convert("P"), "PNG", transparency=0)),
    ("1x1", encode(Image.new("RGB", (1, 1)), "PNG")),
    ("4000x1", encode(Image.new("RGB", (4000, 1)), "PNG")),
    ("gif", encode(noise().convert("P"), "GIF")),
    ("webp", encode(noise(), "WEBP")),
    ("jpeg sent as image/png", JPEG),
]


@pytest.mark.parametrize("name,content", ODD, ids=[o[0] for o in ODD])
def test_unusual_but_valid_images_are_classified(api, name, content):
    r = api.client.post("/infer", content=content, headers={"content-type": "image/png"})
    assert r.status_code == 200, r.text
    assert len(r.json()["top"]) == 5


def test_bulk_samples_bad_input(api):
    big = base64.b64encode(b"\xff" * (LIMIT + 1)).decode()
    assert api.client.post("/samples", json={"samples": [{"image": big}]}).status_code == 413
    assert api.client.post("/samples", json={"samples": [{"image": "@@@"}]}).status_code == 422
    bomb = base64.b64encode(png_header_only(100_000, 100_000)).decode()
    r = api.client.post("/samples", json={"samples": [{"image": bomb}]})
    assert r.status_code == 422 and "samples[0]" in r.json()["detail"]
    assert api.client.post("/samples", content=b"{not json", headers={"content-type": "application/json"}).status_code == 422
    assert api.client.post("/samples", json={"samples": []}).status_code == 422
    assert api.client.post("/samples", json={"samples": [{"image": base64.b64encode(PNG).decode(), "label": "x" * 10_000}]}).status_code == 422


def test_nothing_was_a_server_error(api):
    assert api.proc.poll() is None
    metrics = api.client.get("/metrics").text
    assert 'status="5' not in metrics, [line for line in metrics.splitlines() if 'status="5' in line]
    with socket.create_connection(("127.0.0.1", api.port)) as sock:  # a client that hangs up mid-upload
        sock.sendall(b"POST /infer HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n" + b"x" * 10)
    assert api.client.get("/healthz").status_code == 200
    assert api.client.post("/infer", content=PNG, headers={"content-type": "image/png"}).status_code == 200
