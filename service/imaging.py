"""Image encoding in the API process (PNG written here or by Pillow; JPEG and WebP by Pillow), off the GPU worker."""

from __future__ import annotations

import asyncio
import io
import os
import struct
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, NamedTuple, TypeVar

import numpy as np
from PIL import Image
from zlib_ng import zlib_ng

T = TypeVar("T")
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
DEFAULT_QUALITY = 90
ZLIB_STRATEGIES = {"default": zlib.Z_DEFAULT_STRATEGY, "rle": zlib.Z_RLE, "huffman": zlib.Z_HUFFMAN_ONLY}
# A response's images are encoded side by side from this size on: zlib, numpy and Pillow's JPEG and
# WebP encoders release the GIL (4 x 1024 px PNG 145 -> 73 ms, WebP 663 -> 355 ms on 2 cores).
PARALLEL_MIN_PIXELS = 256 * 256
_POOL = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="ldserve-encode")
PNG_SAMPLE_BYTES = 6144  # rows sampled to judge compressibility: their ratio came within 0.02 of the image's
PNG_SLICE_BYTES = 64 * 1024  # filtered rows deflated per task, at least (UpPng): 128 px one slice, 256 px two
PNG_SLICES = min(4, os.cpu_count() or 1)


class PngParams(NamedTuple):
    """How PNG output is written (service settings ``png_compress_level``, ``png_strategy``,
    ``png_stored_ratio``, ``png_filter``).

    ``filter``: ``up`` (every row minus the row above, one numpy subtraction, then zlib here) or
    ``adaptive`` (Pillow, which tries the five PNG filters on every row and keeps the one with the
    smallest sum). Pillow's row filtering alone took 4 ms of a 256 px image's 8-9 ms and ~60 ms of a
    1024 px photo's 111 ms on the 2-core dev host; ``up`` (with zlib-ng) encoded them in 1.6-2.4 and
    35 ms into files 11 % and 18 % larger (service README).

    ``stored_ratio``: when evenly spaced rows (~6 KiB) encoded with ``level``/``strategy`` still take
    at least this fraction of their stored size, the image is written unfiltered into stored deflate
    blocks instead, at most ~1/0.9 the bytes. Uniform noise does not compress at all, yet filtering
    and deflate took 3-7 ms for 256 px, the check and stored write 0.5-1 ms (the random-weight test
    models' images do compress, to ~0.73-0.81). 0 disables the check."""

    level: int = 1
    strategy: str = "rle"
    stored_ratio: float = 0.9
    filter: str = "up"


DEFAULT_PNG = PngParams()


def encode(rgb: bytes, width: int, height: int, fmt: str, quality: int | None = None,
           png: PngParams = DEFAULT_PNG) -> bytes:
    """Raw uint8 RGB (height, width, 3) -> png/jpeg/webp bytes; quality applies to jpeg/webp."""
    return encode_all([rgb], width, height, fmt, quality, png)[0]


def _encode_one(rgb: bytes, width: int, height: int, fmt: str, quality: int | None, png: PngParams) -> bytes:
    if fmt == "png":
        return _png(rgb, width, height, png)
    if fmt not in ("jpeg", "webp"):
        raise ValueError(f"unknown output_format {fmt!r}")
    buf = io.BytesIO()
    q = DEFAULT_QUALITY if quality is None else max(1, min(100, quality))
    Image.frombytes("RGB", (width, height), rgb).save(buf, format=fmt.upper(), quality=q)
    return buf.getvalue()


def encode_all(raws: list[bytes], width: int, height: int, fmt: str, quality: int | None = None,
                png: PngParams = DEFAULT_PNG) -> list[bytes]:
    """``encode`` for each image of a response, in order. PNG with the Up filter: every image's rows
    are filtered and deflated in slices side by side (``UpPng``); other encodings: several large
    images side by side. The calling thread runs one of the tasks and the shared pool the rest (at
    most 4 threads, whatever the number of concurrent requests); it must not be a pool thread."""
    if fmt == "png" and png.filter == "up":
        pngs = [_up_png(raw, width, height, png) for raw in raws]
        _side_by_side([partial(p.run, i) for p in pngs if isinstance(p, UpPng) for i in range(p.slices)])
        return [p if isinstance(p, bytes) else p.file() for p in pngs]
    if len(raws) < 2 or width * height < PARALLEL_MIN_PIXELS:
        return [_encode_one(raw, width, height, fmt, quality, png) for raw in raws]
    return list(_POOL.map(lambda raw: _encode_one(raw, width, height, fmt, quality, png), raws))


def _side_by_side(tasks: list[Callable[[], None]]) -> None:
    """Run the tasks: the first on this thread, the others on the pool meanwhile; re-raises the
    first error once all have ended."""
    futures = [_POOL.submit(t) for t in tasks[1:]]
    try:
        if tasks:
            tasks[0]()
    finally:
        for f in futures:
            f.exception()
    for f in futures:
        f.result()


# Up to this many pixels per response are encoded on the event loop (a 128 px demo picture: ~1 ms
# as PNG at level 1); a thread handoff costs about as much on a busy 2-core host. Larger ones go
# to a thread so one big PNG does not stall every other request.
INLINE_ENCODE_PIXELS = 128 * 128


async def run_encode(pixels: int, fn: Callable[..., T], *args: Any) -> T:
    """In the API's event loop: ``fn(*args)`` inline for at most INLINE_ENCODE_PIXELS pixels, else
    in a thread."""
    if pixels <= INLINE_ENCODE_PIXELS:
        return fn(*args)
    return await asyncio.to_thread(fn, *args)


def _pillow_png(rgb: bytes, width: int, height: int, png: PngParams) -> bytes:
    buf = io.BytesIO()
    Image.frombytes("RGB", (width, height), rgb).save(
        buf, format="PNG", compress_level=png.level, compress_type=ZLIB_STRATEGIES[png.strategy])
    return buf.getvalue()


def _png(rgb: bytes, width: int, height: int, png: PngParams) -> bytes:
    """PNG by Pillow's adaptive filters (``encode_all`` writes the Up filter itself)."""
    if png.filter != "adaptive":
        raise ValueError(f"unknown PNG filter {png.filter!r}")
    return _adaptive_png(rgb, width, height, png)


def _sample_rows(rows: bytes | memoryview, height: int, stride: int) -> tuple[bytes, int]:
    """About PNG_SAMPLE_BYTES of evenly spaced rows of ``stride`` bytes: (their bytes, how many)."""
    k = max(1, min(height, PNG_SAMPLE_BYTES // stride))
    return b"".join(rows[i * height // k * stride:(i * height // k + 1) * stride] for i in range(k)), k


def _deflate(data: bytes | memoryview, png: PngParams, wbits: int = 15, flush: int = zlib.Z_FINISH) -> bytes:
    """zlib-ng: the same deflate format as zlib; the rle strategy gives zlib's bytes at about twice
    its speed (256 px Up-filtered rows 2.6 -> 1.3 ms, 1024 px 43.6 -> 33 ms on the dev host).
    ``wbits`` -15 and ``flush`` Z_SYNC_FLUSH: a raw deflate slice that another can follow."""
    z = zlib_ng.compressobj(png.level, zlib_ng.DEFLATED, wbits, 9, ZLIB_STRATEGIES[png.strategy])
    return z.compress(data) + z.flush(flush)


def _adler32_concat(adler_a: int, adler_b: int, len_b: int) -> int:
    """Adler-32 of A + B from those of A and B (B's taken from the initial value 1): the sum after A
    continues by B's bytes (``a_b - 1``), and every byte of B adds A's running sum once more."""
    a = ((adler_a & 0xFFFF) + (adler_b & 0xFFFF) - 1) % 65521
    b = ((adler_a >> 16) + (adler_b >> 16) + len_b * ((adler_a & 0xFFFF) - 1)) % 65521
    return (b << 16) | a


def _zlib_header(level: int, strategy: str) -> bytes:
    """CMF/FLG of a zlib stream with a 32 KiB window; FLEVEL as zlib writes it (informational)."""
    flevel = 0 if level < 2 or strategy != "default" else 1 if level < 6 else 2 if level == 6 else 3
    head = 0x7800 | flevel << 6
    return struct.pack(">H", head + 31 - head % 31)


class UpPng:
    """One image's PNG with filter type 2 (Up) on every row (the first row against zeros is the row
    itself), built from ``slices`` runs of rows: each filtered and deflated on its own (``run``, any
    thread: numpy and zlib-ng release the GIL) into a raw deflate slice ended by a sync flush, the
    last by the final block, as pigz does; ``file`` joins them into one zlib stream with the Adler-32
    of all rows. The slices share no history: with rle, whose matches reach one pixel back, that cost
    7 bytes of a 256 px image's 160 KB (two slices). On the 2-core dev host, one slice -> two: a 1024
    px photo 19.5-30 -> 11.6-17.6 ms, the tiny-2b model's 256 px image 1.4-2.2 -> 1.3-1.5 ms."""

    def __init__(self, a_HS: np.ndarray, png: PngParams, slices: int) -> None:
        height, stride = a_HS.shape
        self.a_HS, self.png, self.slices = a_HS, png, slices
        self.rows_HS = np.empty((height, stride + 1), np.uint8)
        self.cuts = [i * height // slices for i in range(slices + 1)]
        self.parts: list[tuple[bytes, int, int] | None] = [None] * slices

    def run(self, i: int) -> None:
        r0, r1 = self.cuts[i], self.cuts[i + 1]
        a, rows = self.a_HS, self.rows_HS[r0:r1]
        rows[:, 0] = 2
        if r0 == 0:
            rows[0, 1:] = a[0]
        first = 1 if r0 == 0 else 0
        np.subtract(a[r0 + first:r1], a[r0 + first - 1:r1 - 1], out=rows[first:, 1:])  # uint8 wraps mod 256
        data = memoryview(rows).cast("B")
        last = i == self.slices - 1
        self.parts[i] = (_deflate(data, self.png, -15, zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH),
                         zlib.adler32(data), len(data))

    def file(self) -> bytes:
        adler, stream = 1, [_zlib_header(self.png.level, self.png.strategy)]
        for part in self.parts:
            assert part is not None, "UpPng.file before every slice ran"
            data, part_adler, n = part
            stream.append(data)
            adler = _adler32_concat(adler, part_adler, n)
        stream.append(struct.pack(">I", adler))
        height, stride = self.a_HS.shape
        return _png_file(stride // 3, height, stream)


def _up_png(rgb: bytes, width: int, height: int, png: PngParams) -> UpPng | bytes:
    """The image's ``UpPng`` (one slice per PNG_SLICE_BYTES of rows, up to PNG_SLICES), or its
    stored PNG when a sample of the filtered rows does not shrink below ``png.stored_ratio``."""
    stride = width * 3
    a_HS = np.frombuffer(rgb, np.uint8, height * stride).reshape(height, stride)
    if png.stored_ratio > 0 and height > 1:
        k = max(1, min(height, PNG_SAMPLE_BYTES // (stride + 1)))
        idx = np.array([i * height // k for i in range(k)])
        sample_KS = np.empty((k, stride + 1), np.uint8)
        sample_KS[:, 0] = 2
        np.subtract(a_HS[idx], a_HS[np.maximum(idx - 1, 0)], out=sample_KS[:, 1:])
        sample_KS[idx == 0, 1:] = a_HS[0]
        if len(_deflate(memoryview(sample_KS).cast("B"), png)) >= png.stored_ratio * sample_KS.size:
            return stored_png(rgb, width, height)
    slices = max(1, min(PNG_SLICES, height, -(-height * (stride + 1) // PNG_SLICE_BYTES)))
    return UpPng(a_HS, png, slices)


def _adaptive_png(rgb: bytes, width: int, height: int, png: PngParams) -> bytes:
    """Pillow's encoding, or stored when a sample of rows shows it would not shrink below
    ``png.stored_ratio`` of stored. Raw zlib level 1 on the sample (~0.01 ms where it shrinks: flat
    areas, repeats) settles drawn images before Pillow encodes it (~0.14 ms), as photos' raw bytes
    barely shrink without PNG's filters (0.88 vs 0.52 encoded)."""
    if png.stored_ratio <= 0:
        return _pillow_png(rgb, width, height, png)
    stride = width * 3
    sample, k = _sample_rows(rgb, height, stride)
    limit = png.stored_ratio * k * (stride + 1)
    if len(zlib.compress(sample, 1)) < limit:
        return _pillow_png(rgb, width, height, png)
    data = _pillow_png(sample, width, k, png)
    if len(data) < limit:
        return data if k == height else _pillow_png(rgb, width, height, png)
    return stored_png(rgb, width, height)


def _chunk(kind: bytes, *parts: bytes | memoryview) -> list[bytes | memoryview]:
    crc = zlib.crc32(kind)
    for part in parts:
        crc = zlib.crc32(part, crc)
    return [struct.pack(">I", sum(map(len, parts))), kind, *parts, struct.pack(">I", crc)]


def stored_png(rgb: bytes, width: int, height: int) -> bytes:
    """8-bit RGB PNG, filter type 0 on every row, deflate stored blocks: raw size + a byte a row +
    ~70 B. The zlib stream is framed here and the rows copied twice in all: 0.19 ms for 256 px noise,
    where ``zlib.compress(level=0)`` and per-row copies (fresh buffers fault their pages in) took
    0.6-0.9 ms."""
    stride = width * 3
    pixels = memoryview(rgb)
    rows = memoryview(b"\0".join([b"", *(pixels[i:i + stride] for i in range(0, height * stride, stride))]))
    stream: list[bytes | memoryview] = [b"\x78\x01"]  # zlib header: deflate, 32 KiB window
    for i in range(0, len(rows), 0xFFFF):
        block = rows[i:i + 0xFFFF]
        stream += [struct.pack("<BHH", i + 0xFFFF >= len(rows), len(block), 0xFFFF ^ len(block)), block]
    stream.append(struct.pack(">I", zlib.adler32(rows)))
    return _png_file(width, height, stream)


def _png_file(width: int, height: int, idat: list[bytes | memoryview]) -> bytes:
    """8-bit RGB PNG around a zlib stream given in parts."""
    return b"".join([b"\x89PNG\r\n\x1a\n", *_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)),
                     *_chunk(b"IDAT", *idat), *_chunk(b"IEND")])

