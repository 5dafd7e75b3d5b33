"""The best fixed plan in hindsight (``diffserve simulate --search-static``): fixed plans simulated on the
trace, over threshold x light workers x batch sizes (the rest of the workers heavy), best estimated
quality within an SLO-miss budget first."""

from __future__ import annotations

import itertools
from typing import Any

from common.planner import FixedPlan, Policy
from common.profiles import CascadeProfile
from loadtest.report import summarize
from loadtest.simulation import SimConfig, simulate
from loadtest.traces import Trace


def search_static(
    profile: CascadeProfile,
    trace: Trace,
    prompts: list[str],
    *,
    workers: int,
    slo_ms: float,
    time_scale: float = 1.0,
    overrides: dict[int, float] | None = None,
    max_miss: float = 0.01,
    light_batches: tuple[int, ...] = (4, 8, 16),
    heavy_batches: tuple[int, ...] = (1, 2, 4),
    coarse_step: float = 0.05,
    fine_step: float = 0.01,
    max_threshold: float = 0.4,
    refine: int = 3,
) -> list[dict[str, Any]]:
    """Fixed plans simulated on the trace, best first: within ``max_miss`` SLO misses, by estimated
    quality.  Two passes: thresholds on a ``coarse_step`` grid for every light-worker count up to a
    quarter of the cluster (the rest heavy) and batch pair, then the ``refine`` best configurations
    again at every ``fine_step`` threshold around their best."""
    sign = 1 if profile.quality is None or profile.quality.lower_is_better else -1
    seen: dict[str, dict[str, Any]] = {}

    def run(t: float, lw: int, lb: int, hb: int) -> None:
        fixed = FixedPlan(
            threshold=round(t, 4), light_workers=lw, light_batch=lb, heavy_workers=workers - lw, heavy_batch=hb
        )
        if str(fixed) in seen:
            return
        # every plan starts from the same roles as the other policies (half light), as a live stack does
        cfg = SimConfig(policy=Policy.STATIC, workers=workers, slo_ms=slo_ms, time_scale=time_scale, fixed_plan=fixed)
        e = summarize(
            simulate(profile, trace, prompts, cfg, overrides=overrides),
            slo_ms=slo_ms,
            backend="profiled",
            curve=profile.quality,
            confidence_curve=profile.curve,
        )
        seen[str(fixed)] = {
            "plan": str(fixed),
            "config": (lw, lb, hb),
            "threshold": fixed.threshold,
            "slo_violation_ratio": e["slo_violation_ratio"],
            "fid": e["quality"]["estimate"],
            "heavy_share": e["heavy_share"],
            "degraded": e["degraded"],
        }

    def ranked() -> list[dict[str, Any]]:
        return sorted(
            seen.values(),
            key=lambda r: (r["slo_violation_ratio"] >= max_miss, sign * (r["fid"] or 0), r["slo_violation_ratio"]),
        )

    coarse = [round(i * coarse_step, 4) for i in range(int(round(max_threshold / coarse_step)) + 1)]
    for t, lw, lb, hb in itertools.product(coarse, range(1, max(2, workers // 4) + 1), light_batches, heavy_batches):
        if workers - lw >= 1:
            run(t, lw, lb, hb)
    configs: list[tuple[tuple[int, int, int], float]] = []
    for r in ranked():
        if r["config"] not in [c for c, _t in configs]:
            configs.append((r["config"], r["threshold"]))
        if len(configs) == refine:
            break
    for (lw, lb, hb), center in configs:
        k = int(round(coarse_step / fine_step))
        for i in range(-k + 1, k):
            t = round(center + i * fine_step, 4)
            if 0.0 <= t <= 1.0:
                run(t, lw, lb, hb)
    return ranked()
