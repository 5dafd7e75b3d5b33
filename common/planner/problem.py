"""The planner's problem: its inputs (demand, workers, queues, the options a policy allows, the profiled
batch latencies), a concrete plan's evaluation against every constraint, and the exact enumeration the
MILP is tested against."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from common.messages import Objective, Plan, Policy, Role
from common.planner.policies import OBJECTIVES, OptionKind, policy_spec, spec_uses_light
from common.profiles import BATCH_GRID, CascadeProfile, LatencyTable, QualityCurve

ROLES = tuple(Role)
THRESHOLD_GRID = tuple(round(i * 0.01, 2) for i in range(101))
WAIT_BATCHES = 0.5  # expected wait for a worker, in batch times, at the planned utilisation
DEFAULT_HEADROOM = 0.85
DEFAULT_DRAIN_S = 20.0
REL_TOL = 1e-6  # capacity and SLO checks tolerate this much (the solver's own tolerances)


@dataclass
class QueueStats:
    """Measured backlog (entries not yet done) of each queue."""

    light_backlog: int = 0
    discriminator_backlog: int = 0
    heavy_backlog: int = 0


@dataclass
class AimdState:
    """Batch sizes in force and whether SLO misses were observed since the last plan."""

    light_batch: int = 1
    heavy_batch: int = 1
    slo_miss: bool = False


@dataclass(kw_only=True)
class Option:
    """One choice of the routing knob: threshold t (cascade) or heavy fraction h (split)."""

    value: float
    light_factor: float  # share of D that reaches the light stage
    heavy_factor: float  # share of D that reaches the heavy stage
    light_share: float  # share of answers that come from the light model
    split: bool  # True: light and heavy are separate paths (proteus, clipper-heavy)
    rank: int = 0  # 0 is best under the objective

    @property
    def uses_light(self) -> bool:
        return self.light_factor > 0

    @property
    def uses_heavy(self) -> bool:
        return self.heavy_factor > 0


@dataclass(kw_only=True)
class Problem:
    """Everything the solvers need, in ms and queries/s."""

    demand: float  # D: what the threshold and the heavy stage are planned for
    light_demand: float  # DL >= D: what the light stage is planned for
    workers: int
    slo_ms: float
    e1: dict[int, float]  # light batch latency (scaled)
    e2: dict[int, float]  # heavy batch latency (scaled)
    ed: dict[int, float]  # discriminator latency for a light batch of that size (scaled)
    options: list[Option]
    extra_light_qps: float = 0.0  # backlog to drain: (light + discriminator backlog) / drain_s
    extra_heavy_qps: float = 0.0
    headroom: float = DEFAULT_HEADROOM
    current_light: int = 0
    current_heavy: int = 0
    keep_roles: bool = False  # allocation may not exceed the current counts (no role changes)
    # a queue that still holds jobs keeps at least one worker (when there are two), even where
    # the chosen option sends it nothing new, so its jobs are not stranded
    min_light: int = 0
    min_heavy: int = 0

    @property
    def b1s(self) -> list[int]:
        return sorted(self.e1)

    @property
    def b2s(self) -> list[int]:
        return sorted(self.e2)

    def p1(self, b: int) -> float:
        return b * 1000.0 / self.e1[b]

    def p2(self, b: int) -> float:
        return b * 1000.0 / self.e2[b]

    def light_load(self, o: Option) -> float:
        """queries/s the light stage must carry (at utilisation ``headroom``) under option ``o``."""
        return (self.light_demand * o.light_factor + self.extra_light_qps) / self.headroom if o.uses_light else 0.0

    def heavy_load(self, o: Option) -> float:
        return (self.demand * o.heavy_factor + self.extra_heavy_qps) / self.headroom if o.uses_heavy else 0.0

    def light_path_ms(self, b1: int) -> float:
        return (1 + WAIT_BATCHES) * self.e1[b1] + self.ed[b1]

    def heavy_path_ms(self, b2: int) -> float:
        return (1 + WAIT_BATCHES) * self.e2[b2]


@dataclass(kw_only=True)
class Choice:
    option: int
    b1: int
    b2: int
    x1: int
    x2: int


@dataclass(kw_only=True)
class Evaluation:
    feasible: bool
    light_ms: float = 0.0
    discriminator_ms: float = 0.0
    heavy_ms: float = 0.0
    light_queue_ms: float = 0.0  # expected wait for a light worker
    heavy_queue_ms: float = 0.0
    total_ms: float = 0.0
    changes: int = 0  # role changes the counts need against the current assignment (lower bound)
    reason: str = ""

    def key(self, problem: Problem, option: Option, light_workers: int) -> tuple[int, int, int, float]:
        return (option.rank, self.changes, light_workers, self.total_ms / problem.slo_ms)


def default_objective(profile: CascadeProfile) -> Objective:
    return Objective.QUALITY if profile.quality is not None else Objective.THRESHOLD


def quality_threshold(profile: CascadeProfile) -> float | None:
    """The threshold the cascade's quality curve prefers when the heavy stage has room for every
    job it sends on (the solver's plan for low demand: 0.21 for SD-Turbo -> SD v1.5); None without a
    curve.  Services use it until the first plan exists, and a light answer below it was kept light
    by the plan (no heavy capacity for it), not by its confidence."""
    q = profile.quality
    if q is None:
        return None
    f = profile.curve.f
    return min(THRESHOLD_GRID, key=lambda t: (quality_key(q, 1.0 - f(t)), -t))


def default_plan(profile: CascadeProfile) -> Plan:
    """The plan every service uses until the controller stores one: the cascade's threshold for low
    demand (:func:`quality_threshold`), the message's defaults otherwise."""
    target = quality_threshold(profile)
    if target is None:
        return Plan(reason="no plan stored yet")
    return Plan(
        threshold=target,
        target_threshold=target,
        reason="no plan stored yet: the cascade's threshold for low demand",
    )


def batch_latencies(table: LatencyTable, grid: Iterable[int]) -> dict[int, float]:
    """Batch sizes of ``grid`` the table has a measurement for (sizes that do not fit are
    absent from the table)."""
    have = set(table.batches())
    sizes = [b for b in grid if b in have] or [min(have)]
    return {b: table.latency_ms(b) for b in sizes}


def quality_key(q: QualityCurve, light_share: float) -> float:
    score = q.score(light_share)
    return round(score if q.lower_is_better else -score, 9)


def build_options(
    profile: CascadeProfile,
    policy: Policy,
    objective: Objective,
    threshold_grid: Sequence[float] = THRESHOLD_GRID,
    threshold_window: tuple[float, float] | None = None,
) -> list[Option]:
    spec = policy_spec(policy)
    f = profile.curve.f
    if spec.options == OptionKind.LIGHT:
        opts = [Option(value=0.0, light_factor=1.0, heavy_factor=0.0, light_share=1.0, split=False)]
    elif spec.options == OptionKind.HEAVY:
        opts = [Option(value=1.0, light_factor=0.0, heavy_factor=1.0, light_share=0.0, split=True)]
    elif spec.options == OptionKind.SPLIT:
        opts = [
            Option(value=float(h), light_factor=1.0 - h, heavy_factor=float(h), light_share=1.0 - h, split=True)
            for h in threshold_grid
        ]
    else:
        opts = [
            Option(value=float(t), light_factor=1.0, heavy_factor=f(t), light_share=1.0 - f(t), split=False)
            for t in threshold_grid
        ]
    if threshold_window is not None and len(opts) > 1:
        lo, hi = threshold_window
        opts = [o for o in opts if lo - 1e-9 <= o.value <= hi + 1e-9] or opts
    quality = profile.quality
    if objective == Objective.QUALITY and quality is not None:
        order = sorted(range(len(opts)), key=lambda i: (quality_key(quality, opts[i].light_share), -opts[i].value))
    else:
        order = sorted(range(len(opts)), key=lambda i: -opts[i].value)
    for rank, i in enumerate(order):
        opts[i].rank = rank
    return opts


def build_problem(
    profile: CascadeProfile,
    demand_qps: float,
    workers: int,
    *,
    policy: Policy = Policy.DIFFSERVE,
    objective: Objective | None = None,
    slo_ms: float | None = None,
    latency_scale: float = 1.0,
    batch_grid: Sequence[int] = BATCH_GRID,
    threshold_grid: Sequence[float] = THRESHOLD_GRID,
    threshold_window: tuple[float, float] | None = None,
    light_demand_qps: float | None = None,
    current: dict[str, str] | None = None,
    queues: QueueStats | None = None,
    keep_roles: bool = False,
    light_batches: Sequence[int] | None = None,
    heavy_batches: Sequence[int] | None = None,
    drain_s: float = DEFAULT_DRAIN_S,
    headroom: float = DEFAULT_HEADROOM,
    light_floor: int = 1,
) -> Problem:
    objective = objective or default_objective(profile)
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; known: {', '.join(OBJECTIVES)}")
    objective = Objective(objective)
    scale = float(latency_scale)
    e1 = {b: ms * scale for b, ms in batch_latencies(profile.light, light_batches or batch_grid).items()}
    e2 = {b: ms * scale for b, ms in batch_latencies(profile.heavy, heavy_batches or batch_grid).items()}
    ed = {b: profile.discriminator.latency_ms(b) * scale for b in e1}
    current = current or {}
    l0 = sum(1 for r in current.values() if r == Role.LIGHT)
    h0 = sum(1 for r in current.values() if r == Role.HEAVY)
    opts = build_options(profile, policy, objective, threshold_grid, threshold_window)
    q = queues or QueueStats()
    d = max(0.0, float(demand_qps))
    dl = max(d, float(light_demand_qps or 0.0))
    drain = int(workers) >= 2
    min_light = int(drain and q.light_backlog > 0)
    if spec_uses_light(policy):
        # the light stage keeps ``light_floor`` workers (never all of them: heavy keeps one)
        min_light = max(min_light, min(int(light_floor), int(workers) - 1))
    min_heavy = int(drain and q.heavy_backlog > 0)
    if keep_roles:
        min_light, min_heavy = min(min_light, l0), min(min_heavy, h0)
    return Problem(
        demand=d,
        light_demand=dl,
        workers=int(workers),
        slo_ms=float(slo_ms or profile.slo_ms),
        e1=e1,
        e2=e2,
        ed=ed,
        options=opts,
        extra_light_qps=(q.light_backlog + q.discriminator_backlog) / drain_s,
        extra_heavy_qps=q.heavy_backlog / drain_s,
        headroom=headroom,
        current_light=l0,
        current_heavy=h0,
        keep_roles=keep_roles,
        min_light=min_light,
        min_heavy=min_heavy,
    )


# ----------------------------------------------------------------------------- evaluation
def evaluate(problem: Problem, choice: Choice) -> Evaluation:
    """Predicted latency of a concrete plan and whether it satisfies every constraint."""
    o = problem.options[choice.option]
    slo = problem.slo_ms
    b1, b2, x1, x2 = choice.b1, choice.b2, choice.x1, choice.x2
    ev = Evaluation(feasible=True)
    ev.changes = max(0, x1 - problem.current_light, x2 - problem.current_heavy)

    def fail(reason: str) -> Evaluation:
        ev.feasible, ev.reason = False, ev.reason or reason
        return ev

    if x1 < problem.min_light or x2 < problem.min_heavy or x1 + x2 > problem.workers:
        fail("workers")
    if problem.keep_roles and (x1 > problem.current_light or x2 > problem.current_heavy):
        fail("keep_roles")
    light_path = heavy_path = 0.0
    if o.uses_light:
        if x1 < 1 or x1 * problem.p1(b1) < problem.light_load(o) * (1 - REL_TOL) - 1e-9:
            fail("light capacity")
        ev.light_ms, ev.discriminator_ms = problem.e1[b1], problem.ed[b1]
        ev.light_queue_ms = WAIT_BATCHES * problem.e1[b1]
        light_path = problem.light_path_ms(b1)
    if o.uses_heavy:
        if x2 < 1 or x2 * problem.p2(b2) < problem.heavy_load(o) * (1 - REL_TOL) - 1e-9:
            fail("heavy capacity")
        ev.heavy_ms = problem.e2[b2]
        ev.heavy_queue_ms = WAIT_BATCHES * problem.e2[b2]
        heavy_path = problem.heavy_path_ms(b2)
    ev.total_ms = max(light_path, heavy_path) if o.split else light_path + heavy_path
    if ev.total_ms > slo * (1 + REL_TOL):
        fail("slo")
    return ev


def min_workers(problem: Problem, o: Option, b1: int, b2: int) -> tuple[int, int]:
    x1 = max(1, math.ceil(problem.light_load(o) * (1 - REL_TOL) / problem.p1(b1) - 1e-9)) if o.uses_light else 0
    x2 = max(1, math.ceil(problem.heavy_load(o) * (1 - REL_TOL) / problem.p2(b2) - 1e-9)) if o.uses_heavy else 0
    return max(x1, problem.min_light), max(x2, problem.min_heavy)


def brute_force(problem: Problem, *, exhaustive: bool = True) -> tuple[Choice, Evaluation] | None:
    """The optimum by enumeration over the same grid and the same lexicographic key
    (option rank, role changes, latency).  ``exhaustive`` tries every (x1, x2) with
    x1 + x2 <= S; otherwise only the fewest workers that carry the load, which is enough
    because more workers never lower the changes or the latency."""
    best: tuple[tuple[int, int, int, float], Choice, Evaluation] | None = None
    for k, o in enumerate(problem.options):
        for b1 in problem.b1s:
            for b2 in problem.b2s:
                lo1, lo2 = min_workers(problem, o, b1, b2)
                pairs: Iterable[tuple[int, int]]
                if exhaustive:
                    pairs = (
                        (x1, x2)
                        for x1 in range(problem.workers + 1)
                        for x2 in range(problem.workers + 1 - x1)
                        if x1 >= lo1 and x2 >= lo2
                    )
                else:
                    pairs = [(lo1, lo2)]
                for x1, x2 in pairs:
                    ch = Choice(option=k, b1=b1, b2=b2, x1=x1, x2=x2)
                    ev = evaluate(problem, ch)
                    if not ev.feasible:
                        continue
                    key = ev.key(problem, o, x1)
                    if best is None or key < best[0]:
                        best = (key, ch, ev)
    return None if best is None else (best[1], best[2])
