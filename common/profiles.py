"""Profiles the planner and the profiled backend run on: batch latency tables,
the confidence curve f(t), the quality curve and the SLO of each cascade.

Defaults are files copied from the DiffServe artifact (A100, ``common/data/diffserve``)
and our H100 measurements (``common/data/h100``). Operators can point at their own
files in the same formats (``diffserve profile`` writes the latency table).
"""

from __future__ import annotations

import bisect
import csv
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from common.cascades import CascadeSpec, cascade

DATA_DIR = Path(__file__).parent / "data"
ARTIFACT_DIR = DATA_DIR / "diffserve"
H100_DIR = DATA_DIR / "h100"
PROMPTS_FILE = ARTIFACT_DIR / "text_diffusiondb_2m_first_5k.txt"
DOES_NOT_FIT_MS = 100000  # the artifact's marker for "this batch size does not fit"
BATCH_GRID = (1, 2, 4, 8, 16, 32)
DISCRIMINATOR_ROW = "efficientnetv2_s"
HARDWARE = {"a100": ("onnxruntime_gpu_ampere", ARTIFACT_DIR), "h100": ("h100_fp16_eager", H100_DIR)}
DEFAULT_HARDWARE = "a100"  # the paper's tables: what a profiled run and the planning tools use unless told


def _interp(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """Piecewise-linear, extrapolating linearly past both ends."""
    if len(xs) == 1:
        return ys[0] * x / xs[0] if xs[0] else ys[0]
    i = min(max(bisect.bisect_left(xs, x), 1), len(xs) - 1)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


@dataclass
class LatencyTable:
    """ms per batch of one model on one kind of accelerator."""

    model: str
    batch_ms: dict[int, float]
    source: str = ""

    def latency_ms(self, batch: int) -> float:
        xs = sorted(self.batch_ms)
        return max(0.0, _interp(xs, [self.batch_ms[b] for b in xs], batch))

    def throughput_qps(self, batch: int) -> float:
        return batch * 1000.0 / self.latency_ms(batch)

    def batches(self) -> list[int]:
        return sorted(self.batch_ms)

    def scaled(self, factor: float) -> LatencyTable:
        return LatencyTable(self.model, {b: ms * factor for b, ms in self.batch_ms.items()}, self.source)


def load_latency_table(path: str | Path, model: str, accel: str | None = None) -> LatencyTable:
    """Rows of ``path`` whose Model is ``model`` (and Accel is ``accel`` when given);
    rows marked as not fitting (100000 ms) are left out."""
    rows: dict[int, float] = {}
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            if row["Model"] != model or (accel and row["Accel"] != accel):
                continue
            ms = float(row["avg_runtime"])
            if ms < DOES_NOT_FIT_MS:
                rows[int(row["batchsize"])] = ms
    if not rows:
        raise ValueError(f"{path}: no rows for model {model!r}" + (f" on {accel!r}" if accel else ""))
    return LatencyTable(model, rows, f"{Path(path).name}:{model}:{accel or '*'}")


def write_latency_table(path: str | Path, tables: list[LatencyTable], accel: str) -> None:
    """Write tables in the artifact's column layout, so the same loader reads them."""
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["", "Model", "Accel", "batchsize", "avg_runtime", "50th_pct", "90th_pct", "95th_pct"])
        i = 0
        for t in tables:
            for b in t.batches():
                ms = round(t.batch_ms[b], 2)
                w.writerow([i, t.model, accel, b, ms, ms, ms, ms])
                i += 1


@dataclass
class ConfidenceCurve:
    """f(t): share of queries whose discriminator confidence is below t."""

    ts: list[float]
    fs: list[float]
    source: str = ""
    borrowed: bool = False  # True when this cascade has no curve of its own

    def f(self, t: float) -> float:
        return min(1.0, max(0.0, _interp(self.ts, self.fs, t)))

    def confidence_for(self, u: float) -> float:
        """Inverse of f: a confidence c with P(conf < c) = u, so drawing u uniformly
        reproduces the calibrated distribution."""
        u = min(max(u, 0.0), 1.0)
        for i in range(1, len(self.ts)):
            if self.fs[i] >= u:
                f0, f1 = self.fs[i - 1], self.fs[i]
                if f1 == f0:
                    return self.ts[i - 1]
                return self.ts[i - 1] + (self.ts[i] - self.ts[i - 1]) * (u - f0) / (f1 - f0)
        return self.ts[-1]


def load_confidence_curve(path: str | Path) -> ConfidenceCurve:
    ts, fs = [], []
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            ts.append(float(row["t"]))
            fs.append(float(row["f_t"]))
    return ConfidenceCurve(ts, fs, Path(path).name)


def write_confidence_curve(path: str | Path, curve: ConfidenceCurve) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["", "t", "f_t"])
        for i, (t, f) in enumerate(zip(curve.ts, curve.fs, strict=False)):
            w.writerow([i, round(t, 4), round(f, 6)])


def uniform_from_text(text: str, salt: str = "") -> float:
    """A deterministic number in [0, 1) for a prompt: same prompt, same draw."""
    digest = hashlib.blake2b((salt + text).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


@dataclass
class QualityCurve:
    """Light share -> quality score (FID by default: lower is better)."""

    light_shares: list[float]
    scores: list[float]
    metric: str = "fid"
    lower_is_better: bool = True
    source: str = ""

    def score(self, light_share: float) -> float:
        return _interp(self.light_shares, self.scores, min(1.0, max(0.0, light_share)))

    def better(self, a: float, b: float) -> bool:
        return a < b if self.lower_is_better else a > b


def load_quality_curve(
    path: str | Path, column: str, *, metric: str = "fid", lower_is_better: bool = True
) -> QualityCurve:
    """A CSV with a ``light_share`` column and one score column per cascade."""
    shares, scores = [], []
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            if row.get(column) not in (None, ""):
                shares.append(float(row["light_share"]))
                scores.append(float(row[column]))
    if not shares:
        raise ValueError(f"{path}: no column {column!r}")
    return QualityCurve(shares, scores, metric, lower_is_better, f"{Path(path).name}:{column}")


@dataclass(kw_only=True)
class CascadeProfile:
    spec: CascadeSpec
    light: LatencyTable
    heavy: LatencyTable
    discriminator: LatencyTable
    curve: ConfidenceCurve
    quality: QualityCurve | None
    slo_ms: float
    hardware: str
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.spec.name

    def table(self, role: str) -> LatencyTable:
        return {"light": self.light, "heavy": self.heavy, "discriminator": self.discriminator}[role]


def load_cascade_profile(
    name: str,
    hardware: str = DEFAULT_HARDWARE,
    *,
    latency_file: str | None = None,
    latency_accel: str | None = None,
    curve_file: str | None = None,
    quality_file: str | None = None,
    slo_ms: float | None = None,
) -> CascadeProfile:
    """The profile of cascade ``name`` on ``hardware`` (a100: the paper's tables, h100: ours),
    with any of its parts replaced by an operator's own file."""
    spec = cascade(name)
    notes: list[str] = []
    if hardware not in HARDWARE:
        raise ValueError(f"unknown hardware {hardware!r}; known: {', '.join(HARDWARE)}")
    accel, _ = HARDWARE[hardware]
    if latency_file:
        light = load_latency_table(latency_file, spec.light, latency_accel)
        heavy = load_latency_table(latency_file, spec.heavy, latency_accel)
    elif hardware == "h100":
        if not (spec.h100_light_row and spec.h100_heavy_row):
            raise ValueError(f"no H100 table for cascade {name}: profile it with `diffserve profile`")
        h100 = H100_DIR / "stable_diffusion_runtimes_h100.csv"
        light = load_latency_table(h100, spec.h100_light_row)
        heavy = load_latency_table(h100, spec.h100_heavy_row)
    else:
        table = ARTIFACT_DIR / spec.runtimes_file
        light = load_latency_table(table, spec.light_row, accel)
        heavy = load_latency_table(table, spec.heavy_row, accel)
    # Discriminator: an operator's table may have its row (diffserve profile writes one); else the
    # H100 measurement, used for the A100 too (a ~15 ms term the artifact does not have).
    disc = None
    if latency_file:
        try:
            disc = load_latency_table(latency_file, DISCRIMINATOR_ROW, latency_accel)
        except ValueError:
            pass
    disc = disc or load_latency_table(DATA_DIR / "discriminator_runtimes.csv", DISCRIMINATOR_ROW)
    if curve_file:
        curve = load_confidence_curve(curve_file)
    elif spec.f_curve_file:
        curve = load_confidence_curve(ARTIFACT_DIR / spec.f_curve_file)
    else:
        curve = load_confidence_curve(ARTIFACT_DIR / "f_t_sdturbo_sdv15.csv")
        curve.borrowed = True
        notes.append(f"{name} has no calibrated f(t); using SD-Turbo's until `diffserve calibrate` writes one")
    quality = None
    if quality_file:
        quality = load_quality_curve(quality_file, spec.quality_column or name)
    elif spec.quality_column:
        quality = load_quality_curve(ARTIFACT_DIR / "fid_vs_light_share.csv", spec.quality_column)
    return CascadeProfile(
        spec=spec,
        light=light,
        heavy=heavy,
        discriminator=disc,
        curve=curve,
        quality=quality,
        slo_ms=slo_ms or spec.slo_ms,
        hardware=hardware,
        notes=notes,
    )


def load_slo_ms(cascade_json: str | Path) -> float:
    """The artifact's per-cascade app file (``latencySLOInMSec``)."""
    return float(json.loads(Path(cascade_json).read_text())["latencySLOInMSec"])


def load_prompts(path: str | Path | None = None) -> list[str]:
    """Every line of a prompt file, stripped: item i is line i (0-based), the number traces and
    confidence files use as ``prompt_index``.  A blank line stays, as an empty prompt."""
    with open(path or PROMPTS_FILE, encoding="utf-8") as fh:
        return [line.strip() for line in fh.read().splitlines()]
