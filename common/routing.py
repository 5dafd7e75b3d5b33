"""The data plane's decisions, as pure functions: where a job goes next and whether the heavy
model can still answer it in time.  The router (direct routing), the discriminator (the
cascade's routing), the heavy worker (its last check before a batch) and the simulator
(``diffserve simulate``) all call these, so a decision means the same everywhere.

The deadline rule, the one estimator of "late": a job joining the heavy queue behind
``backlog`` jobs, with ``workers`` heavy workers serving batches of ``batch`` in ``batch_ms``,
starts after the backlog has been served at the stage's capacity and finishes one batch time
later::

    finish = now + backlog · batch_ms / (workers · batch) + batch_ms

It is on time when ``finish <= deadline``.  A worker about to start a batch uses the same
rule with no backlog ahead of it.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass


class Decision(enum.StrEnum):
    LIGHT = "light"  # the light image is the answer
    HEAVY = "heavy"  # on to the heavy model
    LATE = "late"  # the heavy model cannot make the deadline: the light image, marked degraded


def heavy_queue_wait_ms(backlog: int, workers: int, batch: int, batch_ms: float) -> float:
    """Expected wait before a job that joins the heavy queue now starts (ms); inf without workers."""
    if workers <= 0:
        return math.inf
    return max(0, backlog) * batch_ms / (workers * max(1, batch))


def finishes_in_time(
    now_ms: float, deadline_ms: float, queue_wait_ms: float, batch_ms: float, skew_ms: float = 0.0
) -> bool:
    """The deadline rule: starting after ``queue_wait_ms`` and taking ``batch_ms``, is it done by the deadline?
    ``skew_ms``: how far this host's clock may lag the one that set the deadline (DIFFSERVE_CLOCK_SKEW_MS)."""
    return now_ms + skew_ms + queue_wait_ms + batch_ms <= deadline_ms


@dataclass
class Stage:
    """What the deadline rule needs to know about a stage (the heavy one; the light one for
    admission), kept current by its caller: its live workers, the plan's batch, the profiled
    batch time and the measured backlog.  ``admit`` counts a job it lets in, so one batch of
    decisions sees its own earlier ones."""

    workers: int
    batch: int
    batch_ms: float
    backlog: int = 0

    def wait_ms(self) -> float:
        return heavy_queue_wait_ms(self.backlog, self.workers, self.batch, self.batch_ms)

    def on_time(self, now_ms: float, deadline_ms: float, skew_ms: float = 0.0) -> bool:
        return finishes_in_time(now_ms, deadline_ms, self.wait_ms(), self.batch_ms, skew_ms)

    def admit(self) -> None:
        self.backlog += 1


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


LATE_POLICIES = ("plan", "light", "heavy")  # a stage's override of the plan's degrade_late (tests, benchmarks)


def degrades_late(late_policy: str, plan_degrade_late: bool) -> bool:
    """Whether the deadline rule applies: as the plan says, or forced on (light) or off (heavy)."""
    return plan_degrade_late if late_policy == "plan" else late_policy == "light"


def decision_order(confidences: list[float]) -> list[int]:
    """Indices of one scored batch, least confident first: the hardest prompts claim the heavy
    stage's remaining room first, so when it runs out the prompts degraded are the least hard."""
    return sorted(range(len(confidences)), key=lambda i: confidences[i])
