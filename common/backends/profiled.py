"""The profiled backend: profiled timing, placeholder images, calibrated confidences.

It exists so the serving system can be load-tested at GPU-like timing on a CPU box; its
images are placeholders at the model's resolution that say which model made them, the seed
and the prompt (so the playground and the demo show the cascade at work), and results from
it are labelled as profiled.
"""

from __future__ import annotations

import functools
import hashlib
import io
import struct
import textwrap
import threading
import time
import zlib
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from common.backends import StepCallback
from common.imaging import Encoded, PngImage, png_palette
from common.profiles import ConfidenceCurve, LatencyTable, uniform_from_text

# Disk -> GPU and host -> GPU load times measured on the H100 (common/data/h100/README.md).
LOAD_SECONDS = {"disk": {"sdturbo": 2.78, "sdv15": 1.90}, "host": {"sdturbo": 0.42, "sdv15": 0.38}}
DEFAULT_LOAD_SECONDS = {"disk": 2.5, "host": 0.4}
_COLOURS = {"light": (120, 170, 220), "heavy": (220, 150, 90)}


def _sleep(seconds: float) -> None:
    if seconds > 0:
        time.sleep(seconds)


_FONT_LOCK = threading.Lock()
_FONT: ImageFont.ImageFont | None = None
# Each byte of packed 1-bit pixels with every bit doubled (a row scaled up 2x), as two big-endian bytes.
_DOUBLED = np.array([int("".join(bit * 2 for bit in f"{b:08b}"), 2) for b in range(256)], dtype=">u2")


def _font() -> ImageFont.ImageFont:
    global _FONT
    with _FONT_LOCK:
        if _FONT is None:
            _FONT = ImageFont.load_default_imagefont()  # Pillow's bitmap font: no FreeType
        return _FONT


def _draw(lines: tuple[str, ...], width: int) -> np.ndarray:
    """``lines`` drawn with the bitmap font on a 1-bit band ``width`` px wide, 12 px a line: its rows of
    packed bits."""
    band = Image.new("1", (width, 12 * len(lines)), 0)
    draw = ImageDraw.Draw(band)
    for i, line in enumerate(lines):  # the bitmap font has latin-1 glyphs only
        draw.text((8, 12 * i), line.encode("latin-1", "replace").decode("latin-1"), font=_font(), fill=1)
    bits = np.frombuffer(band.tobytes(), dtype=np.uint8).reshape(band.height, -1)
    bits.flags.writeable = False
    return bits


# Cached: load tests replay the same prompts on the same models (a seed is drawn every time instead:
# random seeds would only push the prompts out).
@functools.lru_cache(maxsize=4096)
def _prompt_bits(prompt: str, width: int) -> np.ndarray:
    columns = max(8, (width - 16) // 6)  # the bitmap font is 6 px a character
    return _draw(tuple(textwrap.wrap(prompt, columns, max_lines=max(1, (width - 80) // 12), placeholder="...")), width)


@functools.lru_cache(maxsize=64)
def _header_bits(role: str, model: str, width: int) -> tuple[np.ndarray, np.ndarray]:
    return _draw((f"{role}: {model}",), width), _draw(("placeholder (profiled)", ""), width)


def placeholder(role: str, model: str, prompt: str, seed: int, size: int) -> PngImage:
    """A flat ``size`` x ``size`` PNG that names the model and shows the seed and the prompt.

    Cheap at high rates: the text is drawn at half size with a bitmap font into 1-bit bands (the model's
    and the prompt's cached), scaled up 2x in their packed bits, and written as a two-colour palette PNG
    (1 bit a pixel, a few KiB) without Pillow's encoder, which costs ~0.5 ms per 512-px image."""
    half = max(16, size // 2)
    title, note = _header_bits(role, model, half)
    packed = np.vstack(
        [
            np.zeros((8, (half + 7) // 8), dtype=np.uint8),  # top margin
            title,
            _draw((f"seed {seed}",), half),
            note,
            _prompt_bits(prompt, half),
        ]
    )[:half]
    stride = (size + 7) // 8
    doubled = _DOUBLED[packed].view(np.uint8).reshape(packed.shape[0], -1)[:, :stride]
    rows = np.zeros((size, stride + 1), dtype=np.uint8)  # filter byte 0, then the row's bits
    rows[: 2 * packed.shape[0], 1 : 1 + doubled.shape[1]] = np.repeat(doubled, 2, axis=0)[:size]
    return png_palette(rows.tobytes(), size, size, 1, [_COLOURS.get(role, (128, 128, 128)), (30, 30, 30)])


class ProfiledModel:
    backend = "profiled"

    def __init__(
        self,
        name: str,
        role: str,
        table: LatencyTable,
        time_scale: float,
        resolution: int,
        steps: int,
        image_kb: int = 0,
    ):
        self.name, self.role, self.table, self.time_scale = name, role, table, time_scale
        self.resolution, self.steps = resolution, steps
        # --image-kb: every image is the one made once (no placeholder drawn per job only to be replaced)
        self.fixed = PngImage(fixed_image(image_kb).data or b"") if image_kb > 0 else None

    def load(self, source: str = "disk") -> float:
        seconds = LOAD_SECONDS[source].get(self.name, DEFAULT_LOAD_SECONDS[source]) * self.time_scale
        _sleep(seconds)
        return seconds

    def offload(self) -> None:
        pass

    def stage(self) -> float:
        return self.load("disk")  # the disk read, in the caller's background thread

    def unload(self) -> None:
        pass

    def generate(
        self,
        prompts: list[str],
        seeds: list[int],
        *,
        negative_prompts: Sequence[str | None] | None = None,
        on_step: StepCallback | None = None,
    ) -> list[PngImage]:
        """Sleeps the profiled batch time; with ``on_step``, in one slice per denoising step (so
        progress and an interrupt behave as with a real pipeline)."""
        seconds = self.table.latency_ms(len(prompts)) * self.time_scale / 1000
        if on_step is None or seconds <= 0:  # nothing to report or to stop between steps
            _sleep(seconds)
        else:
            end = time.monotonic()
            for step in range(1, self.steps + 1):
                end += seconds / self.steps
                _sleep(end - time.monotonic())
                on_step(step, self.steps)  # raises Interrupted to stop the batch
        if self.fixed is not None:
            return [self.fixed] * len(prompts)
        return [placeholder(self.role, self.name, p, s, self.resolution) for p, s in zip(prompts, seeds, strict=False)]


@functools.lru_cache(maxsize=4)  # the model and the worker's encoder share the one image
def fixed_image(kib: int, seed: int = 0) -> Encoded:
    """A valid PNG of exactly ``kib`` KiB (noise, which does not compress, padded with a private chunk),
    made once: the profiled backend's ``--image-kb`` images, so benchmarks measure moving them, not encoding."""
    target = kib * 1024
    side = max(1, int((target / 3) ** 0.5))
    rng = np.random.default_rng(seed)
    while True:
        pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
        png = buf.getvalue()
        if len(png) + 12 <= target or side == 1:
            break
        side -= max(1, side // 50)
    if len(png) + 12 <= target:
        pad = target - len(png) - 12
        chunk = b"dsPd" + b"\0" * pad  # ancillary, private (lower-case first letters): decoders skip it
        png = png[:-12] + struct.pack(">I", pad) + chunk + struct.pack(">I", zlib.crc32(chunk)) + png[-12:]
    return Encoded(data=png, format="png", digest=hashlib.sha256(png).hexdigest())


def confidences_by_text(overrides: dict[int, float], prompts: list[str]) -> dict[str, float]:
    """{prompt text: the confidence recorded for its first line}, for jobs that carry no line."""
    by_text: dict[str, float] = {}
    for index in sorted(overrides):
        if index < len(prompts) and prompts[index]:
            by_text.setdefault(prompts[index], overrides[index])
    return by_text


def load_confidence_overrides(confidence_file: str) -> dict[int, float]:
    """``prompt_index,confidence`` lines -> {prompt index (line of the prompt file): confidence}."""
    overrides = {}
    with open(confidence_file, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line or line.startswith("#") or line.startswith("prompt_index"):
                continue
            try:
                index, confidence = line.split(",")[:2]
                overrides[int(index)] = float(confidence)
            except ValueError:
                raise ValueError(
                    f"{confidence_file}:{lineno}: expected `prompt_index,confidence`, got {line!r}"
                ) from None
    return overrides


class ProfiledDiscriminator:
    backend = "profiled"
    input_size = 0  # takes no thumbnail

    def __init__(
        self,
        table: LatencyTable,
        curve: ConfidenceCurve,
        time_scale: float,
        overrides: dict[int, float] | None = None,
        by_text: dict[str, float] | None = None,
    ):
        self.table, self.curve, self.time_scale = table, curve, time_scale
        self.overrides = overrides or {}
        self.by_text = by_text or {}

    def load(self) -> float:
        return 0.0

    def confidence(self, prompt: str, prompt_index: int | None = None) -> float:
        """The recorded confidence of the query's own line when it carries one; for a job without a
        line (live traffic), the one recorded for its text's first line; else a draw from f(t) that is
        the same for the same text.  The simulator calls this too."""
        if prompt_index is not None:
            if prompt_index in self.overrides:
                return self.overrides[prompt_index]
        elif prompt in self.by_text:
            return self.by_text[prompt]
        return self.curve.confidence_for(uniform_from_text(prompt))

    def score(
        self,
        prompts: list[str],
        images: Sequence[Image.Image | None],
        prompt_indices: list[int | None] | None = None,
    ) -> list[float]:
        _sleep(self.table.latency_ms(len(prompts)) * self.time_scale / 1000)
        indices = prompt_indices or [None] * len(prompts)
        return [self.confidence(p, i) for p, i in zip(prompts, indices, strict=False)]
