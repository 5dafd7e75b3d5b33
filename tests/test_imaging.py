"""common.imaging: the encoder pool (order, per-job errors, formats, quality) and thumbnails."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from common.imaging import EncoderPool, decode, encode, from_thumbnail, thumbnail_rgb

MAGIC = {"png": b"\x89PNG\r\n\x1a\n", "jpeg": b"\xff\xd8\xff"}


def _noise(seed: int, size: int = 48) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def _is_format(data: bytes, fmt: str) -> bool:
    if fmt == "webp":
        return data[:4] == b"RIFF" and data[8:12] == b"WEBP"
    return data.startswith(MAGIC[fmt])


@pytest.fixture
def pool():
    p = EncoderPool(threads=3)
    yield p
    p.close()


def test_pool_keeps_job_order(pool):
    images = [Image.new("RGB", (8 + i, 8 + i), (i * 20, 0, 0)) for i in range(8)]
    results = pool.encode_all(images, [("png", 90)] * len(images))
    assert [r.error for r in results] == [None] * 8
    assert [decode(r.data).size for r in results] == [img.size for img in images]
    assert [decode(r.data).getpixel((0, 0)) for r in results] == [img.getpixel((0, 0)) for img in images]


def test_pool_honours_each_requested_format(pool):
    formats = [("png", 90), ("webp", 90), ("jpeg", 90), ("png", 50)]
    results = pool.encode_all([_noise(i) for i in range(4)], formats)
    for result, (fmt, _q) in zip(results, formats, strict=False):
        assert result.error is None and result.format == fmt
        assert _is_format(result.data, fmt), fmt
        assert result.seconds >= 0


def test_pool_reports_errors_per_job(pool):
    images = [_noise(0), _noise(1), _noise(2)]
    results = pool.encode_all(images, [("png", 90), ("gif", 90), ("jpeg", 80)])
    assert results[0].error is None and _is_format(results[0].data, "png")
    assert results[1].data is None and "gif" in results[1].error and "ValueError" in results[1].error
    assert results[2].error is None and _is_format(results[2].data, "jpeg")


def test_quality_changes_lossy_size(pool):
    image = _noise(3, 96)
    low, high = pool.encode_all([image, image], [("jpeg", 10), ("jpeg", 95)])
    assert len(low.data) < len(high.data)
    low_w, high_w = pool.encode_all([image, image], [("webp", 10), ("webp", 95)])
    assert len(low_w.data) < len(high_w.data)
    # out-of-range quality is clamped, not an error
    clamped = pool.encode_all([image], [("jpeg", 500)])[0]
    assert clamped.error is None and _is_format(clamped.data, "jpeg")


def test_png_is_lossless():
    image = _noise(4)
    assert np.array_equal(np.asarray(decode(encode(image, "png"))), np.asarray(image))


def test_submit_returns_futures_in_order(pool):
    futures = pool.submit([_noise(5), _noise(6)], [("png", 90), ("webp", 80)])
    assert [f.result().format for f in futures] == ["png", "webp"]


def test_thumbnail_round_trip():
    image = _noise(7, 64)
    data = thumbnail_rgb(image, 16)
    assert len(data) == 16 * 16 * 3
    thumb = from_thumbnail(data, 16)
    assert thumb.size == (16, 16) and thumb.mode == "RGB"
    assert thumb.tobytes() == data
    assert np.array_equal(np.asarray(thumb), np.asarray(image.resize((16, 16), Image.BILINEAR)))
    # RGBA input is converted; a wrong length is refused
    assert len(thumbnail_rgb(image.convert("RGBA"), 8)) == 8 * 8 * 3
    with pytest.raises(ValueError):
        from_thumbnail(data[:-1], 16)


def test_decode_refuses_garbage():
    with pytest.raises(OSError):  # PIL.UnidentifiedImageError
        decode(b"not an image")
    buf = io.BytesIO()
    _noise(8).save(buf, format="PNG")
    assert decode(buf.getvalue()).mode == "RGB"


def test_the_profiled_placeholder_is_a_png_at_the_models_size_showing_model_seed_and_prompt():
    from common.backends.profiled import placeholder
    from common.imaging import PngImage

    png = placeholder("heavy", "sdv15", "a lighthouse at dusk", 42, 512)
    assert isinstance(png, PngImage) and len(png) < 8 << 10
    image = decode(png)
    assert image.size == (512, 512) and image.getpixel((511, 511)) == (220, 150, 90)  # the heavy colour
    colours = dict((c, n) for n, c in image.getcolors())
    assert set(colours) == {(220, 150, 90), (30, 30, 30)} and colours[(30, 30, 30)] > 500  # text is drawn
    assert placeholder("heavy", "sdv15", "a lighthouse at dusk", 42, 512) == png  # same seed, same bytes
    assert placeholder("heavy", "sdv15", "a lighthouse at dusk", 43, 512) != png
    assert placeholder("light", "sdturbo", "a lighthouse at dusk", 42, 512) != png
    assert encode(png, "png") == bytes(png)  # passes through
    for fmt in ("jpeg", "webp"):
        assert decode(encode(png, fmt, 80)).size == (512, 512)
    assert decode(placeholder("light", "sdturbo", "é 中文 " * 200, 1, 1024)).size == (1024, 1024)
