"""The profiled backend: profiled timing, placeholder images, calibrated confidences.

It exists so the serving system can be load-tested at GPU-like timing on a CPU box;
its images are flat placeholders, and results from it are labelled as profiled.
"""

from __future__ import annotations

import hashlib
import io
import struct
import time
import zlib
from collections.abc import Sequence

import numpy as np
from PIL import Image

from common.imaging import Encoded

from common.profiles import ConfidenceCurve, LatencyTable, uniform_from_text

# Disk -> GPU and host -> GPU load times measured on the H100 (common/data/h100/README.md).
LOAD_SECONDS = {"disk": {"sdturbo": 2.78, "sdv15": 1.90}, "host": {"sdturbo": 0.42, "sdv15": 0.38}}
DEFAULT_LOAD_SECONDS = {"disk": 2.5, "host": 0.4}
_COLOURS = {"light": (120, 170, 220), "heavy": (220, 150, 90)}


def _sleep(seconds: float) -> None:
    if seconds > 0:
        time.sleep(seconds)


class ProfiledModel:
    backend = "profiled"

    def __init__(self, name: str, role: str, table: LatencyTable, time_scale: float):
        self.name, self.role, self.table, self.time_scale = name, role, table, time_scale
        self._image = Image.new("RGB", (64, 64), _COLOURS.get(role, (128, 128, 128)))

    def load(self, source: str = "disk") -> float:
        seconds = LOAD_SECONDS[source].get(self.name, DEFAULT_LOAD_SECONDS[source]) * self.time_scale
        _sleep(seconds)
        return seconds

    def offload(self) -> None:
        pass

    def unload(self) -> None:
        pass

    def generate(self, prompts: list[str], seeds: list[int]) -> list[Image.Image]:
        _sleep(self.table.latency_ms(len(prompts)) * self.time_scale / 1000)
        return [self._image] * len(prompts)


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
    return Encoded(png, "png", digest=hashlib.sha256(png).hexdigest())


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
        return [self.confidence(p, i) for p, i in zip(prompts, indices)]
