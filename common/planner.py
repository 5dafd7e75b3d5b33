"""The planner: which threshold, batch sizes and light/heavy worker split serve demand D
on S workers within the SLO at the best quality. Pure computation, no Redis; the controller,
``diffserve plan`` and the simulator (``diffserve simulate``) all call it.

Formulation (the DiffServe paper's MILP, solved with python-mip / CBC), for one choice of
threshold t (or, for ``proteus``, heavy fraction h) from a grid, one light batch b1 and one
heavy batch b2 from the batch grid, and integer worker counts x1 (light), x2 (heavy)::

    rho·x1·p1(b1) >= DL + B1/H          light capacity (p(b) = b / e(b) per worker)
    rho·x2·p2(b2) >= D·f(t) + B2/H      heavy capacity for the share the discriminator sends on
    x1 + x2       <= S
    (1+k)·(e1(b1) + ed(b1)) + (1+k)·e2(b2) <= SLO

Differences from the original, on purpose:

- a backlog B is work to drain within ``drain_s`` (H), so it adds capacity, not latency: the
  measured queue wait used to make every t > 0 infeasible after a busy interval, the plan flipped
  to t = 0, the queue drained and t came back (bang-bang).  Jobs already queued are protected by
  the data plane's deadline rule (common/routing.py), which answers a job with its light image
  when the heavy stage cannot finish it in time;
- capacity is planned at utilisation ``headroom`` (rho, 0.85 by default), because the profiled
  latencies are means and queues grow without bound as utilisation nears 1; with that cap a job
  waits about k = half a batch for a worker (``WAIT_BATCHES``), which the latency budget includes;
- the light stage may be planned for a higher demand DL than the heavy stage (the controller
  passes its recent peak): every query passes through the light model, so an under-provisioned
  light stage misses the SLO for everyone, while a short heavy overload only degrades some answers;
- the discriminator's batch latency ed(b1) is in the latency budget (it scores each light batch);
- no worker is reserved for a sink;
- ties on the objective are broken by fewer role changes against the current assignment, then
  by fewer light workers (larger light batches: the heavy stage is the scarce one when a burst
  comes), then by lower predicted latency;
- the threshold grid is 0.01 wide (f(t) is interpolated between the calibrated points), so the
  heavy share can be matched to capacity instead of jumping from 0 to f(0.05) = 36 %;
- ``threshold_window`` bounds how far t may move from the plan in force (the controller's
  smoothing); when nothing inside the window is feasible the whole grid is searched for the
  allocation, and t moves to the window's edge nearest the feasible plan's: a burst is carried
  by the data plane's deadline rule while t steps down tick by tick only if the load persists;
- when even t=0 cannot meet demand the plan is "maximum throughput" (every worker light,
  the highest-throughput batch that fits, t=0) and ``feasible`` is False;
- a queue that still holds jobs keeps at least one worker (with two or more workers) even
  when the chosen option sends it nothing new (t=0, clipper-heavy), so no job is stranded.

Linearisation is exact: one binary per option (t), one binary per batch size per stage and an
integer worker count per batch size bounded by its binary (x_b <= S·y_b).  Products of a
batch choice and a worker count become sums over x_b.  The objective is lexicographic (option
rank, role changes, latency) folded into one weighted sum; :func:`brute_force` enumerates the
same grid and is what the tests compare to (key: rank, changes, light workers, latency).

Objectives: ``threshold`` maximises t (the paper).  ``quality`` (the default where the cascade
has a quality curve) picks the feasible threshold whose light share 1-f(t) has the best
estimated quality (FID: lower is better), ties to the larger t.  Workers the chosen plan does
not need are handed, one by one, to the stage with the higher utilisation (load including its
backlog over capacity), and the batch sizes are then re-fitted to the final counts, so every
worker gets a role and the predicted latency falls.

What each policy means (its options, objective and what the data plane does with its plans)
is one table, :data:`POLICY_TABLE`; the services read the plan's explicit fields, never the
policy's name.

Time units: every profiled latency is multiplied by ``latency_scale`` and the SLO is taken as
given (``slo_ms``).  A controller running the profiled backend with ``time_scale`` < 1 passes
``latency_scale=time_scale`` and ``slo_ms=SLO*time_scale`` and measures demand in real
(wall-clock, i.e. "fast") queries/s, so latencies, SLO and demand are all in the same units.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import functools
import json
import math
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from common.profiles import BATCH_GRID, CascadeProfile, LatencyTable, QualityCurve

if TYPE_CHECKING:
    from common.messages import Plan

ROLES = ("light", "heavy")
THRESHOLD_GRID = tuple(round(i * 0.01, 2) for i in range(101))
OBJECTIVES = ("quality", "threshold")
WAIT_BATCHES = 0.5  # expected wait for a worker, in batch times, at the planned utilisation
DEFAULT_HEADROOM = 0.85
DEFAULT_DRAIN_S = 20.0
_REL_TOL = 1e-6  # capacity and SLO checks tolerate this much (the solver's own tolerances)


# ----------------------------------------------------------------------------- policies
@dataclass(frozen=True, kw_only=True)
class PolicySpec:
    """What a policy means, for the planner and for the data plane (via the plan's fields)."""

    options: str  # threshold: cascade on t; split: a fraction h straight to heavy; light / heavy: one model
    objective: str | None  # None: the configured objective (quality where the cascade has a curve)
    discriminator_routes: bool  # False: every light image is the answer
    degrade_late: bool  # the deadline rule: a job the heavy model cannot finish in time gets its light image
    fixed: bool = False  # planned once, never changed
    aimd: bool = False  # batch sizes by additive increase / multiplicative decrease on SLO misses
    summary: str = ""


class Policy(enum.StrEnum):
    """The serving policies (``--policy``); what each one means is its POLICY_TABLE entry."""

    DIFFSERVE = "diffserve"
    DIFFSERVE_THRESHOLD = "diffserve-threshold"
    STATIC = "static"
    CLIPPER_LIGHT = "clipper-light"
    CLIPPER_HEAVY = "clipper-heavy"
    PROTEUS = "proteus"
    AIMD = "aimd"


POLICY_TABLE: dict[Policy, PolicySpec] = {
    Policy.DIFFSERVE: PolicySpec(
        options="threshold",
        objective=None,
        discriminator_routes=True,
        degrade_late=True,
        summary="MILP every interval, best estimated quality within the SLO",
    ),
    Policy.DIFFSERVE_THRESHOLD: PolicySpec(
        options="threshold",
        objective="threshold",
        discriminator_routes=True,
        degrade_late=True,
        summary="MILP every interval, largest t (the paper)",
    ),
    Policy.STATIC: PolicySpec(
        options="threshold",
        objective=None,
        discriminator_routes=True,
        degrade_late=True,
        fixed=True,
        summary="one plan (threshold, batches, roles) set once and never changed",
    ),
    Policy.CLIPPER_LIGHT: PolicySpec(
        options="light",
        objective="threshold",
        discriminator_routes=False,
        degrade_late=True,
        summary="light model only",
    ),
    Policy.CLIPPER_HEAVY: PolicySpec(
        options="heavy",
        objective="threshold",
        discriminator_routes=False,
        degrade_late=False,
        summary="heavy model only, late answers stay heavy",
    ),
    Policy.PROTEUS: PolicySpec(
        options="split",
        objective="threshold",
        discriminator_routes=False,
        degrade_late=True,
        summary="a random fraction straight to heavy, as large as capacity allows",
    ),
    Policy.AIMD: PolicySpec(
        options="threshold",
        objective=None,
        discriminator_routes=True,
        degrade_late=True,
        aimd=True,
        summary="batch sizes by AIMD on SLO misses, MILP for the rest",
    ),
}
POLICIES = tuple(POLICY_TABLE)


def spec_uses_light(policy: str) -> bool:
    return policy_spec(policy).options != "heavy"


def policy_spec(policy: str) -> PolicySpec:
    try:
        return POLICY_TABLE[Policy(policy)]
    except (ValueError, KeyError):  # not a Policy value, or one without an entry
        raise ValueError(f"unknown policy {policy!r}; known: {', '.join(POLICIES)}") from None


@dataclass(frozen=True, kw_only=True)
class FixedPlan:
    """A plan given explicitly: ``t=0.02,light=4x16,heavy=12x4`` (workers x batch)."""

    threshold: float
    light_workers: int
    light_batch: int
    heavy_workers: int
    heavy_batch: int

    _SPEC = re.compile(r"^\s*t=([0-9.]+)\s*,\s*light=(\d+)x(\d+)\s*,\s*heavy=(\d+)x(\d+)\s*$")

    @classmethod
    def parse(cls, text: str) -> "FixedPlan":
        m = cls._SPEC.match(text or "")
        if not m:
            raise ValueError(f"plan {text!r} is not of the form t=0.02,light=4x16,heavy=12x4 (workers x batch)")
        t, lw, lb, hw, hb = float(m[1]), int(m[2]), int(m[3]), int(m[4]), int(m[5])
        if not 0.0 <= t <= 1.0 or min(lb, hb) < 1:
            raise ValueError(f"plan {text!r}: t must be in [0, 1] and batches at least 1")
        return cls(threshold=t, light_workers=lw, light_batch=lb, heavy_workers=hw, heavy_batch=hb)

    def __str__(self) -> str:
        return (
            f"t={self.threshold:g},light={self.light_workers}x{self.light_batch},"
            f"heavy={self.heavy_workers}x{self.heavy_batch}"
        )


# ----------------------------------------------------------------------------- inputs
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


@dataclass
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


@dataclass
class Choice:
    option: int
    b1: int
    b2: int
    x1: int
    x2: int


@dataclass
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


# ----------------------------------------------------------------------------- outputs
@dataclass
class LatencyBreakdown:
    light_ms: float = 0.0
    discriminator_ms: float = 0.0
    heavy_ms: float = 0.0
    light_queue_ms: float = 0.0
    heavy_queue_ms: float = 0.0
    total_ms: float = 0.0


@dataclass(kw_only=True)
class PlanResult:
    policy: str
    objective: str
    threshold: float
    heavy_fraction: float
    light_batch: int
    heavy_batch: int
    light_workers: int
    heavy_workers: int
    feasible: bool
    latency: LatencyBreakdown
    estimated_quality: float | None
    objective_value: float  # t (threshold objective) or the quality score (quality objective)
    light_share: float
    demand_qps: float
    workers: int
    slo_ms: float
    solve_ms: float
    light_demand_qps: float = 0.0
    min_light_workers: int = 0  # what the chosen option needs, before spare workers are handed out
    min_heavy_workers: int = 0
    role_changes: int = 0
    roles: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    plan_ms: float = 0.0  # solve_ms plus building the problems and placing spare workers
    target_threshold: float | None = None  # quality_threshold(profile): what the cascade wants with room for all
    reason: str = ""  # why this plan, in words (the controller adds its part)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_message(self, version: int, roles: dict[str, str] | None = None, created_ms: float | None = None) -> Plan:
        from common.messages import Plan

        spec = policy_spec(self.policy)
        return Plan(
            version=version,
            policy=self.policy,
            threshold=float(self.threshold),
            light_batch=int(self.light_batch),
            heavy_batch=int(self.heavy_batch),
            light_workers=int(self.light_workers),
            heavy_workers=int(self.heavy_workers),
            heavy_fraction=float(self.heavy_fraction),
            roles=dict(self.roles if roles is None else roles),
            demand_qps=float(self.demand_qps),
            feasible=bool(self.feasible),
            objective=self.objective,
            estimated_quality=None if self.estimated_quality is None else float(self.estimated_quality),
            created_ms=time.time() * 1000.0 if created_ms is None else created_ms,
            discriminator_routes=spec.discriminator_routes,
            degrade_late=spec.degrade_late,
            target_threshold=self.target_threshold,
            reason=self.reason or None,
        )


# ----------------------------------------------------------------------------- roles
def assign_roles(
    current: dict[str, str], light_workers: int, heavy_workers: int, *, switch_s: dict[str, float] | None = None
) -> dict[str, str]:
    """A role for every worker in ``current`` (worker id -> its role now, or anything else
    for unknown) with ``light_workers`` light and ``heavy_workers`` heavy, changing the fewest
    known roles.  Workers beyond light+heavy keep their role (light when unknown); when the
    counts exceed the workers, light is served first.  Among workers that must flip, those
    with the shortest measured ``switch_s`` flip first; ids break ties so the result is stable."""
    cost = switch_s or {}
    ids = sorted(current)
    want = {"light": max(0, light_workers), "heavy": max(0, heavy_workers)}
    roles: dict[str, str] = {}
    for role in ROLES:  # those slowest to switch stay put
        keepers = sorted((w for w in ids if current[w] == role), key=lambda w: (-cost.get(w, 0.0), w))[: want[role]]
        for w in keepers:
            roles[w] = role
    # unknown roles first (they cost no change), then the cheapest to switch
    rest = sorted((w for w in ids if w not in roles), key=lambda w: (current[w] in ROLES, cost.get(w, 0.0), w))
    for role in ROLES:
        need = want[role] - sum(1 for r in roles.values() if r == role)
        while need > 0 and rest:
            roles[rest.pop(0)] = role
            need -= 1
    for w in rest:  # more workers than light + heavy: leave them as they are
        roles[w] = current[w] if current[w] in ROLES else "light"
    return roles


def count_changes(current: dict[str, str], roles: dict[str, str]) -> int:
    return sum(1 for w, r in roles.items() if current.get(w) in ROLES and current[w] != r)


# ----------------------------------------------------------------------------- problem
def default_objective(profile: CascadeProfile) -> str:
    return "quality" if profile.quality is not None else "threshold"


def quality_threshold(profile: CascadeProfile) -> float | None:
    """The threshold the cascade's quality curve prefers when the heavy stage has room for every
    job it sends on (the solver's plan for low demand: 0.21 for SD-Turbo -> SD v1.5); None without a
    curve.  Services use it until the first plan exists, and a light answer below it was kept light
    by the plan (no heavy capacity for it), not by its confidence."""
    q = profile.quality
    if q is None:
        return None
    f = profile.curve.f
    return min(THRESHOLD_GRID, key=lambda t: (_quality_key(q, 1.0 - f(t)), -t))


def default_plan(profile: CascadeProfile) -> Plan:
    """The plan every service uses until the controller stores one: the cascade's threshold for low
    demand (:func:`quality_threshold`), the message's defaults otherwise."""
    from common.messages import Plan

    target = quality_threshold(profile)
    if target is None:
        return Plan(reason="no plan stored yet")
    return Plan(
        threshold=target,
        target_threshold=target,
        reason="no plan stored yet: the cascade's threshold for low demand",
    )


def _grid(table: LatencyTable, grid: Iterable[int]) -> dict[int, float]:
    """Batch sizes of ``grid`` the table has a measurement for (sizes that do not fit are
    absent from the table)."""
    have = set(table.batches())
    sizes = [b for b in grid if b in have] or [min(have)]
    return {b: table.latency_ms(b) for b in sizes}


def _quality_key(q: QualityCurve, light_share: float) -> float:
    score = q.score(light_share)
    return round(score if q.lower_is_better else -score, 9)


def build_options(
    profile: CascadeProfile,
    policy: str,
    objective: str,
    threshold_grid: Sequence[float] = THRESHOLD_GRID,
    threshold_window: tuple[float, float] | None = None,
) -> list[Option]:
    spec = policy_spec(policy)
    f = profile.curve.f
    if spec.options == "light":
        opts = [Option(0.0, 1.0, 0.0, 1.0, False)]
    elif spec.options == "heavy":
        opts = [Option(1.0, 0.0, 1.0, 0.0, True)]
    elif spec.options == "split":
        opts = [Option(float(h), 1.0 - h, float(h), 1.0 - h, True) for h in threshold_grid]
    else:
        opts = [Option(float(t), 1.0, f(t), 1.0 - f(t), False) for t in threshold_grid]
    if threshold_window is not None and len(opts) > 1:
        lo, hi = threshold_window
        opts = [o for o in opts if lo - 1e-9 <= o.value <= hi + 1e-9] or opts
    quality = profile.quality
    if objective == "quality" and quality is not None:
        order = sorted(range(len(opts)), key=lambda i: (_quality_key(quality, opts[i].light_share), -opts[i].value))
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
    policy: str = "diffserve",
    objective: str | None = None,
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
    scale = float(latency_scale)
    e1 = {b: ms * scale for b, ms in _grid(profile.light, light_batches or batch_grid).items()}
    e2 = {b: ms * scale for b, ms in _grid(profile.heavy, heavy_batches or batch_grid).items()}
    ed = {b: profile.discriminator.latency_ms(b) * scale for b in e1}
    current = current or {}
    l0 = sum(1 for r in current.values() if r == "light")
    h0 = sum(1 for r in current.values() if r == "heavy")
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
    ev = Evaluation(True)
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
        if x1 < 1 or x1 * problem.p1(b1) < problem.light_load(o) * (1 - _REL_TOL) - 1e-9:
            fail("light capacity")
        ev.light_ms, ev.discriminator_ms = problem.e1[b1], problem.ed[b1]
        ev.light_queue_ms = WAIT_BATCHES * problem.e1[b1]
        light_path = problem.light_path_ms(b1)
    if o.uses_heavy:
        if x2 < 1 or x2 * problem.p2(b2) < problem.heavy_load(o) * (1 - _REL_TOL) - 1e-9:
            fail("heavy capacity")
        ev.heavy_ms = problem.e2[b2]
        ev.heavy_queue_ms = WAIT_BATCHES * problem.e2[b2]
        heavy_path = problem.heavy_path_ms(b2)
    ev.total_ms = max(light_path, heavy_path) if o.split else light_path + heavy_path
    if ev.total_ms > slo * (1 + _REL_TOL):
        fail("slo")
    return ev


def _min_workers(problem: Problem, o: Option, b1: int, b2: int) -> tuple[int, int]:
    x1 = max(1, math.ceil(problem.light_load(o) * (1 - _REL_TOL) / problem.p1(b1) - 1e-9)) if o.uses_light else 0
    x2 = max(1, math.ceil(problem.heavy_load(o) * (1 - _REL_TOL) / problem.p2(b2) - 1e-9)) if o.uses_heavy else 0
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
                lo1, lo2 = _min_workers(problem, o, b1, b2)
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
                    ch = Choice(k, b1, b2, x1, x2)
                    ev = evaluate(problem, ch)
                    if not ev.feasible:
                        continue
                    key = ev.key(problem, o, x1)
                    if best is None or key < best[0]:
                        best = (key, ch, ev)
    return None if best is None else (best[1], best[2])


# ----------------------------------------------------------------------------- MILP
_WARM = False


def warm_up() -> None:
    """Load CBC once (its first model costs ~0.2 s), so solve times measure solving."""
    global _WARM
    if not _WARM:
        import mip

        mip.Model(solver_name=mip.CBC)
        _WARM = True


def solve_milp(problem: Problem) -> tuple[Choice, Evaluation] | None:
    """The optimum by MILP (python-mip, CBC); None when no plan satisfies the constraints."""
    import mip

    warm_up()
    S, slo = problem.workers, problem.slo_ms
    if S <= 0:
        return None
    opt = problem.options
    # options whose fixed part alone cannot meet the SLO, or that need a role nobody may take, are left out
    lmin = min(problem.light_path_ms(b) for b in problem.b1s)
    hmin = min(problem.heavy_path_ms(b) for b in problem.b2s)
    opts = []
    for k, o in enumerate(opt):
        light = lmin if o.uses_light else 0.0
        heavy = hmin if o.uses_heavy else 0.0
        fixed = max(light, heavy) if o.split else light + heavy
        if fixed <= slo * (1 + _REL_TOL) and (
            not problem.keep_roles
            or ((not o.uses_light or problem.current_light >= 1) and (not o.uses_heavy or problem.current_heavy >= 1))
        ):
            opts.append(k)
    if not opts:
        return None
    U1 = {b: problem.current_light if problem.keep_roles else S for b in problem.b1s}
    U2 = {b: problem.current_heavy if problem.keep_roles else S for b in problem.b2s}

    m = mip.Model(sense=mip.MINIMIZE, solver_name=mip.CBC)
    m.verbose = 0
    m.threads = 1
    m.max_mip_gap = 1e-9
    m.max_mip_gap_abs = 1e-7
    m.preprocess = 0  # the model is tiny; CBC's preprocessing costs more than it saves
    z = {k: m.add_var(var_type=mip.BINARY, name=f"z{k}") for k in opts}
    y1 = {b: m.add_var(var_type=mip.BINARY, name=f"y1_{b}") for b in problem.b1s}
    y2 = {b: m.add_var(var_type=mip.BINARY, name=f"y2_{b}") for b in problem.b2s}
    x1 = {b: m.add_var(var_type=mip.INTEGER, lb=0, ub=U1[b], name=f"x1_{b}") for b in problem.b1s}
    x2 = {b: m.add_var(var_type=mip.INTEGER, lb=0, ub=U2[b], name=f"x2_{b}") for b in problem.b2s}
    c = m.add_var(lb=0, ub=S, name="changes")
    lat = m.add_var(lb=0, ub=1 + _REL_TOL, name="latency")  # in units of the SLO

    m += mip.xsum(z.values()) == 1
    m += mip.xsum(y1.values()) == 1
    m += mip.xsum(y2.values()) == 1
    for b in problem.b1s:
        m += x1[b] <= U1[b] * y1[b]
    for b in problem.b2s:
        m += x2[b] <= U2[b] * y2[b]
    X1, X2 = mip.xsum(x1.values()), mip.xsum(x2.values())
    m += X1 + X2 <= S
    m += mip.xsum(problem.p1(b) * x1[b] for b in problem.b1s) >= mip.xsum(
        problem.light_load(opt[k]) * (1 - _REL_TOL) * z[k] for k in opts
    )
    m += mip.xsum(problem.p2(b) * x2[b] for b in problem.b2s) >= mip.xsum(
        problem.heavy_load(opt[k]) * (1 - _REL_TOL) * z[k] for k in opts
    )
    m += X1 >= mip.xsum(z[k] for k in opts if opt[k].uses_light)
    m += X2 >= mip.xsum(z[k] for k in opts if opt[k].uses_heavy)
    if problem.min_light:
        m += X1 >= problem.min_light
    if problem.min_heavy:
        m += X2 >= problem.min_heavy
    m += c >= X1 - problem.current_light
    m += c >= X2 - problem.current_heavy

    A1 = mip.xsum(problem.light_path_ms(b) / slo * y1[b] for b in problem.b1s)
    A2 = mip.xsum(problem.heavy_path_ms(b) / slo * y2[b] for b in problem.b2s)
    M = (max(problem.light_path_ms(b) for b in problem.b1s) + max(problem.heavy_path_ms(b) for b in problem.b2s)) / slo
    # the latency of the chosen option: each kind of option (by which paths it uses) has one row
    kinds: dict[tuple[bool, bool, bool], list[int]] = {}
    for k in opts:
        kinds.setdefault((opt[k].uses_light, opt[k].uses_heavy, opt[k].split), []).append(k)
    for (light, heavy, split), ks in kinds.items():
        chosen = mip.xsum(z[k] for k in ks)
        rows = ([A1] if light else []) + ([A2] if heavy else [])
        for row in rows if split else [mip.xsum(rows)]:
            m += lat >= row - M * (1 - chosen)

    w3 = 2.0  # lat <= 1 < w3: one light worker fewer outweighs any latency
    w2 = w3 * (S + 1) + 1.0  # one role change outweighs any number of light workers
    w1 = w2 * (S + 1) + 1.0  # one rank step outweighs any number of changes
    m.objective = mip.minimize(w1 * mip.xsum(opt[k].rank * z[k] for k in opts) + w2 * c + w3 * X1 + lat)
    status = m.optimize()
    if status not in (mip.OptimizationStatus.OPTIMAL, mip.OptimizationStatus.FEASIBLE):
        return None
    k = max(opts, key=lambda i: z[i].x)
    b1 = max(problem.b1s, key=lambda b: y1[b].x)
    b2 = max(problem.b2s, key=lambda b: y2[b].x)
    ch = Choice(k, b1, b2, int(round(sum(v.x for v in x1.values()))), int(round(sum(v.x for v in x2.values()))))
    if not opt[k].uses_light:
        ch.x1 = 0
    if not opt[k].uses_heavy:
        ch.x2 = 0
    ev = evaluate(problem, ch)
    if not ev.feasible:  # numerical trouble: the enumeration is exact and cheap
        return brute_force(problem, exhaustive=False)
    return ch, ev


# ----------------------------------------------------------------------------- post-processing
def _utilisation(problem: Problem, o: Option, role: str, x: int, b: int) -> float:
    """Planned load over capacity of one stage (the load includes the backlog to drain)."""
    if role == "light":
        load, cap = problem.light_load(o), x * problem.p1(b)
    else:
        load, cap = problem.heavy_load(o), x * problem.p2(b)
    return math.inf if cap <= 0 else load * problem.headroom / cap


def _refit_batches(problem: Problem, ch: Choice, x1: int, x2: int, refit: bool = True) -> tuple[Choice, Evaluation]:
    """Batch sizes for the counts (x1, x2): within the SLO and loading no stage more than the
    solver's plan ``ch`` did, the largest capacity (lowest utilisation of the busier stage, then of
    the other), then the lowest predicted latency; ``ch``'s batches when none fits (or when ``refit`` is off, as under
    AIMD batching).  A batch size is the most a worker takes: at low load it takes what is there,
    so a larger one costs little latency and is capacity in hand when a burst comes."""
    o = problem.options[ch.option]
    relaxed = dataclasses.replace(problem, keep_roles=False)
    if refit:
        rho1 = _utilisation(problem, o, "light", ch.x1, ch.b1) if o.uses_light else 0.0
        rho2 = _utilisation(problem, o, "heavy", ch.x2, ch.b2) if o.uses_heavy else 0.0
        # a stage the option sends nothing new gets the smallest batch (stable plans)
        b1s = (
            [b for b in problem.b1s if _utilisation(problem, o, "light", x1, b) <= rho1 * (1 + 1e-9)]
            if o.uses_light
            else problem.b1s[:1]
        )
        b2s = (
            [b for b in problem.b2s if _utilisation(problem, o, "heavy", x2, b) <= rho2 * (1 + 1e-9)]
            if o.uses_heavy
            else problem.b2s[:1]
        )
        best = None
        for b1 in b1s:
            for b2 in b2s:
                cand = Choice(ch.option, b1, b2, x1, x2)
                ev = evaluate(relaxed, cand)
                if ev.feasible:
                    rho = sorted(
                        (
                            _utilisation(problem, o, "light", x1, b1) if o.uses_light else 0.0,
                            _utilisation(problem, o, "heavy", x2, b2) if o.uses_heavy else 0.0,
                        ),
                        reverse=True,
                    )
                    key = (round(rho[0], 6), round(rho[1], 6), round(ev.total_ms, 6), (b1, b2) != (ch.b1, ch.b2))
                    if best is None or key < best[0]:
                        best = (key, cand, ev)
        if best is not None:
            return best[1], best[2]
    cand = Choice(ch.option, ch.b1, ch.b2, x1, x2)
    return cand, evaluate(relaxed, cand)


def _hand_out_spares(problem: Problem, ch: Choice, *, refit: bool = True, target_util: float = 0.5) -> tuple[int, int]:
    """Final counts: the solver's counts plus every spare worker.

    First, while a stage's utilisation (load incl. backlog to drain, over capacity) is above
    ``target_util``, the stage with the highest utilisation gets the next spare, so its queueing
    falls.  The rest go to the heavy stage when the option uses it: the light stage is already
    provisioned for the recent peak, and heavy capacity is what a burst runs out of (the
    controller's hysteresis decides whether such a move is worth its role changes).  Stages the
    option does not use get none."""
    o = problem.options[ch.option]
    allowed = [r for r, used in (("light", o.uses_light), ("heavy", o.uses_heavy)) if used] or ["light"]
    x = {"light": ch.x1, "heavy": ch.x2}
    if problem.keep_roles:  # known workers keep their role; only unknown ones are handed out
        x = {"light": max(ch.x1, problem.current_light), "heavy": max(ch.x2, problem.current_heavy)}
        surplus = {"light": 0, "heavy": 0}
        unknown = max(0, problem.workers - problem.current_light - problem.current_heavy)
    else:
        # workers of each role beyond what the solver placed there; deficits are covered by
        # workers without a role first, then by the other role's surplus (role changes)
        surplus = {"light": max(0, problem.current_light - ch.x1), "heavy": max(0, problem.current_heavy - ch.x2)}
        unknown = max(0, problem.workers - problem.current_light - problem.current_heavy)
        for role, need, other in (("light", ch.x1, "heavy"), ("heavy", ch.x2, "light")):
            deficit = max(0, need - (problem.current_light if role == "light" else problem.current_heavy))
            from_unknown = min(unknown, deficit)
            unknown -= from_unknown
            surplus[other] = max(0, surplus[other] - (deficit - from_unknown))
    b = {"light": ch.b1, "heavy": ch.b2}

    def rho(r: str) -> float:
        return _utilisation(problem, o, r, x[r], b[r])

    def take(r: str) -> None:
        nonlocal unknown
        other = "heavy" if r == "light" else "light"
        if surplus[r] > 0:
            surplus[r] -= 1
        elif unknown > 0:
            unknown -= 1
        else:
            surplus[other] -= 1
        x[r] += 1

    while surplus["light"] + surplus["heavy"] + unknown > 0:
        if max(rho(r) for r in allowed) > target_util:
            take(max(allowed, key=rho))
        else:
            take("heavy" if "heavy" in allowed else allowed[0])
    return x["light"], x["heavy"]


def _best_batch(problem: Problem, paths: dict[int, float], rate: Callable[[int], float]) -> int:
    """Highest-throughput batch whose path latency fits the SLO (else the highest-throughput one)."""
    fits = [b for b in paths if paths[b] <= problem.slo_ms]
    return max(fits or list(paths), key=lambda b: (rate(b), -b))


def _fallback(problem: Problem, policy: str) -> tuple[Choice, Evaluation]:
    """The maximum-throughput plan for a demand no option can meet."""
    S = problem.workers
    light_paths = {b: problem.light_path_ms(b) for b in problem.b1s}
    if policy_spec(policy).options == "heavy":
        b2 = _best_batch(problem, {b: problem.heavy_path_ms(b) for b in problem.b2s}, problem.p2)
        ch = Choice(0, problem.b1s[0], b2, problem.min_light, S - problem.min_light)
    else:  # every worker light, t = 0 (or h = 0)
        k = min(range(len(problem.options)), key=lambda i: (problem.options[i].heavy_factor, problem.options[i].value))
        ch = Choice(
            k, _best_batch(problem, light_paths, problem.p1), problem.b2s[0], S - problem.min_heavy, problem.min_heavy
        )
    return ch, evaluate(dataclasses.replace(problem, keep_roles=False), ch)


def _aimd_batches(aimd: AimdState, batch_grid: Iterable[int]) -> list[tuple[int, int]]:
    """Candidate (light, heavy) batches in the order AIMD tries them: on SLO misses both halve;
    otherwise each tries one grid step up, falling back to the batches in force."""
    grid = sorted(batch_grid)

    def snap(b: int) -> int:
        return max([g for g in grid if g <= b] or [grid[0]])

    def up(b: int) -> int:
        return min([g for g in grid if g > b] or [grid[-1]])

    b1, b2 = snap(aimd.light_batch), snap(aimd.heavy_batch)
    if aimd.slo_miss:
        return [(snap(max(1, b1 // 2)), snap(max(1, b2 // 2)))]
    out: list[tuple[int, int]] = []
    for cand in ((up(b1), up(b2)), (up(b1), b2), (b1, up(b2)), (b1, b2)):
        if cand not in out:
            out.append(cand)
    return out


def _fixed_result(
    profile: CascadeProfile,
    fixed: FixedPlan,
    workers: int,
    current: dict[str, str],
    *,
    policy: str,
    objective: str,
    slo_ms: float,
    latency_scale: float,
    demand_qps: float,
    switch_s: dict[str, float] | None,
) -> PlanResult:
    """A plan given explicitly, as it is: roles assigned with the fewest changes."""
    f = profile.curve.f(fixed.threshold)
    problem = build_problem(
        profile,
        demand_qps,
        workers,
        policy=policy,
        objective=objective,
        slo_ms=slo_ms,
        latency_scale=latency_scale,
        threshold_grid=[fixed.threshold],
        light_batches=[fixed.light_batch],
        heavy_batches=[fixed.heavy_batch],
    )
    ev = evaluate(problem, Choice(0, problem.b1s[0], problem.b2s[0], fixed.light_workers, fixed.heavy_workers))
    lat = LatencyBreakdown(
        ev.light_ms, ev.discriminator_ms, ev.heavy_ms, ev.light_queue_ms, ev.heavy_queue_ms, ev.total_ms
    )
    quality = profile.quality.score(1.0 - f) if profile.quality is not None else None
    roles = assign_roles(current, fixed.light_workers, fixed.heavy_workers, switch_s=switch_s) if current else {}
    return PlanResult(
        policy=policy,
        objective=objective,
        threshold=fixed.threshold,
        heavy_fraction=0.0,
        light_batch=fixed.light_batch,
        heavy_batch=fixed.heavy_batch,
        light_workers=fixed.light_workers,
        heavy_workers=fixed.heavy_workers,
        feasible=ev.feasible,
        latency=lat,
        estimated_quality=quality,
        objective_value=quality if objective == "quality" and quality is not None else fixed.threshold,
        light_share=1.0 - f,
        demand_qps=demand_qps,
        workers=workers,
        slo_ms=slo_ms,
        solve_ms=0.0,
        min_light_workers=fixed.light_workers,
        min_heavy_workers=fixed.heavy_workers,
        role_changes=count_changes(current, roles),
        roles=roles,
        notes=[f"fixed plan {fixed}"],
        target_threshold=quality_threshold(profile),
        reason=f"fixed plan {fixed}" + ("" if ev.feasible else f" (infeasible here: {ev.reason})"),
    )


def plan(
    profile: CascadeProfile,
    demand_qps: float,
    workers: int,
    *,
    policy: str = "diffserve",
    objective: str | None = None,
    slo_ms: float | None = None,
    latency_scale: float = 1.0,
    batch_grid: Sequence[int] = BATCH_GRID,
    threshold_grid: Sequence[float] = THRESHOLD_GRID,
    threshold_window: tuple[float, float] | None = None,
    light_demand_qps: float | None = None,
    current: dict[str, str] | None = None,
    queues: QueueStats | None = None,
    keep_roles: bool = False,
    aimd: AimdState | None = None,
    drain_s: float = DEFAULT_DRAIN_S,
    headroom: float = DEFAULT_HEADROOM,
    spare_util: float = 0.5,
    switch_s: dict[str, float] | None = None,
    fixed: FixedPlan | None = None,
    solver: str = "milp",
    light_floor: int = 1,
) -> PlanResult:
    """The plan for ``demand_qps`` on ``workers`` workers.

    ``current`` maps worker id -> role now (its length should be ``workers``); the result's
    ``roles`` then assigns every one of them with the fewest changes.  ``keep_roles`` plans
    without changing any known role (the controller compares that plan with the free one).
    ``light_demand_qps`` (>= demand) is what the light stage is provisioned for; when no plan
    serves it, the light stage is planned for ``demand_qps`` instead.  ``threshold_window``
    limits t (h) to a range while any option in it is feasible.  ``fixed`` returns that plan
    as given.  ``solver`` is ``milp`` (CBC) or ``enumerate`` (the exact enumeration).
    ``light_floor``: the fewest light workers a policy that uses the light model keeps (heavy
    keeps one where it can).  One is enough where the light stage's peak is known (a lost light
    worker is covered by the deadline rule and a re-plan); the controller asks for two in a cluster
    of four or more until its history shows the light stage's recurring peak (common/control.py)."""
    spec = policy_spec(policy)
    objective = spec.objective or objective or default_objective(profile)
    if objective == "quality" and profile.quality is None:
        objective = "threshold"
    queues = queues or QueueStats()
    current = current or {}
    slo = float(slo_ms or profile.slo_ms)
    if fixed is not None:
        return _fixed_result(
            profile,
            fixed,
            workers,
            current,
            policy=policy,
            objective=objective,
            slo_ms=slo,
            latency_scale=latency_scale,
            demand_qps=demand_qps,
            switch_s=switch_s,
        )
    build = functools.partial(
        build_problem,
        profile,
        demand_qps,
        workers,
        policy=policy,
        objective=objective,
        slo_ms=slo,
        latency_scale=latency_scale,
        batch_grid=batch_grid,
        threshold_grid=threshold_grid,
        current=current,
        queues=queues,
        keep_roles=keep_roles,
        drain_s=drain_s,
        headroom=headroom,
        light_floor=light_floor,
    )
    candidates: Sequence[tuple[int | None, int | None]] = [(None, None)]
    if spec.aimd:
        candidates = _aimd_batches(aimd or AimdState(), batch_grid)
    if solver == "milp":
        warm_up()
    refit = not spec.aimd
    start = time.perf_counter()
    notes: list[str] = []
    solve_s = 0.0
    problem: Problem | None = None
    Best = tuple[tuple[bool, int, int, int], Problem, Choice, Evaluation, tuple[int, int]]

    def search(window: tuple[float, float] | None, light_demand: float | None) -> Best | None:
        """Best (key, problem, choice, evaluation, minimum counts) over the candidate batches."""
        nonlocal solve_s, problem
        best: Best | None = None
        for i, (lb, hb) in enumerate(candidates):  # one solve; under AIMD one per candidate batch pair
            cand = build(
                light_batches=[lb] if lb else None,
                heavy_batches=[hb] if hb else None,
                threshold_window=window,
                light_demand_qps=light_demand,
            )
            problem = problem or cand
            if cand.workers <= 0:
                break
            t0 = time.perf_counter()
            sol = solve_milp(cand) if solver == "milp" else brute_force(cand, exhaustive=False)
            solve_s += time.perf_counter() - t0
            if sol is None:
                continue
            ch = sol[0]
            x1, x2 = _hand_out_spares(cand, ch, refit=refit, target_util=spare_util)
            final, ev = _refit_batches(cand, ch, x1, x2, refit)
            # AIMD: within the SLO with every worker placed first, then the objective; among equals
            # the earliest candidate (the larger batches)
            key = (not ev.feasible, cand.options[ch.option].rank, sol[1].changes, i)
            if best is None or key < best[0]:
                best = (key, cand, final, ev, (ch.x1, ch.x2))
        return best

    best = search(threshold_window, light_demand_qps)
    clamp = None
    if best is None and threshold_window is not None and workers > 0:
        best = search(None, light_demand_qps)
        if best is not None:
            clamp = threshold_window
            notes.append(
                "nothing feasible within the threshold window: the whole grid's plan, with the "
                "threshold moved at most to the window's edge (the deadline rule covers the rest)"
            )
    if best is None and light_demand_qps and light_demand_qps > demand_qps and workers > 0:
        best = search(None, None)
        if best is not None:
            notes.append("the light stage is planned for the current demand, not its recent peak")
    solve_ms = solve_s * 1000.0
    assert problem is not None  # search() builds a problem before anything else
    if problem.workers <= 0:
        return PlanResult(
            policy=policy,
            objective=objective,
            threshold=0.0,
            heavy_fraction=0.0,
            light_batch=problem.b1s[0],
            heavy_batch=problem.b2s[0],
            light_workers=0,
            heavy_workers=0,
            feasible=False,
            latency=LatencyBreakdown(),
            estimated_quality=None,
            objective_value=0.0,
            light_share=1.0,
            demand_qps=problem.demand,
            workers=0,
            slo_ms=slo,
            solve_ms=solve_ms,
            notes=["no live workers"],
            target_threshold=quality_threshold(profile),
            reason="no live workers",
        )
    if best is not None:
        _key, problem, ch, ev, mins = best
        feasible = True
    else:
        feasible = False
        problem = build()  # the whole grid of batches and options
        ch, ev = _fallback(problem, policy)
        mins = (ch.x1, ch.x2)
        notes.append("no plan meets demand within the SLO (even at the lowest threshold): maximum-throughput plan")
    plan_ms = (time.perf_counter() - start) * 1000.0
    o = problem.options[ch.option]
    value, light_share = o.value, o.light_share
    if clamp is not None and spec.options in ("threshold", "split"):
        # Smoothing holds even then: the threshold steps toward the feasible plan's, one window a tick.
        value = min(max(value, clamp[0]), clamp[1])
        light_share = 1.0 - (profile.curve.f(value) if spec.options == "threshold" else value)
    split = spec.options in ("split", "heavy")
    threshold = 0.0 if spec.options in ("split", "light") else (1.0 if spec.options == "heavy" else value)
    heavy_fraction = value if split else 0.0
    quality = profile.quality.score(light_share) if profile.quality is not None else None
    objective_value = quality if (objective == "quality" and quality is not None) else value
    roles = assign_roles(current, ch.x1, ch.x2, switch_s=switch_s) if current else {}
    lat = LatencyBreakdown(
        ev.light_ms, ev.discriminator_ms, ev.heavy_ms, ev.light_queue_ms, ev.heavy_queue_ms, ev.total_ms
    )
    result = PlanResult(
        policy=policy,
        objective=objective,
        threshold=round(threshold, 4),
        heavy_fraction=round(heavy_fraction, 4),
        light_batch=ch.b1,
        heavy_batch=ch.b2,
        light_workers=ch.x1,
        heavy_workers=ch.x2,
        feasible=feasible,
        latency=lat,
        estimated_quality=quality,
        objective_value=objective_value,
        light_share=light_share,
        demand_qps=problem.demand,
        light_demand_qps=problem.light_demand,
        workers=problem.workers,
        slo_ms=slo,
        solve_ms=solve_ms,
        min_light_workers=mins[0],
        min_heavy_workers=mins[1],
        role_changes=count_changes(current, roles),
        roles=roles,
        notes=notes,
        plan_ms=plan_ms,
        target_threshold=quality_threshold(profile),
    )
    result.reason = explain(result, problem.min_light)
    return result


def explain(result: PlanResult, light_floor: int) -> str:
    """The plan's trade-offs in words (Plan.reason); ``light_floor``: the fewest light workers it had to keep."""
    parts = []
    if not result.feasible:
        parts.append("demand exceeds capacity even at the lowest threshold: maximum-throughput plan")
    target = result.target_threshold
    if result.heavy_workers and target is not None and result.threshold < target - 1e-9 and result.heavy_fraction == 0:
        parts.append(
            f"t={result.threshold:g} < the cascade's {target:g}: {result.heavy_workers} heavy x{result.heavy_batch} "
            f"carry {100 * (1 - result.light_share):.0f} % of {result.demand_qps:.1f} q/s"
        )
    if result.light_workers:
        needed = f"{result.light_workers} light x{result.light_batch} for {result.light_demand_qps:.1f} q/s"
        if light_floor >= 2 and result.light_workers == light_floor:
            needed += f" (a floor of {light_floor} light workers)"
        parts.append(needed)
    return "; ".join(parts)


# ----------------------------------------------------------------------------- CLI
def _table(result: PlanResult, quality: QualityCurve | None = None) -> str:
    lat = result.latency
    q = "-" if result.estimated_quality is None else f"{result.estimated_quality:.2f}"
    if quality is not None and result.estimated_quality is not None:  # say what the number is
        q = f"{quality.metric.upper()} {q} ({'lower' if quality.lower_is_better else 'higher'} is better)"
    rows = [
        ("policy / objective", f"{result.policy} / {result.objective}"),
        ("feasible", str(result.feasible)),
        (
            "threshold",
            f"{result.threshold:.2f}"
            + (f"  (heavy fraction {result.heavy_fraction:.2f})" if result.heavy_fraction else ""),
        ),
        ("light share", f"{result.light_share:.3f}   estimated quality {q}"),
        ("light workers x batch", f"{result.light_workers} x {result.light_batch}"),
        ("heavy workers x batch", f"{result.heavy_workers} x {result.heavy_batch}"),
        ("latency light/disc/heavy", f"{lat.light_ms:.0f} / {lat.discriminator_ms:.0f} / {lat.heavy_ms:.0f} ms"),
        ("queue light/heavy", f"{lat.light_queue_ms:.0f} / {lat.heavy_queue_ms:.0f} ms"),
        ("total / SLO", f"{lat.total_ms:.0f} / {result.slo_ms:.0f} ms"),
        ("demand / workers", f"{result.demand_qps:g} qps / {result.workers}"),
        ("solve", f"{result.solve_ms:.1f} ms"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join([f"{k:<{width}}  {v}" for k, v in rows] + [f"note: {n}" for n in result.notes])


def plan_main(argv: list[str] | None = None) -> None:
    """``diffserve plan``: print the plan the solver would choose, without Redis."""
    from common.cascades import CASCADES, DEFAULT_CASCADE
    from common.profiles import DEFAULT_HARDWARE, HARDWARE, load_cascade_profile

    p = argparse.ArgumentParser(prog="diffserve plan", description=plan_main.__doc__)
    p.add_argument("--demand", type=float, required=True, help="queries per second")
    p.add_argument("--workers", type=int, required=True, help="workers (GPUs)")
    p.add_argument("--cascade", default=DEFAULT_CASCADE, choices=sorted(CASCADES))
    p.add_argument("--hardware", default=DEFAULT_HARDWARE, choices=sorted(HARDWARE))
    p.add_argument(
        "--objective",
        default=None,
        choices=OBJECTIVES,
        help="default: quality where the cascade has a quality curve, else threshold",
    )
    p.add_argument("--policy", default="diffserve", choices=POLICIES)
    p.add_argument("--slo-ms", type=float, default=None, help="default: the cascade's")
    p.add_argument(
        "--light-demand", type=float, default=None, help="demand the light stage is provisioned for (default: --demand)"
    )
    p.add_argument(
        "--fixed-plan",
        default=None,
        metavar="t=0.02,light=4x16,heavy=12x4",
        help="evaluate this plan as given (workers x batch) instead of solving",
    )
    p.add_argument(
        "--latency-scale",
        type=float,
        default=1.0,
        help="multiply every profiled latency (time-scaled runs; scale --slo-ms too)",
    )
    p.add_argument("--latency-file", default=None, help="own batch-latency table")
    p.add_argument("--curve-file", default=None, help="own f(t) curve")
    p.add_argument("--solver", default="milp", choices=("milp", "enumerate"))
    p.add_argument("--json", action="store_true", help="print JSON")
    args = p.parse_args(argv)
    try:
        profile = load_cascade_profile(
            args.cascade, args.hardware, latency_file=args.latency_file, curve_file=args.curve_file, slo_ms=args.slo_ms
        )
    except ValueError as exc:
        raise SystemExit(f"diffserve plan: {exc}") from None
    try:
        fixed = FixedPlan.parse(args.fixed_plan) if args.fixed_plan else None
    except ValueError as exc:
        raise SystemExit(f"diffserve plan: {exc}") from None
    result = plan(
        profile,
        args.demand,
        args.workers,
        policy=args.policy,
        objective=args.objective,
        slo_ms=args.slo_ms,
        latency_scale=args.latency_scale,
        light_demand_qps=args.light_demand,
        fixed=fixed,
        solver=args.solver,
    )
    if args.json:
        body = result.to_dict()
        body.pop("roles", None)
        json.dump(body, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(_table(result, profile.quality))


if __name__ == "__main__":
    plan_main()
