"""The controller's decisions, without Redis: demand estimation, threshold smoothing and the
hysteresis on role changes.  ``services/controller.py`` feeds it measurements from Redis and
stores what it decides; ``diffserve simulate`` feeds it the simulated cluster's state, so both
run the very same control law.

Each tick (:meth:`ControlLoop.decide`):

1. demand D: an EWMA of the jobs counter's per-tick rate that follows a rise quickly and a fall
   slowly, but no longer than two quiet ticks (common/demand.py); the light stage is provisioned
   for the larger of D and the rate the last ``peak_window_s`` exceeded for ``peak_share`` of their
   length (half of it: the light stage does not shrink below what the load needs half the time);
   one light worker is enough wherever that carries it: between ticks the controller watches the light
   queue, and a burst that one cannot absorb gets heavy workers moved to the light stage within
   seconds (:meth:`ControlLoop.burst`), so no light worker is held back for bursts that may not come;
   and between ticks a step of the load nudges the threshold within seconds (:meth:`ControlLoop.watch`:
   a step down from the cascade's threshold when the heavy stage is sent more than it runs, back up to it
   when the heavy stage has room to spare), where a tick's replay of the minutes before would lag;
2. the threshold moves at most ``max_threshold_step`` per tick from the plan in force, and may rise up to
   ``max_threshold_rise`` while nothing waits for a heavy worker (smoothing; ``shift_threshold_step`` in
   the direction the load moved once it has moved to another level, and freely while the loop's own
   measurements are shorter than ``hindsight_min_s``); it leaves that window only when nothing inside it
   is feasible;
3. solve twice: freely, and keeping every worker's current role; the free plan's role changes are
   applied only when they matter (hysteresis): when the current allocation cannot serve the demand,
   or when the free plan's threshold differs from the keep-roles plan's by more than
   ``threshold_margin`` or its light/heavy split by more than ``worker_margin_share`` of the workers
   (rounded down: one worker matters in a small cluster), and then
   only if the workers to switch reload their model well within an interval and two consecutive
   ticks propose the same move; such a move is taken in steps of at most ``max_switch_fraction``
   of the workers per tick.  Switching workers serve nothing while they load: the work they would
   have done is added to the backlog of the stage they join and the plan is solved again with it;
4. for the roles chosen, the threshold and batch sizes are re-chosen by replaying the last
   ``hindsight_s`` of arrivals through the simulator's model (common/hindsight.py); until there are
   ``hindsight_min_s`` of them the cascade's preferred threshold is kept where the solver fitted a lower
   one to the heavy stage (the exchange rations what it cannot run).

``static`` plans once (the ``fixed_plan`` given, else the solver's plan for ``static_demand`` or,
without one, for the first demand measured) and keeps that plan; only workers that appear or
disappear are (re)assigned.

About 700 lines on purpose: the whole control law in one place, so that the controller
service and the simulator cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from common.demand import RateEstimator, RecurringPeak
from common.hindsight import hold_preferred, rechoose, set_threshold
from common.messages import Objective, Plan, Role
from common.planner import (
    DEFAULT_HEADROOM,
    ROLES,
    AimdState,
    FixedPlan,
    OptionKind,
    PlanResult,
    Policy,
    QueueStats,
    count_changes,
    explain,
    plan,
    policy_spec,
)
from common.profiles import BATCH_GRID, CascadeProfile
from common.replay import HOP_MS, ArrivalHistory, relevel
from common.routing import below_target

# The role-switch time assumed for a worker that has not switched yet while no other worker has either
# (unscaled seconds).
DEFAULT_SWITCH_S = 5.0
# A plan fixed before the load is seen cannot add a light worker in a burst: in clusters of four or more it
# keeps two.
FIXED_LIGHT_RESERVE, LIGHT_RESERVE_FROM = 2, 4
# The controller keeps two light workers where a one-worker move is inside the role hysteresis
# (worker_margin_share: ten workers and more): the second costs a heavy worker that a quiet phase does not
# need, and the next burst meets two light workers instead of waiting for a move; over trace seeds 0-7 at 12
# and 16 workers the bursty trace 0.014-0.018 better, the step trace within 0.004.
LIGHT_RESERVE = 2
WATCH_S = 0.25  # how often the controller looks at the worker set and the light queue between ticks (wall s)
SHIFT_RATIO = 1.5  # the load moved to another level: the median rate of the last ticks differs this much
# Between ticks, a threshold below the cascade's goes back up once the arrival rate would fill at most this share
# of the heavy stage at the cascade's threshold (ControlLoop.heavy_room)
ROOM_SHARE = 0.5


class ControlReason(enum.StrEnum):
    """Why a tick's plan has the roles it has (the hysteresis on role changes)."""

    NO_ROLE_CHANGE = "no role change"
    FIRST_PLAN = "first plan"
    POLICY_CHANGED = "policy changed"
    FIXED_REASSIGNED = "fixed plan: workers (re)assigned"
    MUST_CHANGE = "current allocation cannot serve demand"
    WITHIN_MARGINS = "within margins: roles kept"
    SLOW_SWITCH = "switch slower than half an interval: roles kept"
    PROPOSED = "change proposed: confirming next interval"
    CONFIRMED = "plan moved beyond margins (confirmed)"
    LEVEL_SHIFT = "the load moved to another level: roles follow without a confirming tick"
    PARTIAL_INFEASIBLE = "partial move infeasible: roles kept"
    SWITCH_COST = "switch cost makes the change infeasible: roles kept"
    BURST = "burst: the light stage cannot absorb it, light workers added between ticks"
    HEAVY_PRESSURE = "heavy pressure: the heavy stage is sent more than it runs, threshold a step down between ticks"
    HEAVY_ROOM = "heavy room: the heavy stage has room at the cascade's threshold, threshold back up between ticks"

    @property
    def deferred(self) -> bool:
        """A role change the free plan wanted was not made (yet)."""
        return self in _DEFERRED


_DEFERRED = frozenset(
    {
        ControlReason.WITHIN_MARGINS,
        ControlReason.SLOW_SWITCH,
        ControlReason.PROPOSED,
        ControlReason.PARTIAL_INFEASIBLE,
        ControlReason.SWITCH_COST,
    }
)


class Watch(enum.StrEnum):
    """What the controller sees between ticks that the plan in force does not carry (ControlLoop.watch)."""

    BURST = "burst"  # the light stage cannot keep up: heavy workers move to it (ControlLoop.burst)
    HEAVY_PRESSURE = "heavy pressure"  # at the cascade's threshold the heavy stage is sent more than it runs
    HEAVY_ROOM = "heavy room"  # below that threshold, and at it the heavy stage would run half empty


_NUDGES = {Watch.HEAVY_PRESSURE: ControlReason.HEAVY_PRESSURE, Watch.HEAVY_ROOM: ControlReason.HEAVY_ROOM}


@dataclass(frozen=True)
class Why:
    """A tick's reason, and what follows it in the log (a partial move's steps, the hindsight replay)."""

    reason: ControlReason
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.reason}{self.detail}"


@dataclass(frozen=True, kw_only=True)
class _Tick:
    """What one tick decides from."""

    demand: float
    current: dict[str, str]  # worker id -> its role now
    switch_s: dict[str, float]
    ready_s: dict[str, float]  # worker id -> when it could serve another role: its batch, then its switch
    queues: QueueStats
    stored: Plan | None
    aimd: AimdState | None

    @classmethod
    def of(
        cls, demand: float, workers: list[WorkerView], queues: QueueStats, stored: Plan | None, aimd: AimdState | None
    ) -> _Tick:
        return cls(
            demand=demand,
            current={w.worker_id: w.role for w in workers},
            switch_s={w.worker_id: w.switch_s for w in workers},
            ready_s={w.worker_id: w.busy_s + w.switch_s for w in workers},
            queues=queues,
            stored=stored,
            aimd=aimd,
        )

    def flipping(self, plan: PlanResult) -> list[str]:
        """The workers ``plan`` moves from the role they have."""
        return [w for w, r in plan.roles.items() if self.current.get(w) in ROLES and self.current[w] != r]


@dataclass
class WorkerView:
    worker_id: str
    role: str  # current role: the planned one if it is in the stored plan, else the reported one
    switch_s: float
    busy_s: float = 0.0  # until the batch it is running ends (0: idle): a switch starts after it


def switch_estimates(measured: Mapping[str, float], default_s: float) -> dict[str, float]:
    """Each worker's role-switch time: its last measured one, else the median of its peers' (the same models on
    the same kind of GPU: a worker that has not switched yet has none of its own), else ``default_s``.  With the
    default for every worker that had not switched, a burst moved the one worker that had switched once (0.4 s
    against 5 s assumed) even while another heavy worker was idle and it ran a batch for 1.5 s more."""
    known = sorted(s for s in measured.values() if s > 0)
    fallback = known[len(known) // 2] if known else default_s
    return {w: s if s > 0 else fallback for w, s in measured.items()}


@dataclass(kw_only=True)
class ControlSettings:
    """The control law's knobs; every time is in the controller's (wall-clock) seconds."""

    policy: Policy = Policy.DIFFSERVE
    objective: Objective | None = None  # None: quality where the cascade has a quality curve
    slo_ms: float
    latency_scale: float = 1.0
    interval_s: float = 10.0
    batch_grid: tuple[int, ...] = BATCH_GRID
    ewma_alpha: float = 0.5
    ewma_alpha_down: float = 0.2
    peak_window_s: float = 300.0  # the light stage's floor (RecurringPeak) is taken over this much history
    peak_share: float = 0.5  # ... as the rate exceeded for this share of it
    hindsight_s: float = 120.0  # replay this much of the recent arrivals to pick t and batches (0: off)
    hindsight_min_s: float = 20.0  # ... once there is this much history
    hindsight_halflife_s: float = 30.0  # ... scoring recent seconds more: their weight halves with this age
    hindsight_max_jobs: int = 4000  # ... and at most this many of the latest arrivals
    hindsight_draws: int = 3  # ... each scored on this many confidence draws
    hindsight_tie: float = 0.005  # ... a plan must beat the solver's (or the better one) by this much quality
    hindsight_keep: bool = True  # ... the plan in force is the one to beat
    hop_ms: float = HOP_MS  # ... each service's CPU per batch, in this clock
    traffic_settle_s: float = 2.0  # after an idle tick, re-plan this long after traffic starts
    # Between ticks, a burst the light stage of the plan in force cannot absorb (a new arrival would wait
    # more than ``burst_wait_share`` of the SLO for a light worker) is planned for at once, at the arrival
    # rate of the last ``burst_window_s``, at most once per such window (ControlLoop.burst)
    burst_wait_share: float = 0.25
    burst_window_s: float = 2.0
    shift_ticks: int = 4  # ... re-leveled when the median rate of this many ticks moved (a shorter burst does not)
    max_threshold_step: float = 0.02
    shift_threshold_step: float = 0.1  # ... and once the load has moved to another level (level_shift)
    # ... and up to this far up while nothing waits for a heavy worker: with the exchange
    # (common/routing.exchange_for) a threshold above what the heavy stage can carry costs light answers for
    # easier prompts only, one below it costs heavy answers
    max_threshold_rise: float = 0.1
    threshold_margin: float = 0.05
    worker_margin_share: float = 0.1
    max_switch_fraction: float = 0.25
    spare_util: float = 0.5
    headroom: float = DEFAULT_HEADROOM
    look_ahead: bool = False  # plan for the demand extrapolated one interval while it rises
    drain_intervals: float = 2.0  # a backlog is planned to drain within this many intervals
    # while the threshold is below the cascade's target, a heavy worker that read fewer jobs than its batch
    # waits up to this long for more (Plan.heavy_fill_ms; 0: never): over four trace seeds at 4, 8 and 16
    # workers the step trace 0.04-0.11 better, the bursty one within 0.02 (docs/evaluation.md)
    heavy_fill_ms: float = 400.0
    # the discriminator holds the light share of the plan's threshold over this window of decisions
    # (Plan.share_window_ms, common/routing.ShareKeeper; 0: off; a fixed plan keeps its threshold): the quality
    # estimate's window (common/quality.QUALITY_WINDOW_S, the paper's per-window FID). Over eight step-trace seeds
    # at 24 workers it beats every fixed threshold (docs/evaluation.md)
    share_window_s: float = 5.0
    fixed_plan: FixedPlan | None = None
    static_demand: float | None = None


def _reason(result: PlanResult, why: Why, light_floor: int) -> str:
    """Plan.reason: the plan's trade-offs, then why it has these roles."""
    return "; ".join(part for part in (explain(result, light_floor), str(why)) if part)


def _sign(x: float) -> int:
    return int(x > 1e-9) - int(x < -1e-9)


def _same_move(move: tuple[int, int, int], proposal: tuple[int, int, int] | None) -> bool:
    """Whether a tick proposes the move the tick before proposed: the same role direction, whichever way its
    threshold goes (the threshold's direction is relative to the plan in force, which a nudge between the
    ticks moves: on the bursty trace at 4 workers the move back to one light worker after a burst was
    proposed tick after tick, seeds 0-7: 18.305 -> 18.262); a move of no worker, by all its directions."""
    if proposal is None:
        return False
    return move[0] == proposal[0] if move[0] != 0 else move == proposal


def static_plan(profile: CascadeProfile, demand: float, workers: int, settings: ControlSettings) -> FixedPlan:
    """The fixed plan ``static`` keeps: the solver's plan for ``demand`` on ``workers`` workers (the
    load tester and the simulator pass a trace's mean demand)."""
    result = plan(
        profile,
        demand,
        workers,
        policy=Policy.STATIC,
        objective=settings.objective,
        batch_grid=tuple(sorted(settings.batch_grid)),
        slo_ms=settings.slo_ms,
        latency_scale=settings.latency_scale,
        headroom=settings.headroom,
        spare_util=settings.spare_util,
        current={f"w{i}": "" for i in range(workers)},
        light_floor=FIXED_LIGHT_RESERVE if workers >= LIGHT_RESERVE_FROM else 1,
    )
    return FixedPlan(
        threshold=result.threshold,
        light_workers=result.light_workers,
        light_batch=result.light_batch,
        heavy_workers=result.heavy_workers,
        heavy_batch=result.heavy_batch,
    )


class ControlLoop:
    def __init__(self, profile: CascadeProfile, settings: ControlSettings):
        self.profile, self.cfg = profile, settings
        self.spec = policy_spec(settings.policy)
        self.demand = RateEstimator(settings.ewma_alpha, alpha_down=settings.ewma_alpha_down)
        self.peak = RecurringPeak(settings.peak_window_s, settings.peak_share)
        self.proposal: tuple[int, int, int] | None = None  # a role change seen once, awaiting confirmation
        self.fixed = settings.fixed_plan if self.spec.fixed else None
        self.heavy_has_room = False  # at the last tick nothing waited for a heavy worker (threshold_steps)
        self.burst_tried_at = -math.inf  # between ticks (watch): the last try at a burst plan
        self.nudged_at = -math.inf  # ... and the last threshold nudge
        self.burst_moved: set[str] = set()  # the workers burst plans moved to the light stage (_move gives them back)

    @property
    def idle(self) -> bool:
        """The last tick measured no demand: the first arrivals after it are planned for
        ``traffic_settle_s`` after they start, not an interval later (the plan for no demand is the
        cascade's threshold for low demand, which a busy small cluster cannot carry)."""
        return self.demand.smoothed == 0.0

    def observe(self, jobs_added: int, at_s: float) -> float:
        """Feed the jobs counter; returns the demand to plan for."""
        self.demand.update(jobs_added, at_s)
        if self.demand.raw is not None:
            self.peak.update(self.demand.raw, at_s, self.demand.span)
        return self.demand.forecast() if self.cfg.look_ahead else self.demand.smoothed

    def solve(
        self,
        demand: float,
        current: Mapping[str, str],
        queues: QueueStats,
        stored: Plan | None,
        *,
        keep_roles: bool = False,
        aimd: AimdState | None = None,
        ready_s: dict[str, float] | None = None,
    ) -> PlanResult:
        window = None
        center = self.smoothed_from(stored, current)
        if center is not None:
            down, up = self.threshold_steps()
            window = (center - down, center + up)
        result = plan(
            self.profile,
            demand,
            len(current),
            policy=self.cfg.policy,
            objective=self.cfg.objective,
            batch_grid=tuple(sorted(self.cfg.batch_grid)),
            slo_ms=self.cfg.slo_ms,
            latency_scale=self.cfg.latency_scale,
            threshold_window=window,
            light_demand_qps=max(demand, self.peak.value),
            current=current,
            queues=queues,
            keep_roles=keep_roles,
            aimd=aimd,
            drain_s=self.cfg.drain_intervals * self.cfg.interval_s,
            headroom=self.cfg.headroom,
            spare_util=self.cfg.spare_util,
            ready_s=ready_s,
            fixed=self.fixed,
            light_floor=self.light_floor(len(current)),
        )
        result.fill_ms = self.cfg.heavy_fill_ms
        result.share_window_ms = 0.0 if self.spec.fixed else self.cfg.share_window_s * 1000.0
        return result

    def light_floor(self, workers: int) -> int:
        """The fewest light workers the solver keeps on ``workers``: LIGHT_RESERVE where a one-worker move is
        inside the role hysteresis, else 1 (a fixed plan has its own)."""
        if not self.spec.fixed and int(self.cfg.worker_margin_share * workers) >= 1:
            return LIGHT_RESERVE
        return 1

    def smoothed_from(self, stored: Plan | None, current: Mapping[str, str]) -> float | None:
        """The threshold (split policies: heavy fraction) the next plan stays within
        ``max_threshold_step`` of, or None when it may move freely: smoothing holds from a plan made
        for these same workers, under this policy, from a measured demand, except while the loop's own
        measurements cover less than ``hindsight_min_s`` (the first plans with traffic, a changed cluster
        and an idle spell re-plan freely)."""
        if (
            (self.peak.samples and self.peak.span_s < self.cfg.hindsight_min_s)
            or stored is None
            or not stored.roles
            or set(stored.roles) != set(current)
            or stored.policy != self.cfg.policy
            or stored.demand_qps <= 0
            or self.cfg.max_threshold_step >= 1
        ):
            return None
        return stored.heavy_fraction if self.spec.options == "split" else stored.threshold

    def level_shift(self) -> tuple[float, float] | None:
        """(ratio, seconds ago) when the load has moved to another level: the median arrival rate of the
        last ``shift_ticks`` ticks differs from the median of the earlier ticks in the replay's window by more
        than a factor SHIFT_RATIO.  Medians, so that a burst of a tick or two is no shift."""
        samples = list(self.peak.samples)
        if len(samples) < 2 * self.cfg.shift_ticks:
            return None
        recent, last_at = samples[-self.cfg.shift_ticks :], samples[-1][0]
        before = [rate for at, rate, _s in samples[: -self.cfg.shift_ticks] if at > last_at - self.cfg.hindsight_s]
        if len(before) < self.cfg.shift_ticks:
            return None
        new, old = statistics.median(r for _at, r, _s in recent), statistics.median(before)
        if old <= 0 or new <= 0 or 1 / SHIFT_RATIO <= new / old <= SHIFT_RATIO:
            return None
        # The shift began with the earliest of the latest ticks already nearer the new level than the old one,
        # which may be before the ``shift_ticks`` it is judged on: history from there on is at the new level
        # already, and releveled again it would replay a phantom burst (or lull).
        middle, rising = math.sqrt(new * old), new > old
        first = len(samples) - 1
        while first > 0 and (samples[first - 1][1] > middle) == rising:
            first -= 1
        started = samples[first][0] - samples[first][2]
        return new / old, last_at - started

    def threshold_steps(self) -> tuple[float, float]:
        """How far t may fall and rise this tick: a small step while the load holds its level (the replay of
        a few minutes is noisy, and a burst is the deadline rule's to carry), a larger one in the direction
        the load moved once it moved to another level (down when it rose, up when it fell), and up to
        ``max_threshold_rise`` while nothing waits for a heavy worker (the exchange makes a threshold set too
        high cheap and one too low not, and an idle heavy stage says t is too low)."""
        small, shift = self.cfg.max_threshold_step, self.level_shift()
        down = self.cfg.shift_threshold_step if shift is not None and shift[0] > 1 else small
        up = self.cfg.shift_threshold_step if shift is not None and shift[0] < 1 else small
        if self.heavy_has_room:
            up = max(up, self.cfg.max_threshold_rise)
        return down, up

    def with_switch_backlog(
        self, result: PlanResult, current: Mapping[str, str], switch_s: dict[str, float], demand: float
    ) -> dict[str, float] | None:
        """The jobs the switching workers' new stage receives for them while they load (their
        share of that stage's planned arrivals); None when nobody switches."""
        stage_qps = {"light": demand, "heavy": demand * (1.0 - result.light_share)}
        size = {"light": max(1, result.light_workers), "heavy": max(1, result.heavy_workers)}
        extra = {"light": 0.0, "heavy": 0.0}
        for w, role in result.roles.items():
            if current.get(w) in ROLES and current[w] != role:
                extra[role] += switch_s.get(w, 0.0) * stage_qps[role] / size[role]
        if not any(extra.values()):
            return None
        return extra

    def decide(
        self,
        stored: Plan | None,
        demand: float,
        workers: list[WorkerView],
        queues: QueueStats,
        aimd: AimdState | None = None,
        *,
        history: ArrivalHistory | None = None,
        now_ms: float = 0.0,
        confidences: Sequence[float] | None = None,
    ) -> tuple[PlanResult, Why]:
        """The plan to write and why (logged): :meth:`propose`, then :meth:`refine`."""
        result, why = self.propose(stored, demand, workers, queues, aimd)
        return result, self.refine(result, why, stored, history, now_ms, confidences)

    def refine(
        self,
        result: PlanResult,
        why: Why,
        stored: Plan | None,
        history: ArrivalHistory | None,
        now_ms: float,
        confidences: Sequence[float] | None = None,
    ) -> Why:
        """``result``'s threshold and batch sizes re-chosen by replaying the recent arrivals (``history``, in
        the caller's ms, up to ``now_ms``) when the policy plans a threshold for quality, and its reason.  The
        slow part of a tick, and it changes no state of the loop: the live controller runs it in a thread
        while it goes on watching for bursts (:meth:`burst`)."""
        if history is not None:
            hindsight = self.hindsight(result, stored, history, now_ms, confidences)
            if hindsight:
                why = dataclasses.replace(why, detail=f"{why.detail}; {hindsight}")
        if not self.fixed:
            result.reason = _reason(result, why, self.light_floor(len(result.roles)))
        return why

    def hindsight(
        self,
        result: PlanResult,
        stored: Plan | None,
        history: ArrivalHistory,
        now_ms: float,
        confidences: Sequence[float] | None = None,
    ) -> str:
        """Re-choose ``result``'s threshold and batch sizes for its roles by replaying the last
        ``hindsight_s`` of arrivals (common/hindsight.py); returns what it did ("" when it did not run)."""
        cfg, spec = self.cfg, self.spec
        if (
            cfg.hindsight_s <= 0
            or spec.options != OptionKind.THRESHOLD
            or spec.fixed
            or spec.aimd
            or not result.feasible
            or result.light_workers < 1
            or result.heavy_workers < 1
            or self.profile.quality is None
        ):
            return ""
        span_ms = cfg.hindsight_s * 1000.0
        arrivals = history.window(now_ms, span_ms)
        first = min(history.counts, default=None)
        covered_ms = now_ms - first * history.bucket_ms if first is not None else 0.0
        if covered_ms < cfg.hindsight_min_s * 1000.0 or len(arrivals) < 2:
            return hold_preferred(result, self.profile)
        shift = self.level_shift()
        if shift is not None:  # replay the history at the level the load has moved to
            ratio, age_s = shift
            arrivals = relevel(arrivals, span_ms - age_s * 1000.0, ratio)
        smoothed = self.smoothed_from(stored, result.roles)
        # The plan in force keeps ties (hysteresis: a replay of a few hundred jobs is noisy), when it was
        # made for these roles; else the solver's plan.
        same_roles = (
            smoothed is not None
            and stored is not None
            and (stored.light_workers, stored.heavy_workers) == (result.light_workers, result.heavy_workers)
        )
        return rechoose(
            result,
            arrivals[-cfg.hindsight_max_jobs :],
            profile=self.profile,
            settings=cfg,
            center=result.threshold if smoothed is None else smoothed,
            steps=(1.0, 1.0) if smoothed is None else self.threshold_steps(),
            keep=stored if same_roles and cfg.hindsight_keep else None,
            confidences=confidences,
        )

    def propose(
        self,
        stored: Plan | None,
        demand: float,
        workers: list[WorkerView],
        queues: QueueStats,
        aimd: AimdState | None = None,
    ) -> tuple[PlanResult, Why]:
        """The solver's plan under the hysteresis on roles, and why."""
        running = sum(w.role == Role.HEAVY for w in workers) * (stored.heavy_batch if stored else 1)
        self.heavy_has_room = queues.heavy_backlog <= running
        if (
            self.spec.fixed
            and self.cfg.fixed_plan is None
            and workers
            and (self.cfg.static_demand or demand > 0)
            and (self.fixed is None or self.fixed.light_workers + self.fixed.heavy_workers != len(workers))
        ):
            # Solved once for the cluster as it is; again only if workers join or leave.
            self.fixed = static_plan(self.profile, self.cfg.static_demand or demand, len(workers), self.cfg)
        tick = _Tick.of(demand, workers, queues, stored, aimd)
        new = self._solve(tick, tick.current)
        proposal, self.proposal = self.proposal, None  # kept only while a change awaits confirmation
        if not tick.current or new.role_changes == 0:
            return new, Why(ControlReason.NO_ROLE_CHANGE)
        if stored is None or stored.policy != self.cfg.policy:
            return new, Why(ControlReason.FIRST_PLAN if stored is None else ControlReason.POLICY_CHANGED)
        if self.fixed is not None:
            return new, Why(ControlReason.FIXED_REASSIGNED)
        keep = self._solve(tick, tick.current, keep_roles=True)
        if not keep.feasible:
            return self._with_switch_cost(tick, new, keep, tick.current, False, Why(ControlReason.MUST_CHANGE))
        reason = self._hysteresis(tick, new, keep, proposal)
        if reason.deferred:
            return keep, Why(reason)
        return self._move(tick, new, keep, reason)

    def watch(
        self, stored: Plan | None, rate_qps: float, light_backlog: int, heavy_backlog: int, now_s: float
    ) -> Watch | None:
        """Between ticks, what the plan in force does not carry at the arrival rate of the last
        ``burst_window_s`` (``rate_qps``): a burst the light stage cannot absorb, else a heavy stage sent
        more than it runs, else one with room to spare (None: the plan carries it).  At most one try at a
        burst per burst window, and one threshold nudge (a nudge waits while a burst was tried)."""
        if stored is None or self.spec.fixed or self.idle:
            return None
        window = self.cfg.burst_window_s
        if now_s - self.burst_tried_at < window:
            return None
        if self.light_pressure(stored, light_backlog, rate_qps):
            self.burst_tried_at = now_s
            return Watch.BURST
        if now_s - self.nudged_at < window:
            return None
        if self.heavy_pressure(stored, rate_qps, heavy_backlog):
            seen = Watch.HEAVY_PRESSURE
        elif self.heavy_room(stored, rate_qps, heavy_backlog):
            seen = Watch.HEAVY_ROOM
        else:
            return None
        self.nudged_at = now_s
        return seen

    def between_ticks(
        self, seen: Watch, stored: Plan, rate_qps: float, workers: list[WorkerView], queues: QueueStats
    ) -> tuple[PlanResult, Why] | None:
        """The plan for what :meth:`watch` saw: a burst's (:meth:`burst`) or the plan in force with its threshold
        nudged (:meth:`nudge`); None when none is needed or possible."""
        if seen == Watch.BURST:
            return self.burst(stored, rate_qps, workers, queues)
        return self.nudge(seen, stored, workers, queues)

    def light_pressure(self, stored: Plan | None, light_backlog: int, rate_qps: float) -> bool:
        """Whether the plan's light stage cannot keep up: the arrival rate of the last ``burst_window_s``
        (``rate_qps``) is above what it runs, or a job arriving now would wait more than
        ``burst_wait_share`` of the SLO for one of its workers (every query passes the light model)."""
        if stored is None or self.spec.fixed or stored.light_workers < 1:
            return False
        batch, light = max(1, stored.light_batch), self.profile.light
        if rate_qps > stored.light_workers * light.throughput_qps(batch) / self.cfg.latency_scale:
            return True
        # whole batches, not routing's mean wait: a partly filled batch still takes a batch's time (the mean
        # wait triggered later and scored worse on the bursty trace at 4 workers: 18.32 vs 18.23)
        rounds = math.ceil(light_backlog / (stored.light_workers * batch))
        return rounds * light.latency_ms(batch) * self.cfg.latency_scale > self.cfg.burst_wait_share * self.cfg.slo_ms

    def heavy_capacity_qps(self, stored: Plan) -> float:
        """Jobs a second the plan's heavy stage runs (full batches)."""
        batch = max(1, stored.heavy_batch)
        return stored.heavy_workers * self.profile.heavy.throughput_qps(batch) / self.cfg.latency_scale

    @staticmethod
    def _heavy_queue_beyond_batches(stored: Plan, heavy_backlog: int) -> bool:
        """More jobs wait for the heavy stage than one batch a heavy worker."""
        return heavy_backlog > stored.heavy_workers * max(1, stored.heavy_batch)

    def _nudges(self, stored: Plan) -> bool:
        return (
            self.spec.discriminator_routes
            and self.spec.degrade_late
            and stored.target_threshold is not None
            and stored.heavy_workers >= 1
        )

    def heavy_pressure(self, stored: Plan, rate_qps: float, heavy_backlog: int) -> bool:
        """Whether the plan holds the cascade's threshold while the arrival rate sends its heavy stage more than
        it runs and jobs wait beyond a batch a heavy worker: the load rose since the tick that found room for it
        (a step up), and the next tick is up to an interval away.  Both signs, not the rate alone: a few seconds'
        rate is noisy, and at four workers the rate alone squeezed on noise (bursty trace, seeds 0-7: 18.354
        against 18.335 with both).  Below the cascade's threshold the tick's replay has judged the load already."""
        if not self._nudges(stored) or below_target(stored.threshold, stored.target_threshold):
            return False
        if not self._heavy_queue_beyond_batches(stored, heavy_backlog):
            return False
        return rate_qps * self.profile.curve.f(stored.threshold) > self.heavy_capacity_qps(stored)

    def heavy_room(self, stored: Plan, rate_qps: float, heavy_backlog: int) -> bool:
        """Whether the plan's threshold is below the cascade's while nothing waits beyond a batch a heavy worker
        and, at the cascade's threshold, the arrival rate would fill at most ROOM_SHARE of the heavy stage: the
        load fell (a step down), and the tick's replay of minutes of busier history would raise the threshold
        a step at a time."""
        target = stored.target_threshold
        if not self._nudges(stored) or target is None or not below_target(stored.threshold, target):
            return False
        if self._heavy_queue_beyond_batches(stored, heavy_backlog):
            return False
        return rate_qps * self.profile.curve.f(target) < ROOM_SHARE * self.heavy_capacity_qps(stored)

    def nudge(
        self, seen: Watch, stored: Plan, workers: list[WorkerView], queues: QueueStats
    ) -> tuple[PlanResult, Why] | None:
        """The plan in force (roles and batches) with its threshold a ``max_threshold_step`` down (heavy
        pressure: below the cascade's threshold the heavy batch fill turns on, common/routing.heavy_fill_ms) or
        up to ``max_threshold_rise`` up, at most to the cascade's threshold (heavy room); the next tick's
        smoothing goes on from there."""
        target = stored.target_threshold or 1.0
        if seen == Watch.HEAVY_PRESSURE:
            threshold = max(0.0, stored.threshold - self.cfg.max_threshold_step)
        else:
            threshold = min(target, stored.threshold + self.cfg.max_threshold_rise)
        tick = _Tick.of(stored.demand_qps, workers, queues, stored, None)
        result = self._solve(tick, tick.current, keep_roles=True)
        if not result.feasible or not result.roles:
            return None
        set_threshold(result, self.profile, round(threshold, 6))
        result.light_batch, result.heavy_batch = stored.light_batch, stored.heavy_batch
        why = Why(_NUDGES[seen])
        result.reason = _reason(result, why, self.light_floor(len(result.roles)))
        return result, why

    def burst(
        self, stored: Plan, rate_qps: float, workers: list[WorkerView], queues: QueueStats
    ) -> tuple[PlanResult, Why] | None:
        """Between ticks, under light pressure: the plan for the larger of the demand and ``rate_qps`` (the
        arrival rate of the last ``burst_window_s``) with the fewest heavy workers moved to the light stage,
        when the current roles cannot carry it and such a move can; None otherwise.  No confirmation (a
        burst of seconds does not wait an interval), the threshold within a tick's step of the plan in force,
        and the demand estimate and hysteresis untouched: the next tick judges whether the workers stay."""
        tick = _Tick.of(max(self.demand.smoothed, rate_qps), workers, queues, stored, None)
        keep = self._solve(tick, tick.current, keep_roles=True)
        if keep.feasible:
            return None
        roles = dict(tick.current)
        heavy = sorted((w for w, r in roles.items() if r == Role.HEAVY), key=lambda w: tick.ready_s.get(w, 0.0))
        for w in heavy[:-1]:  # the fewest heavy workers, ready soonest, that make it feasible; one heavy stays
            roles[w] = Role.LIGHT
            result = self._solve(tick, roles, keep_roles=True)
            if result.feasible:
                self.burst_moved |= {w for w in roles if roles[w] != tick.current.get(w)}
                result.role_changes = count_changes(tick.current, result.roles)
                result, why = self._with_switch_cost(tick, result, keep, roles, True, Why(ControlReason.BURST))
                result.reason = _reason(result, why, self.light_floor(len(result.roles)))
                return result, why
        return None

    def _solve(self, tick: _Tick, roles: dict[str, str], *, keep_roles: bool = False) -> PlanResult:
        return self.solve(
            tick.demand, roles, tick.queues, tick.stored, keep_roles=keep_roles, aimd=tick.aimd, ready_s=tick.ready_s
        )

    def _hysteresis(
        self, tick: _Tick, new: PlanResult, keep: PlanResult, proposal: tuple[int, int, int] | None
    ) -> ControlReason:
        """Why the current roles stay though they could carry the demand (a deferred reason), or why the free
        plan's move goes on.  A move must differ from the keep-roles plan beyond the margins, its workers must
        switch fast enough, and (noise damping) two consecutive ticks must propose it before workers reload
        models, unless it follows a level shift: the medians of several ticks (level_shift) have confirmed the
        load already, and a step down would otherwise hold the light workers of the busy level a tick longer
        (step trace at 4 workers, seeds 0-3: the move 10 s sooner, 18.899 -> 18.861)."""
        differs = (
            abs(new.threshold - keep.threshold) > self.cfg.threshold_margin + 1e-9
            or abs(new.heavy_fraction - keep.heavy_fraction) > self.cfg.threshold_margin + 1e-9
            or abs(new.light_workers - keep.light_workers) > int(self.cfg.worker_margin_share * len(tick.current))
        )
        if not differs:
            return ControlReason.WITHIN_MARGINS
        if any(tick.switch_s.get(w, 0.0) > self.cfg.interval_s / 2 for w in tick.flipping(new)):
            return ControlReason.SLOW_SWITCH
        move = (
            _sign(new.light_workers - keep.light_workers),
            _sign(new.threshold - keep.threshold),
            _sign(new.heavy_fraction - keep.heavy_fraction),
        )  # the direction, not the exact plan
        self.proposal = move  # once confirmed, the next tick may continue the same move without waiting
        shift = self.level_shift()
        if shift is not None and move[0] != 0 and (move[0] > 0) == (shift[0] > 1):
            return ControlReason.LEVEL_SHIFT  # more light workers for a rise, fewer for a fall
        return ControlReason.CONFIRMED if _same_move(move, proposal) else ControlReason.PROPOSED

    def _move(self, tick: _Tick, new: PlanResult, keep: PlanResult, why: ControlReason) -> tuple[PlanResult, Why]:
        """A confirmed move the current roles can live with, taken in steps of at most
        ``max_switch_fraction`` of the workers (fastest switchers first), so a burst does not swing the
        whole cluster between models; workers a burst plan moved to the light stage go back in one step, as
        they came (stepped, a 4-worker cluster held a burst's third light worker a tick longer: bursty trace,
        seeds 0-7, 18.278 -> 18.264)."""
        flipping = tick.flipping(new)
        step = max(1, math.ceil(self.cfg.max_switch_fraction * len(tick.current)))
        self.burst_moved &= {w for w, r in tick.current.items() if r == Role.LIGHT}  # those still light
        if flipping and all(w in self.burst_moved and new.roles[w] == Role.HEAVY for w in flipping):
            step = len(flipping)
        if len(flipping) <= step:
            return self._with_switch_cost(tick, new, keep, tick.current, False, Why(why))
        partial = dict(tick.current)
        for w in sorted(flipping, key=lambda w: tick.ready_s.get(w, 0.0))[:step]:
            partial[w] = new.roles[w]
        partial_plan = self._solve(tick, partial, keep_roles=True)
        if not partial_plan.feasible:
            return keep, Why(ControlReason.PARTIAL_INFEASIBLE)
        partial_plan.solve_ms += new.solve_ms
        partial_plan.role_changes = count_changes(tick.current, partial_plan.roles)
        moved = Why(why, f", {step} of {len(flipping)} role changes this tick")
        return self._with_switch_cost(tick, partial_plan, keep, partial, True, moved)

    def _with_switch_cost(
        self, tick: _Tick, new: PlanResult, keep: PlanResult, target: dict[str, str], stepped: bool, why: Why
    ) -> tuple[PlanResult, Why]:
        """The plan solved again (from ``target``'s roles) with the jobs that queue up while the switching
        workers load added to its stages' backlog."""
        extra = self.with_switch_backlog(new, tick.current, tick.switch_s, tick.demand)
        if not extra:
            return new, why
        loaded = dataclasses.replace(
            tick.queues,
            light_backlog=tick.queues.light_backlog + round(extra["light"]),
            heavy_backlog=tick.queues.heavy_backlog + round(extra["heavy"]),
        )
        again = self.solve(
            tick.demand, target, loaded, tick.stored, keep_roles=stepped, aimd=tick.aimd, ready_s=tick.ready_s
        )
        again.role_changes = count_changes(tick.current, again.roles)
        if again.feasible and again.role_changes:
            again.solve_ms += new.solve_ms
            return again, why
        if keep.feasible and not again.feasible:
            return keep, Why(ControlReason.SWITCH_COST)
        return new, why
