"""Admission by predicted wait: the router's decision for one new job, a pure function of the
plan, the job's route and deadline and the stages' state (common/routing.Stage, the one deadline
rule ``finishes_in_time`` with the queue wait ``backlog·batch_ms/(workers·batch)``; the router's light stage
also counts the workers the plan moves into it, each from when it will serve there, ``routing.queue_wait_ms``).

A job is admitted only when the stage that decides whether it is answered by its deadline can
answer it in time:

- a job for the light model (the cascade, a split policy's light share, or a direct job the
  heavy stage could not take in time, ``Decision.LATE``) needs the light stage plus the
  discriminator to fit.  The heavy stage does not matter when late jobs are degraded
  (``degrade_late``): the discriminator and the heavy worker answer a job the heavy model cannot
  finish in time with its light image.  Where the plan does not degrade late jobs and the
  discriminator may send the job on (``discriminator_routes``, t > 0), nothing rescues it, so
  the heavy stage after the light one must fit too;
- a job sent straight to heavy (``Decision.HEAVY``: direct split, clipper-heavy) needs the heavy
  stage to fit.

A job whose deadline a stage could not meet even with nothing queued (an SLO shorter than the
stage's batch time) is not refused for overload: it is admitted when nothing is queued ahead of it
(served best effort, as before), so such jobs cannot pile up either.  ``max_light_backlog`` stays a
hard cap on the light queue (a bound on memory whatever the profile says).  A refusal carries
``retry_after_ms``: how long until the queue ahead has drained enough for the same job to fit.

Fair share under overload (``budget``): a source (the shared stream, or one tenant) that has had more than
its share of the recent admissions (``FairShare``) may fill a stage only up to ``budget`` of a job's slack
(the time between its deadline and the end of its service if it started now), and the light queue only to
``budget`` of its cap. The rest is kept for sources under their share, so a light user is still admitted
while a heavy one floods: the flood is refused first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from common.messages import Plan
from common.routing import Decision, Stage, finishes_in_time

# Retry hint when a stage has no live worker: the router re-counts workers about every second.
NO_WORKERS_RETRY_MS = 1000.0
DEFAULT_MAX_LIGHT_BACKLOG = 5000
# Admission predicts every stage at this share of its profiled speed: the profile leaves out per-batch
# overheads, and a queue packed to exactly the deadline would miss it.
DEFAULT_ADMISSION_HEADROOM = 0.85


def at_headroom(stage: Stage, headroom: float) -> Stage:
    """``stage`` as admission predicts it: every batch ``1/headroom`` times slower."""
    return replace(stage, headroom=headroom)


@dataclass(frozen=True)
class Verdict:
    admitted: bool
    retry_after_ms: float | None = None  # refused: when the same job is predicted to fit
    reason: str = ""


ADMIT = Verdict(True)


def _fits(
    stage: Stage, start_ms: float, deadline_ms: float, service_ms: float, what: str, budget: float = 1.0
) -> Verdict:
    """Does a job that joins ``stage`` at ``start_ms`` and needs ``service_ms`` once started finish in time,
    waiting at most ``budget`` of its slack?"""
    wait = stage.wait_ms()
    slack = deadline_ms - start_ms - service_ms  # the longest wait that still fits
    allowed = budget * slack if slack > 0 else slack
    if finishes_in_time(start_ms, deadline_ms - (slack - allowed), wait, service_ms):
        return ADMIT
    if math.isinf(wait):
        return Verdict(False, NO_WORKERS_RETRY_MS, f"no live {what} worker")
    if allowed < 0 and stage.backlog <= 0:
        return ADMIT  # too tight a deadline for this stage even when idle: best effort, not overload
    return Verdict(
        False, max(1.0, math.ceil(wait - max(0.0, allowed))), f"the {what} queue would make it miss its deadline"
    )


def admit(
    plan: Plan,
    route: Decision,
    now_ms: float,
    deadline_ms: float,
    *,
    light: Stage,
    heavy: Stage,
    discriminator_ms: float,
    max_light_backlog: int,
    budget: float = 1.0,
) -> Verdict:
    """Admit the job taking ``route`` (common/routing.direct_decision's) now, or refuse it with a retry hint.
    ``budget`` (0, 1]: the share of its slack and of the light queue's cap its source may use now (1 unless
    the source is over its fair share, ``FairShare``)."""
    if route == Decision.HEAVY:
        return _fits(heavy, now_ms, deadline_ms, heavy.service_ms(), "heavy", budget)
    cap = max(1, math.floor(max_light_backlog * budget))
    if light.backlog >= cap:
        # Each job ahead beyond the cap leaves at the stage's rate (workers·batch per batch time).
        over = light.backlog - cap + 1
        full_ms = light.batch_ms / light.headroom
        hint = over * full_ms / (light.workers * light.batch) if light.workers > 0 else NO_WORKERS_RETRY_MS
        return Verdict(False, max(1.0, math.ceil(hint)), "the light queue is full")
    verdict = _fits(light, now_ms, deadline_ms, light.service_ms() + discriminator_ms, "light", budget)
    if not verdict.admitted or route == Decision.LATE:
        return verdict
    if plan.discriminator_routes and plan.threshold > 0 and not plan.degrade_late:
        # It may go on to heavy, and a late heavy job is not answered with its light image.
        scored_ms = now_ms + light.wait_ms() + light.service_ms() + discriminator_ms
        return _fits(heavy, scored_ms, deadline_ms, heavy.service_ms(), "heavy", budget)
    return ADMIT


@dataclass
class FairShare:
    """Which sources have had more than their share of the recent admissions. Admissions are counted with
    exponential decay (time constant ``window_s``); a source is active when it submitted within
    ``window_s``, and over its share when its admissions exceed the total's ``1/active``. A single
    active source is never over its share. Deterministic in the times it is given (seconds)."""

    window_s: float = 5.0
    _admitted: dict[str, tuple[float, float]] = field(default_factory=dict)  # source -> (count, at)
    _seen: dict[str, float] = field(default_factory=dict)  # source -> its last submission
    _total: tuple[float, float] = (0.0, 0.0)

    def _decayed(self, value: tuple[float, float], now_s: float) -> float:
        count, at = value
        return count * math.exp(-max(0.0, now_s - at) / self.window_s)

    def arrived(self, source: str, now_s: float) -> None:
        self._seen[source] = now_s

    def admitted(self, source: str, now_s: float) -> None:
        self._admitted[source] = (self._decayed(self._admitted.get(source, (0.0, now_s)), now_s) + 1.0, now_s)
        self._total = (self._decayed(self._total, now_s) + 1.0, now_s)

    def active(self, now_s: float) -> int:
        """Sources that submitted within the window (and forget the others)."""
        for source in [s for s, at in self._seen.items() if now_s - at > self.window_s]:
            del self._seen[source]
            self._admitted.pop(source, None)
        return len(self._seen)

    def over_share(self, source: str, now_s: float, active: int) -> bool:
        if active <= 1 or source not in self._admitted:
            return False
        return self._decayed(self._admitted[source], now_s) > self._decayed(self._total, now_s) / active
