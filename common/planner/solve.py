"""``plan()``: the planner's one entry point (the controller's control law, ``diffserve plan`` and the
simulator), over a :class:`PlanRequest`."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from common.messages import Objective, Policy
from common.planner.allocation import (
    aimd_batches,
    assign_roles,
    count_changes,
    fallback,
    hand_out_spares,
    refit_batches,
)
from common.planner.milp import solve_milp, warm_up
from common.planner.policies import FixedPlan, OptionKind, PolicySpec, policy_spec
from common.planner.problem import (
    DEFAULT_DRAIN_S,
    DEFAULT_HEADROOM,
    THRESHOLD_GRID,
    AimdState,
    Choice,
    Evaluation,
    Problem,
    QueueStats,
    brute_force,
    build_problem,
    default_objective,
    evaluate,
    quality_threshold,
)
from common.planner.result import LatencyBreakdown, PlanResult, explain
from common.profiles import BATCH_GRID, CascadeProfile

Solver = Literal["milp", "enumerate"]
SOLVERS: tuple[Solver, ...] = ("milp", "enumerate")


@dataclass(kw_only=True)
class PlanRequest:
    """What to plan for (see :func:`plan`)."""

    profile: CascadeProfile
    demand_qps: float
    workers: int
    policy: Policy = Policy.DIFFSERVE
    objective: Objective | None = None
    slo_ms: float | None = None
    latency_scale: float = 1.0
    batch_grid: Sequence[int] = BATCH_GRID
    threshold_grid: Sequence[float] = THRESHOLD_GRID
    threshold_window: tuple[float, float] | None = None
    light_demand_qps: float | None = None
    current: Mapping[str, str] = field(default_factory=dict)
    queues: QueueStats = field(default_factory=QueueStats)
    keep_roles: bool = False
    aimd: AimdState | None = None
    drain_s: float = DEFAULT_DRAIN_S
    headroom: float = DEFAULT_HEADROOM
    spare_util: float = 0.5
    ready_s: dict[str, float] | None = None  # worker -> seconds until it could serve another role
    fixed: FixedPlan | None = None
    solver: Solver = "milp"
    light_floor: int = 1

    def __post_init__(self) -> None:
        self.spec: PolicySpec = policy_spec(self.policy)  # ValueError, by name, for an unknown policy
        self.policy = Policy(self.policy)
        objective = self.spec.objective or self.objective or default_objective(self.profile)
        if objective == Objective.QUALITY and self.profile.quality is None:
            objective = Objective.THRESHOLD
        self.resolved_objective = Objective(objective)
        self.slo = float(self.slo_ms or self.profile.slo_ms)

    def build(self, **narrowed: Any) -> Problem:
        """The problem for this request (``narrowed``: batches, window or light demand of one search)."""
        return build_problem(
            self.profile,
            self.demand_qps,
            self.workers,
            policy=self.policy,
            objective=self.resolved_objective,
            slo_ms=self.slo,
            latency_scale=self.latency_scale,
            batch_grid=self.batch_grid,
            threshold_grid=self.threshold_grid,
            current=dict(self.current),
            queues=self.queues,
            keep_roles=self.keep_roles,
            drain_s=self.drain_s,
            headroom=self.headroom,
            light_floor=self.light_floor,
            **narrowed,
        )


def plan(profile: CascadeProfile, demand_qps: float, workers: int, **options: Any) -> PlanResult:
    """The plan for ``demand_qps`` on ``workers`` workers (``options``: the other PlanRequest fields; None
    for ``current`` or ``queues`` means none).

    ``current`` maps worker id -> role now (its length should be ``workers``); the result's
    ``roles`` then assigns every one of them with the fewest changes.  ``keep_roles`` plans
    without changing any known role (the controller compares that plan with the free one).
    ``light_demand_qps`` (>= demand) is what the light stage is provisioned for; when no plan
    serves it, the light stage is planned for ``demand_qps`` instead.  ``threshold_window``
    limits t (h) to a range while any option in it is feasible.  ``fixed`` returns that plan
    as given.  ``solver`` is ``milp`` (CBC) or ``enumerate`` (the exact enumeration).
    ``light_floor``: the fewest light workers a policy that uses the light model keeps (heavy
    keeps one where it can).  The controller's plans keep one (a lost light worker or a burst is met by
    the deadline rule and by moving heavy workers to the light stage between ticks); a plan fixed before
    the load is seen keeps two in a cluster of four or more (common/control.py)."""
    given = {name: value for name, value in options.items() if not (name in ("current", "queues") and value is None)}
    return solve(PlanRequest(profile=profile, demand_qps=demand_qps, workers=workers, **given))


# (key, problem, choice, evaluation, the solver's counts before spare workers)
Best = tuple[tuple[bool, int, int, int], Problem, Choice, Evaluation, tuple[int, int]]


class _Search:
    """The solver over the request's candidate batches (one; under AIMD, one per candidate batch pair)."""

    def __init__(self, req: PlanRequest):
        self.req = req
        self.candidates: Sequence[tuple[int | None, int | None]] = [(None, None)]
        if req.spec.aimd:
            self.candidates = aimd_batches(req.aimd or AimdState(), req.batch_grid)
        self.solve_s = 0.0
        self.problem: Problem | None = None  # the first one built (what an empty cluster reports)

    def run(self, window: tuple[float, float] | None, light_demand: float | None) -> Best | None:
        """Best (key, problem, choice, evaluation, minimum counts) over the candidate batches."""
        best: Best | None = None
        refit = not self.req.spec.aimd
        for i, (lb, hb) in enumerate(self.candidates):
            cand = self.req.build(
                light_batches=[lb] if lb else None,
                heavy_batches=[hb] if hb else None,
                threshold_window=window,
                light_demand_qps=light_demand,
            )
            self.problem = self.problem or cand
            if cand.workers <= 0:
                break
            t0 = time.perf_counter()
            sol = solve_milp(cand) if self.req.solver == "milp" else brute_force(cand, exhaustive=False)
            self.solve_s += time.perf_counter() - t0
            if sol is None:
                continue
            ch = sol[0]
            x1, x2 = hand_out_spares(cand, ch, target_util=self.req.spare_util)
            final, ev = refit_batches(cand, ch, x1, x2, refit)
            # AIMD: within the SLO with every worker placed first, then the objective; among equals
            # the earliest candidate (the larger batches)
            key = (not ev.feasible, cand.options[ch.option].rank, sol[1].changes, i)
            if best is None or key < best[0]:
                best = (key, cand, final, ev, (ch.x1, ch.x2))
        return best


def solve(req: PlanRequest) -> PlanResult:
    """The plan for ``req``: the solver's, else one with the threshold window or the light stage's peak
    relaxed, else the maximum-throughput plan; a fixed plan as given."""
    if req.fixed is not None:
        return _fixed_result(req, req.fixed)
    if req.solver == "milp":
        warm_up()
    start = time.perf_counter()
    search = _Search(req)
    notes: list[str] = []
    best = search.run(req.threshold_window, req.light_demand_qps)
    clamp = None
    if best is None and req.threshold_window is not None and req.workers > 0:
        best = search.run(None, req.light_demand_qps)
        if best is not None:
            clamp = req.threshold_window
            notes.append(
                "nothing feasible within the threshold window: the whole grid's plan, with the "
                "threshold moved at most to the window's edge (the deadline rule covers the rest)"
            )
    if best is None and req.light_demand_qps and req.light_demand_qps > req.demand_qps and req.workers > 0:
        best = search.run(None, None)
        if best is not None:
            notes.append("the light stage is planned for the current demand, not its light demand")
    solve_ms = search.solve_s * 1000.0
    assert search.problem is not None  # run() builds a problem before anything else
    if search.problem.workers <= 0:
        return _no_workers(req, search.problem, solve_ms)
    if best is not None:
        _key, problem, ch, ev, mins = best
    else:
        problem = req.build()  # the whole grid of batches and options
        ch, ev = fallback(problem, req.policy)
        mins = (ch.x1, ch.x2)
        notes.append("no plan meets demand within the SLO (even at the lowest threshold): maximum-throughput plan")
    plan_ms = (time.perf_counter() - start) * 1000.0
    result = _solved(req, problem, ch, ev, clamp)
    result = dataclasses.replace(
        result,
        feasible=best is not None,
        solve_ms=solve_ms,
        plan_ms=plan_ms,
        min_light_workers=mins[0],
        min_heavy_workers=mins[1],
        notes=notes,
    )
    result.reason = explain(result, problem.min_light)
    return result


def _solved(
    req: PlanRequest, problem: Problem, ch: Choice, ev: Evaluation, clamp: tuple[float, float] | None
) -> PlanResult:
    """The chosen option, batches and counts as a result (smoothing held: a threshold beyond the window
    steps toward the feasible plan's, one window a tick)."""
    kind = req.spec.options
    o = problem.options[ch.option]
    value, light_share = o.value, o.light_share
    if clamp is not None and kind in (OptionKind.THRESHOLD, OptionKind.SPLIT):
        value = min(max(value, clamp[0]), clamp[1])
        light_share = 1.0 - (req.profile.curve.f(value) if kind == OptionKind.THRESHOLD else value)
    split = kind in (OptionKind.SPLIT, OptionKind.HEAVY)
    threshold = 0.0 if kind in (OptionKind.SPLIT, OptionKind.LIGHT) else (1.0 if kind == OptionKind.HEAVY else value)
    return _result(
        req,
        ch,
        ev,
        threshold=round(threshold, 4),
        heavy_fraction=round(value if split else 0.0, 4),
        light_share=light_share,
        value=value,
        problem=problem,
    )


def _fixed_result(req: PlanRequest, fixed: FixedPlan) -> PlanResult:
    """A plan given explicitly, as it is: roles assigned with the fewest changes."""
    # Evaluated on its own: the request's queues, floors and headroom do not change a plan given as is.
    problem = build_problem(
        req.profile,
        req.demand_qps,
        req.workers,
        policy=req.policy,
        objective=req.resolved_objective,
        slo_ms=req.slo,
        latency_scale=req.latency_scale,
        threshold_grid=[fixed.threshold],
        light_batches=[fixed.light_batch],
        heavy_batches=[fixed.heavy_batch],
    )
    ch = Choice(option=0, b1=problem.b1s[0], b2=problem.b2s[0], x1=fixed.light_workers, x2=fixed.heavy_workers)
    ev = evaluate(problem, ch)
    result = _result(
        req,
        Choice(option=0, b1=fixed.light_batch, b2=fixed.heavy_batch, x1=fixed.light_workers, x2=fixed.heavy_workers),
        ev,
        threshold=fixed.threshold,
        heavy_fraction=0.0,
        light_share=1.0 - req.profile.curve.f(fixed.threshold),
        value=fixed.threshold,
    )
    why = f"fixed plan {fixed}" + ("" if ev.feasible else f" (infeasible here: {ev.reason})")
    return dataclasses.replace(
        result,
        feasible=ev.feasible,
        min_light_workers=fixed.light_workers,
        min_heavy_workers=fixed.heavy_workers,
        notes=[f"fixed plan {fixed}"],
        reason=why,
    )


def _no_workers(req: PlanRequest, problem: Problem, solve_ms: float) -> PlanResult:
    result = _result(
        req,
        Choice(option=0, b1=problem.b1s[0], b2=problem.b2s[0], x1=0, x2=0),
        None,
        threshold=0.0,
        heavy_fraction=0.0,
        light_share=1.0,
        value=0.0,
        problem=problem,
    )
    return dataclasses.replace(
        result, workers=0, feasible=False, solve_ms=solve_ms, notes=["no live workers"], reason="no live workers"
    )


def _result(
    req: PlanRequest,
    ch: Choice,
    ev: Evaluation | None,
    *,
    threshold: float,
    heavy_fraction: float,
    light_share: float,
    value: float,
    problem: Problem | None = None,
) -> PlanResult:
    """The one constructor of a PlanResult: the option's knob, batches and counts, the predicted latency
    (none without an evaluation: no plan was made), the estimated quality and the named workers' roles.
    ``problem``: the solved problem's demand and workers (else the request's, as given)."""
    profile, objective = req.profile, req.resolved_objective
    quality = profile.quality.score(light_share) if profile.quality is not None and ev is not None else None
    roles = assign_roles(req.current, ch.x1, ch.x2, ready_s=req.ready_s) if req.current and ev is not None else {}
    lat = LatencyBreakdown()
    if ev is not None:
        lat = LatencyBreakdown(
            light_ms=ev.light_ms,
            discriminator_ms=ev.discriminator_ms,
            heavy_ms=ev.heavy_ms,
            light_queue_ms=ev.light_queue_ms,
            heavy_queue_ms=ev.heavy_queue_ms,
            total_ms=ev.total_ms,
        )
    return PlanResult(
        policy=req.policy,
        objective=objective,
        threshold=threshold,
        heavy_fraction=heavy_fraction,
        light_batch=ch.b1,
        heavy_batch=ch.b2,
        light_workers=ch.x1,
        heavy_workers=ch.x2,
        feasible=True,
        latency=lat,
        estimated_quality=quality,
        objective_value=quality if objective == Objective.QUALITY and quality is not None else value,
        light_share=light_share,
        demand_qps=problem.demand if problem is not None else req.demand_qps,
        light_demand_qps=problem.light_demand if problem is not None and ev is not None else 0.0,
        workers=problem.workers if problem is not None else req.workers,
        slo_ms=req.slo,
        solve_ms=0.0,
        role_changes=count_changes(req.current, roles),
        roles=roles,
        target_threshold=quality_threshold(profile),
    )
