"""PNG output: incompressible images go stored (unfiltered, deflate level 0), the rest filtered (Up, or
Pillow's adaptive choice) and deflated."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageDraw
from pydantic import ValidationError

from service import imaging
from service.imaging import PngParams, encode, stored_png
from service.settings import ServiceSettings


def noise(h: int, w: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)


def shapes() -> np.ndarray:
    im = Image.new("RGB", (128, 96), (240, 240, 230))
    draw = ImageDraw.Draw(im)
    draw.ellipse((10, 10, 70, 60), fill=(200, 30, 30))
    draw.rectangle((50, 40, 120, 90), fill=(30, 90, 200))
    return np.asarray(im)


def photo() -> np.ndarray:
    """Smooth gradients plus mild noise: its raw bytes barely shrink in zlib, PNG's filters halve them."""
    y, x = np.mgrid[0:256, 0:256] / 256
    rgb = np.stack([128 + 100 * np.sin(3 * x + 2 * y), 128 + 90 * np.cos(4 * y - x), 128 + 80 * np.sin(5 * x * y)], -1)
    return np.clip(rgb + np.random.default_rng(1).normal(0, 3, rgb.shape), 0, 255).astype(np.uint8)


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def idat(data: bytes) -> bytes:
    """The decompressed image stream (zlib checks its adler32), after checking every chunk's CRC."""
    pos, out = 8, b""
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        assert struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])[0] == zlib.crc32(kind + body)
        out += body if kind == b"IDAT" else b""
        pos += 12 + n
    return zlib.decompress(out)


IMAGES = {"noise": lambda: noise(256, 256), "shapes": shapes, "photo": photo, "photo strip": lambda: photo()[:8]}


@pytest.mark.parametrize("png_filter", ["up", "adaptive"])
@pytest.mark.parametrize("name", list(IMAGES))
def test_png_is_lossless_and_stored_only_when_incompressible(name: str, png_filter: str) -> None:
    """The 8-row photo strip is all sample (adaptive: the sample's own encoding is returned)."""
    rgb = IMAGES[name]()
    h, w, _ = rgb.shape
    data = encode(rgb.tobytes(), w, h, "png", png=PngParams(filter=png_filter))
    assert np.array_equal(decode(data), rgb)
    if name == "noise":
        assert data == stored_png(rgb.tobytes(), w, h) and len(data) < rgb.size + 400
        return
    # compressed; the photo's raw rows alone would not shrink below 0.9
    assert len(data) < rgb.size * (0.05 if name == "shapes" else 0.7)
    filters = set(idat(data)[::w * 3 + 1])
    assert filters == {2} if png_filter == "up" else filters != {0}


@pytest.mark.parametrize("slices", [1, 2, 5])
@pytest.mark.parametrize(("h", "w"), [(1, 1), (1, 40), (7, 5), (300, 257), (3, 21845)])
def test_up_filter_rows(h: int, w: int, slices: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every row is itself minus the row above (mod 256), the first against zeros; decoders agree;
    whether the rows were filtered and deflated in one slice or several (up to one per row: the
    slices' Adler-32s combine into the one zlib checks)."""
    monkeypatch.setattr(imaging, "PNG_SLICES", slices)
    monkeypatch.setattr(imaging, "PNG_SLICE_BYTES", 1)
    rgb = np.ascontiguousarray(np.tile(photo(), (h // 256 + 1, w // 256 + 1, 1))[:h, :w])
    data = encode(rgb.tobytes(), w, h, "png", png=PngParams(stored_ratio=0))
    above = np.concatenate([np.zeros((1, w, 3), np.uint8), rgb[:-1]])
    assert idat(data) == b"".join(b"\2" + (rgb[y] - above[y]).tobytes() for y in range(h))
    assert np.array_equal(decode(data), rgb)


def test_slices_cost_next_to_nothing_and_the_default_splits_large_images(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every slice restarts deflate's history (rle: one pixel) and ends in a sync flush."""
    rgb = photo()
    monkeypatch.setattr(imaging, "PNG_SLICES", 1)
    one = encode(rgb.tobytes(), 256, 256, "png")
    monkeypatch.setattr(imaging, "PNG_SLICES", 4)
    four = encode(rgb.tobytes(), 256, 256, "png")
    assert one != four and np.array_equal(decode(four), rgb) and len(four) < len(one) * 1.002
    plan = imaging._up_png(rgb.tobytes(), 256, 256, imaging.DEFAULT_PNG)
    assert isinstance(plan, imaging.UpPng) and plan.slices == 4  # 197 KB of rows: 3 slices of 64 KiB, capped at 4
    small = imaging._up_png(shapes().tobytes(), 128, 96, imaging.DEFAULT_PNG)
    assert isinstance(small, imaging.UpPng) and small.slices == 1


@pytest.mark.parametrize("split", [0, 1, 65520, 65521, 65522, 200_000, 299_999, 300_000])
def test_adler32_of_a_concatenation(split: int) -> None:
    data = np.random.default_rng(split).integers(0, 256, 300_000, dtype=np.uint8).tobytes()
    a, b = data[:split], data[split:]
    assert imaging._adler32_concat(zlib.adler32(a), zlib.adler32(b), len(b)) == zlib.adler32(data)


def test_a_failing_slice_fails_the_encode(monkeypatch: pytest.MonkeyPatch) -> None:
    """An error on a pool thread reaches the caller, after every other slice has ended."""
    ran: list[int] = []
    real = imaging.UpPng.run

    def run(self: imaging.UpPng, i: int) -> None:
        ran.append(i)
        if i == 2:
            raise MemoryError("slice 2")
        real(self, i)

    monkeypatch.setattr(imaging.UpPng, "run", run)
    monkeypatch.setattr(imaging, "PNG_SLICES", 4)
    with pytest.raises(MemoryError, match="slice 2"):
        encode(photo().tobytes(), 256, 256, "png")
    assert sorted(ran) == [0, 1, 2, 3]


def test_up_filter_beats_stored_on_a_smooth_photo_and_adaptive_is_smaller() -> None:
    """What the setting trades: both compress the photo; Pillow's per-row choice into fewer bytes."""
    rgb = photo()
    up = encode(rgb.tobytes(), 256, 256, "png", png=PngParams(filter="up"))
    adaptive = encode(rgb.tobytes(), 256, 256, "png", png=PngParams(filter="adaptive"))
    assert len(adaptive) < len(up) < 0.7 * rgb.size


def test_unknown_png_filter_is_refused() -> None:
    with pytest.raises(ValueError, match="PNG filter"):
        encode(shapes().tobytes(), 128, 96, "png", png=PngParams(filter="paeth"))


def test_stored_ratio_zero_always_runs_pillow() -> None:
    rgb = noise(64, 80)
    data = encode(rgb.tobytes(), 80, 64, "png", png=PngParams(1, "rle", 0, "adaptive"))
    assert np.array_equal(decode(data), rgb) and data != stored_png(rgb.tobytes(), 80, 64)
    assert set(idat(data)[::80 * 3 + 1]) != {0}  # Pillow filtered the rows


@pytest.mark.parametrize(("h", "w"), [(1, 1), (7, 5), (300, 257), (2, 21845)])
def test_stored_png_framing(h: int, w: int) -> None:
    """Several stored blocks (> 64 KiB), a block boundary inside a row, and rows of 64 KiB."""
    rgb = noise(h, w)
    data = stored_png(rgb.tobytes(), w, h)
    rows = idat(data)
    assert rows == b"".join(b"\0" + rgb[y].tobytes() for y in range(h))
    assert np.array_equal(decode(data), rgb)


def test_png_stored_ratio_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ServiceSettings().png == PngParams(1, "rle", 0.9, "up")
    monkeypatch.setenv("LDSERVE_PNG_STORED_RATIO", "0")
    monkeypatch.setenv("LDSERVE_PNG_FILTER", "adaptive")
    assert ServiceSettings().png == PngParams(1, "rle", 0, "adaptive")
    monkeypatch.setenv("LDSERVE_PNG_FILTER", "paeth")
    with pytest.raises(ValidationError):
        ServiceSettings()
    monkeypatch.delenv("LDSERVE_PNG_FILTER")
    with pytest.raises(ValidationError):
        ServiceSettings(png_stored_ratio=1.5)


@pytest.mark.parametrize("fmt", ["png", "webp"])
def test_encode_all_keeps_each_image_in_its_place(fmt: str) -> None:
    """Large images go through the thread pool: every file is its own image's, in order (webp: lossy,
    so each decodes nearest to its own source)."""
    from service.imaging import PARALLEL_MIN_PIXELS, encode_all

    h = w = 256
    assert h * w >= PARALLEL_MIN_PIXELS
    images = [np.roll(photo(), 40 * k, axis=1) for k in range(4)]
    files = encode_all([im.tobytes() for im in images], w, h, fmt)
    assert files == [encode(im.tobytes(), w, h, fmt) for im in images]
    for k, data in enumerate(files):
        err = [np.abs(decode(data).astype(int) - im.astype(int)).mean() for im in images]
        assert int(np.argmin(err)) == k and (fmt != "png" or err[k] == 0)
