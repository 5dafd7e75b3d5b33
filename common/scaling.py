"""How many workers the controller wants: the autoscaler's signal (``diffserve_workers_wanted``).

The controller plans over the workers that exist; an autoscaler (the Helm chart's optional KEDA
``ScaledObject``) changes how many exist.  :func:`workers_wanted` answers what the autoscaler asks:
the fewest workers with which the planner, for the forecast demand and the backlog to drain, reaches
the quality it targets.  The target is the best objective value (estimated quality, or threshold) the
SLO allows at all: the plan for no demand, where capacity is no constraint.  A demand that not even
``max_workers`` serve at the target wants ``max_workers`` (``reached`` False) and says what quality
they give.  With fewer workers the controller still plans, at a lower quality: the plan in force says
which (``diffserve_estimated_quality{workers="live"}``).

Pure computation over :func:`common.planner.plan` with the same knobs the control loop plans with
(no threshold window: this is where the plan settles, not the next step).  For a fixed target, a plan
for S workers is also one for S+1 and one for any lower demand, so the answer only grows with demand,
and the smallest size is found by bisection over plans restricted to the target's option (a few ms
each).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from common.control import ControlSettings
from common.planner import THRESHOLD_GRID, PlanResult, QueueStats, plan, policy_spec
from common.profiles import CascadeProfile

DEFAULT_MAX_WORKERS = 64  # the largest cluster the target is looked for in


@dataclass(frozen=True, kw_only=True)
class WorkersWanted:
    workers: int  # fewest workers that reach the target (max_workers when even they fall short)
    reached: bool  # False: not even max_workers serve the demand at the target quality
    objective: str  # quality or threshold
    objective_value: float  # of the plan at `workers`: estimated quality score, or threshold
    estimated_quality: float | None  # at `workers` (None: the cascade has no quality curve)
    threshold: float  # of the plan at `workers`


def workers_wanted(
    profile: CascadeProfile,
    settings: ControlSettings,
    demand_qps: float,
    *,
    light_demand_qps: float | None = None,
    queues: QueueStats | None = None,
    max_workers: int = DEFAULT_MAX_WORKERS,
) -> WorkersWanted:
    """The fewest workers (at most ``max_workers``) whose plan for this demand reaches the best
    objective value the SLO allows; ``light_demand_qps`` and ``queues`` as :func:`common.planner.plan`."""
    if max_workers < 1:
        raise ValueError(f"max_workers must be at least 1, got {max_workers}")

    def solve(workers: int, grid: Sequence[float] = THRESHOLD_GRID, *, idle: bool = False) -> PlanResult:
        return plan(
            profile,
            0.0 if idle else demand_qps,
            workers,
            policy=settings.policy,
            objective=settings.objective,
            batch_grid=tuple(sorted(settings.batch_grid)),
            slo_ms=settings.slo_ms,
            latency_scale=settings.latency_scale,
            threshold_grid=grid,
            light_demand_qps=None if idle else light_demand_qps,
            queues=None if idle else queues,
            drain_s=settings.drain_intervals * settings.interval_s,
            headroom=settings.headroom,
            spare_util=settings.spare_util,
        )

    target = solve(max_workers, idle=True)  # the best the SLO allows: no demand, so no capacity limit
    # Only the target's option from here on: a size reaches the target when that option is feasible
    # for the demand and its peak (and each solve is ~5x cheaper than over the whole grid).
    split = policy_spec(target.policy).options == "split"
    option = [target.heavy_fraction if split else target.threshold]
    peak = max(demand_qps, light_demand_qps or 0.0)

    def reaches(result: PlanResult) -> bool:
        # the planner falls back to provisioning the light stage for the demand, not its peak, when
        # the peak does not fit: for the autoscaler that size falls short
        return result.feasible and result.light_demand_qps >= peak - 1e-9

    best = solve(max_workers, grid=option)
    if not reaches(best):
        return _wanted(solve(max_workers), max_workers, reached=False)
    # The plan's own minimum counts already carry the demand: the answer is at most their sum.
    hi = max(1, min(max_workers, best.min_light_workers + best.min_heavy_workers))
    at_hi = solve(hi, grid=option) if hi < max_workers else best
    if not reaches(at_hi):  # not expected (that choice fits hi workers); if so, search the whole range
        hi, at_hi = max_workers, best
    lo = 1
    while lo < hi:
        mid = (lo + hi) // 2
        result = solve(mid, grid=option)
        if reaches(result):
            hi, at_hi = mid, result
        else:
            lo = mid + 1
    return _wanted(at_hi, hi, reached=True)


def _wanted(result: PlanResult, workers: int, *, reached: bool) -> WorkersWanted:
    return WorkersWanted(
        workers=workers,
        reached=reached,
        objective=result.objective,
        objective_value=result.objective_value,
        estimated_quality=result.estimated_quality,
        threshold=result.threshold,
    )
