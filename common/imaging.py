"""Image encoding off the model's path: a thread pool (Pillow releases the GIL
while encoding) that keeps job order and reports errors per job."""

from __future__ import annotations

import hashlib
import io
import struct
import time
import zlib
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from PIL import Image

from common import metrics
from common.messages import IMAGE_FORMATS

MAX_IMAGE_BYTES = 32 << 20  # refuse to decode anything larger


@dataclass(kw_only=True)
class Encoded:
    data: bytes | None
    format: str
    error: str | None = None
    seconds: float = 0.0
    digest: str = ""  # sha256 hex of data (blob references carry it)


class PngImage(bytes):
    """An image a model made already encoded as PNG (the profiled backend's placeholders, which it writes
    far cheaper than Pillow encodes them): asked for as PNG it passes through, another format decodes it."""


def png_palette(
    raw_rows: bytes, width: int, height: int, bit_depth: int, palette: list[tuple[int, int, int]]
) -> PngImage:
    """A palette PNG from its raw scanlines (each: filter byte 0, then the packed indices)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, 3, 0, 0, 0)  # colour type 3: palette
    colours = b"".join(bytes(c) for c in palette)
    return PngImage(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"PLTE", colours)
        + chunk(b"IDAT", zlib.compress(raw_rows, 1))
        + chunk(b"IEND", b"")
    )


def encode(image: Image.Image | PngImage, fmt: str = "png", quality: int = 90) -> bytes:
    if fmt not in IMAGE_FORMATS:
        raise ValueError(f"unsupported image format {fmt!r}; use one of {', '.join(IMAGE_FORMATS)}")
    if isinstance(image, PngImage):
        if fmt == "png":
            return bytes(image)
        image = decode(image)
    buf = io.BytesIO()
    if fmt == "png":
        image.save(buf, format="PNG", compress_level=1)  # level 6 costs more and saves little on noisy images
    else:
        image.convert("RGB").save(buf, format=fmt.upper(), quality=max(1, min(100, quality)))
    return buf.getvalue()


def decode(data: bytes) -> Image.Image:
    if len(data) > MAX_IMAGE_BYTES:
        raise ValueError("image too large")
    image = Image.open(io.BytesIO(data))
    image.load()
    return image.convert("RGB")


def thumbnail_rgb(image: Image.Image | PngImage, size: int) -> bytes:
    """Raw RGB8 bytes at size x size: what the discriminator consumes, no PNG decode needed."""
    if isinstance(image, PngImage):
        image = decode(image)
    return image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR).tobytes()


def from_thumbnail(data: bytes, size: int) -> Image.Image:
    if len(data) != size * size * 3:
        raise ValueError(f"thumbnail has {len(data)} bytes, expected {size}x{size}x3")
    return Image.frombytes("RGB", (size, size), data)


class EncoderPool:
    """Encodes a batch in parallel threads; results come back in job order.  ``fixed``: every image
    is this one, encoded once (the profiled backend's --image-kb: benchmarks measure transport)."""

    def __init__(self, threads: int = 4, fixed: Encoded | None = None):
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="encode")
        self.fixed = fixed

    def _one(self, image: Image.Image | PngImage, fmt: str, quality: int) -> Encoded:
        start = time.perf_counter()
        try:
            data = encode(image, fmt, quality)
        except Exception as exc:  # one bad request must not fail the batch
            return Encoded(data=None, format=fmt, error=f"{type(exc).__name__}: {exc}")
        sha = hashlib.sha256(data).hexdigest()  # here, off the event loop (hashlib releases the GIL)
        seconds = time.perf_counter() - start
        metrics.ENCODE_TIME.labels(fmt).observe(seconds)
        return Encoded(data=data, format=fmt, seconds=seconds, digest=sha)

    def submit(self, images: Sequence[Image.Image | PngImage], formats: list[tuple[str, int]]) -> list[Future[Encoded]]:
        """Start encoding; returns futures in job order (await with ``asyncio.wrap_future``)."""
        if self.fixed is not None:
            done: Future[Encoded] = Future()
            done.set_result(self.fixed)
            return [done] * len(images)
        return [self._pool.submit(self._one, img, fmt, q) for img, (fmt, q) in zip(images, formats, strict=False)]

    def encode_all(self, images: Sequence[Image.Image | PngImage], formats: list[tuple[str, int]]) -> list[Encoded]:
        return [f.result() for f in self.submit(images, formats)]

    def close(self) -> None:
        self._pool.shutdown(wait=True)
