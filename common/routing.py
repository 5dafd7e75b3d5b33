"""The data plane's decisions, as pure functions: where a job goes next and whether the heavy
model can still answer it in time.  The router (direct routing), the discriminator (the
cascade's routing), the heavy worker (its last check before a batch) and the simulator
(``diffserve simulate``) all call these, so a decision means the same everywhere.

The deadline rule, the one estimator of "late" (:class:`Stage`): a job joining the heavy queue
behind ``backlog`` jobs, with ``workers`` heavy workers taking up to ``batch`` jobs, runs in a
batch of ``n = min(batch, ceil((backlog + 1) / workers))`` (what a worker finds: a full batch under
load, fewer when the queue is short) taking ``e(n)``; it starts after the backlog has been served
at the stage's capacity and finishes one batch time later::

    finish = now + backlog · e(n) / (workers · n) + e(n)

It is on time when ``finish <= deadline``.  A worker about to start a batch uses the same rule
with no backlog ahead of it and its own batch.  ``e`` is :func:`batch_times`: the profiled batch
latency in the deployment's clock (a worker uses its measured time once it has one).  A late job may
take the place of an easier one still waiting in the heavy queue (:func:`exchange_for`), so a heavy
stage that is short runs the hardest prompts.

The batch fill (:func:`heavy_fill_ms`, :func:`fill_until_ms`): while the plan lowered the threshold for the
heavy stage's capacity, a heavy worker that reads fewer jobs than the plan's batch waits a moment for more
before it runs them, never so long that a full batch would miss the earliest deadline.  A batch of two costs
little more than one (SD v1.5 on the A100 table: 2160 against 1780 ms, 0.93 against 0.56 jobs/s a worker),
and a short heavy stage otherwise runs batches of one whenever its queue runs dry between the
discriminator's batches.

The share keeper (:class:`ShareKeeper`): the plan's threshold stands for a light share (the quality curve is a
function of it, and the plan sized the heavy stage for the rest), but a run of confident or hard prompts moves
the share a fixed threshold gives from one 5-s window to the next.  The discriminator holds the share the plan's
threshold gives its recent confidences over the last ``Plan.share_window_ms`` of decisions: each job's threshold
makes up what the window answered light above or below that share.
"""

from __future__ import annotations

import bisect
import enum
import functools
import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from common.config import Settings, option
from common.messages import LightReason, Plan
from common.profiles import CascadeProfile


class Decision(enum.StrEnum):
    LIGHT = "light"  # the light image is the answer
    HEAVY = "heavy"  # on to the heavy model
    LATE = "late"  # the heavy model cannot make the deadline: the light image, marked degraded


def queue_wait_ms(backlog: int, workers: int, batch: int, batch_ms: float, joining_ms: Sequence[float] = ()) -> float:
    """Expected wait before a job that joins a stage's queue now starts (ms): the ``backlog`` ahead of it served
    by ``workers`` workers, ``batch`` jobs each per ``batch_ms``, and by one more from each of ``joining_ms`` (ms
    from now) on; inf without any worker."""
    job_ms = batch_ms / max(1, batch)  # a worker's time per job (0 for a stage that takes none)
    left, at_ms, serving = float(max(0, backlog)), 0.0, workers
    for joins_ms in sorted(joining_ms):
        span = max(0.0, joins_ms - at_ms)
        if serving > 0 and left * job_ms <= serving * span:
            break  # the queue ahead is gone before this worker joins
        if serving > 0:
            left -= serving * span / job_ms
        at_ms, serving = at_ms + span, serving + 1
    if serving <= 0:
        return math.inf
    return at_ms + left * job_ms / serving


def joining_ms(
    role: str, planned: Mapping[str, str], workers: Iterable[tuple[str, str, float, float]], now_ms: float
) -> tuple[float, ...]:
    """ms from ``now_ms`` until each worker the plan (``planned``: worker id -> role) moves into ``role``'s stage
    serves it: the batch it runs ends, then it loads the model in its last measured switch time.  ``workers``:
    (id, the role it reports, its last switch in s, when its batch ends in ms), on the caller's clock.  A
    worker that never switched (no measured time) is not counted."""
    return tuple(
        max(0.0, busy_until_ms - now_ms) + switch_s * 1000.0
        for worker_id, reported, switch_s, busy_until_ms in workers
        if planned.get(worker_id) == role and reported not in (role, "") and switch_s > 0
    )


def finishes_in_time(
    now_ms: float, deadline_ms: float, queue_wait_ms: float, batch_ms: float, skew_ms: float = 0.0
) -> bool:
    """The deadline rule: starting after ``queue_wait_ms`` and taking ``batch_ms``, is it done by the deadline?
    ``skew_ms``: how far this host's clock may lag the one that set the deadline (DIFFSERVE_CLOCK_SKEW_MS)."""
    return now_ms + skew_ms + queue_wait_ms + batch_ms <= deadline_ms


def below_target(threshold: float, target_threshold: float | None) -> bool:
    """Whether a plan's threshold is below the cascade's target (lowered for the heavy stage's capacity: the heavy
    stage limits quality).  The batch fill, the share keeper, the light reasons and the controller's nudges
    turn on it."""
    return target_threshold is not None and threshold < target_threshold - 1e-9


def heavy_fill_ms(threshold: float, target_threshold: float | None, heavy_batch: int, fill_ms: float) -> float:
    """How long a heavy worker holding a short batch may wait for more jobs under a plan (0: it runs what it
    read): ``fill_ms`` while the threshold is below the cascade's target (the heavy stage is what limits
    quality, so its capacity is worth a wait) and the batch has room for more than one; else 0 (the stage has
    room: a wait would only add latency)."""
    if heavy_batch <= 1 or not below_target(threshold, target_threshold):
        return 0.0
    return max(0.0, fill_ms)


def fill_until_ms(first_ms: float, deadlines_ms: Sequence[float], full_batch_ms: float, fill_ms: float) -> float:
    """When a heavy worker that read its first jobs at ``first_ms`` stops waiting for more and runs what it has:
    ``fill_ms`` later, or sooner where a full batch started later would miss the earliest deadline."""
    return min(first_ms + fill_ms, min(deadlines_ms, default=math.inf) - full_batch_ms)


def batch_times(profile: CascadeProfile, role: str, latency_scale: float) -> Callable[[int], float]:
    """ms for a batch of n on ``role``'s model (light, heavy, discriminator): the profile in the
    deployment's clock.  The router, the discriminator, the heavy worker (until it has measured
    itself), the simulator and the controller's replay all predict with this."""
    table = profile.table(role)
    return functools.lru_cache(maxsize=64)(lambda n: table.latency_ms(n) * latency_scale)


@dataclass
class Stage:
    """What the deadline rule needs to know about a stage (the heavy one; the light one for
    admission), kept current by its caller: its live workers, the plan's batch, the batch time and
    the measured backlog.  ``admit`` counts a job it lets in, so one batch of decisions sees its own
    earlier ones.  ``times`` (batch size -> ms) predicts the batch a worker will actually run;
    without it every batch takes ``batch_ms``.  ``headroom`` < 1 predicts the stage slower than
    profiled (admission's margin, common/admission.py)."""

    workers: int
    batch: int
    batch_ms: float
    backlog: int = 0
    times: Callable[[int], float] | None = None
    headroom: float = 1.0
    # ms from now until each worker the plan moves into this stage serves it: admission counts them (a job it
    # refuses is a miss for sure), the deadline rule does not (its mistake is a degraded answer, not a late one)
    joining_ms: tuple[float, ...] = ()

    def run(self) -> tuple[int, float]:
        """The batch a job joining now runs in, and its time."""
        if self.times is None or self.workers <= 0:
            return self.batch, self.batch_ms / self.headroom
        n = max(1, min(self.batch, math.ceil((max(0, self.backlog) + 1) / self.workers)))
        return n, self.times(n) / self.headroom

    def wait_ms(self) -> float:
        n, ms = self.run()
        return queue_wait_ms(self.backlog, self.workers, n, ms, self.joining_ms)

    def service_ms(self) -> float:
        return self.run()[1]

    def on_time(self, now_ms: float, deadline_ms: float, skew_ms: float = 0.0) -> bool:
        n, ms = self.run()
        wait = queue_wait_ms(self.backlog, self.workers, n, ms, self.joining_ms)
        return finishes_in_time(now_ms, deadline_ms, wait, ms, skew_ms)

    def admit(self) -> None:
        self.backlog += 1


def light_reason(decision: Decision, confidence: float | None, plan: Plan) -> LightReason:
    """Why a light image is the answer: the deadline rule (``Decision.LATE``); else the plan, when the
    confidence is below the threshold the cascade wants with heavy room for every job (the plan's
    ``target_threshold``) and the plan's own threshold was lowered below it for capacity, or the policy sends
    nothing on; else confident (the share keeper's threshold a little below the target holds the cascade's
    share: those answers are the confident ones too)."""
    if decision == Decision.LATE:
        return LightReason.DEADLINE
    target = plan.target_threshold
    if (
        target is not None
        and confidence is not None
        and confidence < target
        and (not plan.discriminator_routes or below_target(plan.threshold, target))
    ):
        return LightReason.PLAN
    return LightReason.CONFIDENT


def cascade_decision(
    confidence: float,
    threshold: float,
    *,
    discriminator_routes: bool,
    degrade_late: bool,
    fallback: bool,
    on_time: bool,
) -> Decision:
    """The discriminator's decision for one scored light image.

    ``fallback``: the job had been sent straight to heavy and came back because it could not
    make its deadline there, so its light image is the (degraded) answer.  ``on_time``: the
    deadline rule's verdict for the heavy stage now (only consulted when it matters)."""
    if fallback:
        return Decision.LATE
    if not discriminator_routes or confidence >= threshold:
        return Decision.LIGHT
    if degrade_late and not on_time:
        return Decision.LATE
    return Decision.HEAVY


def direct_decision(draw: float, heavy_fraction: float, *, degrade_late: bool, on_time: bool) -> Decision:
    """The router's decision for a new job under a split policy: straight to heavy with
    probability ``heavy_fraction`` (``draw`` is uniform in [0, 1)), unless the heavy model cannot
    make the deadline and late jobs are degraded, in which case the light model answers it."""
    if draw >= heavy_fraction:
        return Decision.LIGHT
    if degrade_late and not on_time:
        return Decision.LATE
    return Decision.HEAVY


SHARE_MIN_SCORES = 50  # the keeper holds a share once it has this many recent confidences to read it from
SHARE_MIN_DECISIONS = 5  # ... and this many decisions in its window
SHARE_MAX_SHIFT = 0.1  # ... moving the next job's light share at most this far from the plan's


class ShareKeeper:
    """The discriminator's threshold for each job of a scored batch: the one that makes up, over the last
    ``window_ms`` of its decisions, the light answers above or below the share the plan's threshold gives its last
    ``history`` confidences (common/routing's docstring).  A batch is decided a job at a time, as if its jobs came
    one by one (a light batch of 16 decided at one threshold would hold the share sixteen times more coarsely).
    Each decision is held to the share of its own plan, so a new plan starts from an even window.  It holds the
    share while the heavy stage has room for it (the plan's threshold at the cascade's target): below, the
    threshold is what the heavy stage can carry and the exchange gives it the hardest prompts.  A plan without a
    window (a fixed plan, no controller): the plan's threshold."""

    def __init__(self, history: int):
        self.recent: deque[float] = deque()  # the last ``history`` confidences, in arrival order ...
        self.ranked: list[float] = []  # ... and ascending
        self.history = history
        self.decisions: deque[tuple[float, float]] = deque()  # (ms, light 1/0 minus its plan's share)
        self.excess = 0.0  # the sum of decisions' second terms

    def thresholds(self, plan: Plan, now_ms: float, confidences: Sequence[float]) -> list[float]:
        """The threshold of each of ``confidences`` (a batch, decided now under ``plan``); each is recorded as
        decided."""
        plan_threshold = plan.threshold
        room = not below_target(plan_threshold, plan.target_threshold)
        window_ms = plan.share_window_ms if plan.discriminator_routes and room else 0.0
        while self.decisions and (window_ms <= 0 or self.decisions[0][0] <= now_ms - window_ms):
            self.excess -= self.decisions.popleft()[1]
        if not self.decisions:
            self.excess = 0.0  # no rounding left over
        out = []
        for c in confidences:
            threshold = plan_threshold
            if window_ms > 0 and len(self.ranked) >= SHARE_MIN_SCORES:
                share = self.share_at(plan_threshold)
                if len(self.decisions) >= SHARE_MIN_DECISIONS:
                    shift = max(-SHARE_MAX_SHIFT, min(SHARE_MAX_SHIFT, self.excess / len(self.decisions)))
                    threshold = self.threshold_for(min(1.0, max(0.0, share - shift)))
                decision = float(c >= threshold) - share
                self.decisions.append((now_ms, decision))
                self.excess += decision
            out.append(threshold)
            self._remember(c)
        return out

    def _remember(self, confidence: float) -> None:
        self.recent.append(confidence)
        bisect.insort(self.ranked, confidence)
        if len(self.recent) > self.history:
            del self.ranked[bisect.bisect_left(self.ranked, self.recent.popleft())]

    def share_at(self, threshold: float) -> float:
        """The share of the recent confidences at or above ``threshold``."""
        return (len(self.ranked) - bisect.bisect_left(self.ranked, threshold)) / len(self.ranked)

    def threshold_for(self, share: float) -> float:
        """A threshold that answers ``share`` of the recent confidences light."""
        ranked, n = self.ranked, len(self.ranked)
        k = round(share * n)  # the k most confident
        if k <= 0:
            return math.nextafter(ranked[-1], math.inf)
        if k >= n:
            return ranked[0]
        return (ranked[n - k - 1] + ranked[n - k]) / 2


LATE_POLICIES = ("plan", "light", "heavy")  # a stage's override of the plan's degrade_late (tests, benchmarks)


def degrades_late(late_policy: str, plan_degrade_late: bool) -> bool:
    """Whether the deadline rule applies: as the plan says, or forced on (light) or off (heavy)."""
    return plan_degrade_late if late_policy == "plan" else late_policy == "light"


@dataclass(kw_only=True)
class LatePolicySettings(Settings):
    """The deadline rule's override, the same for every stage that applies it (the router's direct routing
    and admission, the discriminator, the heavy worker)."""

    late_policy: str = option(
        "plan",
        "a job the heavy model cannot finish by its deadline: as the plan says (plan), answered with its "
        "light image (light) or sent on and run anyway (heavy)",
        env="DIFFSERVE_LATE_POLICY",
        choices=LATE_POLICIES,
    )


def exchange_for(
    heavy: Stage,
    now_ms: float,
    deadline_ms: float,
    confidence: float,
    waiting: Sequence[float | None],
    skew_ms: float = 0.0,
) -> int | None:
    """The deadline rule's exchange: a job the heavy stage cannot finish in time (``Decision.LATE``) takes
    the place of the most confident job still waiting for a heavy worker (``waiting``: their confidences,
    None for one sent straight to heavy, which has no light image to answer with), when that one is more
    confident (an easier prompt: its light image costs less as the answer) and the late job, joining behind
    one fewer, finishes in time.  Returns the index in ``waiting`` of the job that yields its place (it is
    answered with its light image, ``LightReason.DEADLINE``), or None.  So when the heavy stage is short, the
    hardest prompts of the last deadline's worth of arrivals run on it, not the first ones to come."""
    known = [i for i, c in enumerate(waiting) if c is not None]
    if not known:
        return None
    k = max(known, key=lambda i: waiting[i] or 0.0)
    if (waiting[k] or 0.0) <= confidence:
        return None
    behind_one_fewer = replace(heavy, backlog=heavy.backlog - 1)
    return k if behind_one_fewer.on_time(now_ms, deadline_ms, skew_ms) else None


def decision_order(confidences: list[float]) -> list[int]:
    """Indices of one scored batch, least confident first: the hardest prompts claim the heavy
    stage's remaining room first, so when it runs out the prompts degraded are the least hard."""
    return sorted(range(len(confidences)), key=lambda i: confidences[i])
