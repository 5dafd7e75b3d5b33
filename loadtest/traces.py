"""Arrival traces: when each query arrives (ms from the start, at full speed) and which prompt it carries.

Synthetic traces are (non-homogeneous) Poisson processes drawn by thinning from a rate
function, seeded so every policy of a comparison sees the very same trace:

- ``poisson``: constant rate R for S seconds;
- ``step``: low -> high -> low, a third of the run each (high = R, low = ``low_rate``, default R/4);
- ``ramp``: rises linearly from ``low_rate`` to R over the run;
- ``bursty``: a diurnal-like base that swings between ``low_rate`` and about twice it, with
  bursts at the peak rate R (default 4 -> 32 q/s) lasting 5-15 s at random times.

A trace file has one ``arrival_ms,prompt_index`` line per query (``#`` comments and a
header line are allowed); :func:`write_trace` writes the same format.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TRACES = ("poisson", "step", "ramp", "bursty")
DEFAULT_RATE = {"poisson": 8.0, "step": 24.0, "ramp": 24.0, "bursty": 32.0}
DEFAULT_LOW = {"step": 0.25, "ramp": 0.125, "bursty": 0.125}  # low_rate as a share of the peak


@dataclass
class Trace:
    """Arrival times (ms at full speed, ascending) and the prompt index of each query."""

    arrivals_ms: list[float]
    prompt_indices: list[int]
    name: str = "trace"
    duration_s: float = 0.0
    params: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.arrivals_ms)

    def __iter__(self) -> Iterator[tuple[float, int]]:
        return iter(zip(self.arrivals_ms, self.prompt_indices, strict=False))

    @property
    def mean_rate(self) -> float:
        return len(self) / self.duration_s if self.duration_s else 0.0

    def rate_per_bin(self, bin_s: float) -> list[float]:
        """Offered queries/s in consecutive bins of ``bin_s`` (full-speed seconds)."""
        bins = [0] * max(1, math.ceil(self.duration_s / bin_s))
        for ms in self.arrivals_ms:
            bins[min(len(bins) - 1, int(ms / 1000 / bin_s))] += 1
        return [n / bin_s for n in bins]


def rate_function(
    kind: str, rate: float, duration_s: float, low_rate: float | None = None, seed: int = 0
) -> Callable[[float], float]:
    """q/s at time t (s) for a synthetic trace kind."""
    if kind not in TRACES:
        raise ValueError(f"unknown trace {kind!r}; known: {', '.join(TRACES)}")
    if rate <= 0 or duration_s <= 0:
        raise ValueError("rate and duration must be positive")
    low = low_rate if low_rate is not None else rate * DEFAULT_LOW.get(kind, 1.0)
    if kind == "poisson":
        return lambda t: rate
    if kind == "step":
        return lambda t: rate if duration_s / 3 <= t < 2 * duration_s / 3 else low
    if kind == "ramp":
        return lambda t: low + (rate - low) * min(1.0, max(0.0, t / duration_s))
    # bursty: base swings low..2*low once per run (a compressed "day"), bursts at the peak.
    rng = random.Random(f"bursts-{seed}")
    bursts: list[tuple[float, float]] = []
    t = rng.uniform(0.1, 0.25) * duration_s
    while t < duration_s:
        length = rng.uniform(5.0, 15.0)
        bursts.append((t, t + length))
        t += length + rng.uniform(0.15, 0.35) * duration_s
    if not bursts:  # very short runs still get one burst in the middle
        bursts.append((duration_s * 0.4, duration_s * 0.6))

    def bursty(t: float) -> float:
        if any(a <= t < b for a, b in bursts):
            return rate
        return low * (1.5 - 0.5 * math.cos(2 * math.pi * t / duration_s))

    return bursty


def generate(
    kind: str,
    *,
    rate: float | None = None,
    duration_s: float = 60.0,
    low_rate: float | None = None,
    n_prompts: int = 5000,
    seed: int = 0,
) -> Trace:
    """A seeded synthetic trace; prompts drawn uniformly from ``n_prompts``."""
    rate = rate if rate is not None else DEFAULT_RATE.get(kind, 8.0)
    fn = rate_function(kind, rate, duration_s, low_rate, seed)
    peak = max(rate, max(fn(duration_s * i / 1000) for i in range(1001)))
    rng = random.Random(seed)
    arrivals: list[float] = []
    t = 0.0
    while True:  # thinning (Lewis-Shedler): candidates at the peak rate, kept with prob fn(t)/peak
        t += rng.expovariate(peak)
        if t >= duration_s:
            break
        if rng.random() * peak < fn(t):
            arrivals.append(round(t * 1000, 3))
    indices = [rng.randrange(n_prompts) for _ in arrivals]
    params = {"kind": kind, "rate": rate, "low_rate": low_rate, "duration_s": duration_s, "seed": seed}
    return Trace(arrivals, indices, kind, duration_s, params)


def read_trace(path: str | Path, n_prompts: int | None = None) -> Trace:
    """``arrival_ms,prompt_index`` lines -> Trace (sorted by arrival)."""
    rows: list[tuple[float, int]] = []
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#") or line.lower().startswith("arrival"):
            continue
        try:
            ms, index = line.split(",")[:2]
            rows.append((float(ms), int(index)))
        except ValueError:
            raise ValueError(f"{path}:{lineno}: expected `arrival_ms,prompt_index`, got {line!r}") from None
        if rows[-1][0] < 0 or rows[-1][1] < 0 or (n_prompts is not None and rows[-1][1] >= n_prompts):
            raise ValueError(f"{path}:{lineno}: arrival or prompt index out of range: {line!r}")
    rows.sort()
    duration_s = math.ceil(rows[-1][0] / 1000 + 1e-9) if rows else 0.0
    return Trace(
        [r[0] for r in rows],
        [r[1] for r in rows],
        Path(path).stem,
        float(duration_s),
        {"kind": "file", "path": str(path)},
    )


def write_trace(trace: Trace, path: str | Path) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("arrival_ms,prompt_index\n")
        for ms, index in trace:
            fh.write(f"{ms:.3f},{index}\n")
