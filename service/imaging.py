"""Image encoding in the API process (Pillow, off the GPU worker)."""

from __future__ import annotations

import base64
import io
import zlib
from typing import NamedTuple

from PIL import Image

MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
DEFAULT_QUALITY = 90
ZLIB_STRATEGIES = {"default": zlib.Z_DEFAULT_STRATEGY, "rle": zlib.Z_RLE, "huffman": zlib.Z_HUFFMAN_ONLY}


class PngParams(NamedTuple):
    """zlib level and strategy of PNG output (service settings ``png_compress_level``, ``png_strategy``)."""

    level: int = 1
    strategy: str = "rle"


DEFAULT_PNG = PngParams()


def encode(rgb: bytes, width: int, height: int, fmt: str, quality: int | None = None,
           png: PngParams = DEFAULT_PNG) -> bytes:
    """Raw uint8 RGB (height, width, 3) -> png/jpeg/webp bytes; quality applies to jpeg/webp."""
    img = Image.frombytes("RGB", (width, height), rgb)
    buf = io.BytesIO()
    q = DEFAULT_QUALITY if quality is None else max(1, min(100, quality))
    if fmt == "png":
        img.save(buf, format="PNG", compress_level=png.level, compress_type=ZLIB_STRATEGIES[png.strategy])
    elif fmt == "jpeg":
        img.save(buf, format="JPEG", quality=q)
    elif fmt == "webp":
        img.save(buf, format="WEBP", quality=q)
    else:
        raise ValueError(f"unknown output_format {fmt!r}")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
