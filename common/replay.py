"""Receding-horizon hindsight: the controller replays the last minutes of real arrivals through a
small model of the cascade under candidate plans and keeps the one that would have served them
best.  The best fixed plan in hindsight is what a plan chosen after the fact gets; this gives the
controller that plan for the recent past, every interval, before the fact.

The model (:class:`Replay`) is the data plane with a fixed plan, in the caller's clock: the
router's admission (common/admission.admit), light workers pulling up to their batch from one FIFO
queue, the discriminator's decision per scored batch (least confident first, the deadline rule of
common/routing.py on the heavy stage), heavy workers pulling up to their batch and answering with
the light image a job that can no longer finish in time.  The discriminator is a delay of its batch
time (it is never the bottleneck: ~15 ms for 32 images).  Arrival times come from a histogram of
``bucket_ms`` buckets (the router writes it, :class:`ArrivalHistory`), spread evenly inside each
bucket; confidences are draws from the calibrated f(t), the same draws for every candidate (common
random numbers), so candidates differ by their plan only.  Quality is the report's estimator
(common/quality.py) over the replayed answers; misses are refusals plus answers after the deadline.

Cost: a few microseconds per job and candidate (``benchmarks/plan_solve.py`` prints it); the
search tries a few dozen candidates over at most ``max_jobs`` arrivals.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from common.admission import DEFAULT_ADMISSION_HEADROOM, DEFAULT_MAX_LIGHT_BACKLOG, admit, at_headroom
from common.messages import Plan
from common.profiles import CascadeProfile
from common.quality import QUALITY_WINDOW_S, QualityModel
from common.routing import Decision, Stage, batch_times

ARRIVAL_BUCKET_MS = 100.0  # the router's arrival histogram: arrivals per 100 ms of its clock
# CPU per batch in each service of a live stack on this machine kind (wall clock, measured by the serving
# bench): the router's pass, a worker's or the discriminator's bookkeeping around its model.
HOP_MS = 1.5
RECENT_CONFIDENCES = 2000  # the discriminator publishes its last scores, the replay draws from them
# Job states after a replay.
REFUSED, LIGHT, HEAVY, DEGRADED = 0, 1, 2, 3
_LIGHT_DONE, _SCORED, _HEAVY_DONE = 0, 1, 2


@dataclass
class ArrivalHistory:
    """Arrivals per bucket of ``bucket_ms`` (bucket i covers [i·bucket_ms, (i+1)·bucket_ms) of the
    clock the counts were taken in)."""

    bucket_ms: float
    counts: dict[int, int] = field(default_factory=dict)

    def add(self, t_ms: float, n: int = 1) -> None:
        b = int(t_ms // self.bucket_ms)
        self.counts[b] = self.counts.get(b, 0) + n

    def prune(self, before_ms: float) -> None:
        first = int(before_ms // self.bucket_ms)
        for b in [b for b in self.counts if b < first]:
            del self.counts[b]

    def window(self, end_ms: float, span_ms: float) -> list[float]:
        """Arrival times in [end - span, end), ms from the window's start, spread evenly in each bucket."""
        start = end_ms - span_ms
        out: list[float] = []
        for b in sorted(self.counts):
            lo = b * self.bucket_ms
            if lo + self.bucket_ms <= start or lo >= end_ms:
                continue
            n = self.counts[b]
            step = self.bucket_ms / n
            out.extend(t - start for k in range(n) if start <= (t := lo + (k + 0.5) * step) < end_ms)
        return out


def relevel(arrivals_ms: Sequence[float], change_ms: float, ratio: float, seed: int = 0) -> list[float]:
    """The arrivals before ``change_ms`` thinned (``ratio`` < 1) or repeated (> 1) to the level after it,
    keeping their structure (a burst stays a burst): the history as it would have been at the level the
    load has moved to.  Copies are spread over the gap to the next arrival."""
    rng = random.Random(seed)
    out: list[float] = []
    for i, a in enumerate(arrivals_ms):
        if a >= change_ms:
            out.append(a)
            continue
        k = int(ratio) + (rng.random() < ratio - int(ratio))
        gap = (arrivals_ms[i + 1] if i + 1 < len(arrivals_ms) else change_ms) - a
        out.extend(a + gap * j / k for j in range(k))
    return out


@dataclass(frozen=True, kw_only=True)
class Candidate:
    threshold: float
    light_workers: int
    light_batch: int
    heavy_workers: int
    heavy_batch: int


@dataclass(kw_only=True)
class Outcome:
    candidate: Candidate
    jobs: int
    refused: int
    late: int
    heavy: int
    degraded: int
    quality: float | None  # the report's estimate over the replayed answers (None without answers)

    @property
    def misses(self) -> float:
        return (self.refused + self.late) / self.jobs if self.jobs else 0.0


class Replay:
    """One window of arrivals, replayed under any number of candidate plans."""

    def __init__(
        self,
        arrivals_ms: Sequence[float],
        *,
        profile: CascadeProfile,
        latency_scale: float,
        slo_ms: float,
        max_light_backlog: int = DEFAULT_MAX_LIGHT_BACKLOG,
        seed: int = 0,
        window_s: float = QUALITY_WINDOW_S,
        halflife_ms: float | None = None,
        confidences: Sequence[float] | None = None,
        draws: int = 1,
        job_confidences: Sequence[float] | None = None,
        hop_ms: float = HOP_MS,
    ):
        self.arrivals = list(arrivals_ms)
        self.profile, self.scale, self.slo_ms = profile, latency_scale, slo_ms
        self.max_light_backlog = max_light_backlog
        self.hop_ms = hop_ms
        rng = random.Random(seed)
        curve = profile.curve
        # ``draws`` independent confidence draws per job; a candidate is scored on all of them
        # (common random numbers: every candidate sees the same draws).
        self.draws: list[list[float]] = []
        if job_confidences is not None:  # known ones, in arrival order (tests: the simulator's own)
            self.draws.append(list(job_confidences))
        for _ in range(0 if job_confidences is not None else max(1, draws)):
            if confidences:  # the discriminator's recent scores: the prompts being served, not the calibration set's
                self.draws.append([confidences[rng.randrange(len(confidences))] for _ in self.arrivals])
            else:
                self.draws.append([curve.confidence_for(rng.random()) for _ in self.arrivals])
        self.times = {role: batch_times(profile, role, latency_scale) for role in ("light", "heavy", "discriminator")}
        self.model = QualityModel(profile.quality, lambda c: 1.0 - curve.f(c)) if profile.quality is not None else None
        # Per quality window (by arrival, in full-speed seconds) its jobs; per draw, most confident first.
        window_ms = window_s * 1000.0 * latency_scale
        groups: dict[int, list[int]] = {}
        for j, a in enumerate(self.arrivals):
            groups.setdefault(int(a // window_ms), []).append(j)
        self.windows = [
            [sorted(js, key=lambda j: -conf[j]) for _w, js in sorted(groups.items())] for conf in self.draws
        ]
        self.costs = [[self.model.cost(c) for c in conf] for conf in self.draws] if self.model else []
        # Recent windows count more (the next interval is more like them): weight halves every halflife_ms.
        end = self.arrivals[-1] if self.arrivals else 0.0
        self.weights = [
            0.5 ** (max(0.0, end - (w + 1) * window_ms) / halflife_ms) if halflife_ms else 1.0
            for w, _js in sorted(groups.items())
        ]

    def batch_ms(self, role: str, n: int) -> float:
        return self.times[role](n)

    def stage(self, role: str, workers: int, batch: int) -> Stage:
        return Stage(workers=workers, batch=batch, batch_ms=self.batch_ms(role, batch), times=self.times[role])

    def run(self, cand: Candidate) -> Outcome:
        """Replay every arrival under ``cand``, once per confidence draw; the outcome adds the counts
        up and averages the quality."""
        outcomes = [self._run(cand, k) for k in range(len(self.draws))]
        qualities = [o.quality for o in outcomes if o.quality is not None]
        return Outcome(
            candidate=cand,
            jobs=sum(o.jobs for o in outcomes),
            refused=sum(o.refused for o in outcomes),
            late=sum(o.late for o in outcomes),
            heavy=sum(o.heavy for o in outcomes),
            degraded=sum(o.degraded for o in outcomes),
            quality=sum(qualities) / len(qualities) if qualities else None,
        )

    def _run(self, cand: Candidate, draw: int) -> Outcome:
        n = len(self.arrivals)
        state = [REFUSED] * n
        done_ms = [math.inf] * n
        slo = self.slo_ms
        conf = self.draws[draw]
        b1, b2 = max(1, cand.light_batch), max(1, cand.heavy_batch)
        hop = self.hop_ms
        plan = Plan(threshold=cand.threshold, light_batch=b1, heavy_batch=b2)
        # the stages as the router and the discriminator see them (admission at its headroom)
        light = at_headroom(self.stage("light", cand.light_workers, b1), DEFAULT_ADMISSION_HEADROOM)
        heavy = self.stage("heavy", cand.heavy_workers, b2)  # admission does not look at it: late jobs degrade
        disc_ms = self.batch_ms("discriminator", b1) / DEFAULT_ADMISSION_HEADROOM
        light_q: deque[int] = deque()
        heavy_q: deque[int] = deque()
        idle = {"light": cand.light_workers, "heavy": cand.heavy_workers}
        events: list[tuple[float, int, int, list[int]]] = []
        seq = 0

        def start_light(now: float) -> None:
            nonlocal seq
            while idle["light"] > 0 and light_q:
                batch = [light_q.popleft() for _ in range(min(b1, len(light_q)))]
                idle["light"] -= 1
                seq += 1
                heapq.heappush(events, (now + self.batch_ms("light", len(batch)) + hop, seq, _LIGHT_DONE, batch))

        def start_heavy(now: float) -> None:
            nonlocal seq
            while idle["heavy"] > 0 and heavy_q:
                taken = [heavy_q.popleft() for _ in range(min(b2, len(heavy_q)))]
                # the heavy worker's last check: the deadline rule with nothing ahead of this batch
                check = Stage(workers=1, batch=len(taken), batch_ms=self.batch_ms("heavy", len(taken)))
                batch = []
                for j in taken:
                    if check.on_time(now, self.arrivals[j] + slo):
                        batch.append(j)
                    else:
                        state[j], done_ms[j] = DEGRADED, now + hop
                        heavy.backlog -= 1
                if batch:
                    idle["heavy"] -= 1
                    seq += 1
                    heapq.heappush(events, (now + self.batch_ms("heavy", len(batch)) + hop, seq, _HEAVY_DONE, batch))

        i = 0
        while i < n or events:
            if i < n and (not events or self.arrivals[i] + hop <= events[0][0]):
                now = self.arrivals[i] + hop  # the router's pass
                verdict = admit(
                    plan,
                    Decision.LIGHT,
                    now,
                    self.arrivals[i] + slo,
                    light=light,
                    heavy=heavy,
                    discriminator_ms=disc_ms,
                    max_light_backlog=self.max_light_backlog,
                )
                if verdict.admitted:
                    light_q.append(i)
                    light.admit()
                    start_light(now)
                i += 1
                continue
            now, _seq, kind, batch = heapq.heappop(events)
            if kind == _LIGHT_DONE:
                idle["light"] += 1
                light.backlog -= len(batch)
                seq += 1
                heapq.heappush(events, (now + self.batch_ms("discriminator", len(batch)) + hop, seq, _SCORED, batch))
                start_light(now)
            elif kind == _SCORED:
                for j in sorted(batch, key=lambda j: conf[j]):  # the least confident claim heavy first
                    if conf[j] >= cand.threshold:
                        state[j], done_ms[j] = LIGHT, now + hop
                    elif heavy.on_time(now, self.arrivals[j] + slo):
                        state[j] = HEAVY
                        heavy_q.append(j)
                        heavy.admit()
                    else:
                        state[j], done_ms[j] = DEGRADED, now + hop
                start_heavy(now)
            else:
                idle["heavy"] += 1
                heavy.backlog -= len(batch)
                for j in batch:
                    done_ms[j] = now + hop
                start_heavy(now)
        return self._outcome(cand, state, done_ms, draw)

    def _outcome(self, cand: Candidate, state: list[int], done_ms: list[float], draw: int) -> Outcome:
        refused = sum(s == REFUSED for s in state)
        late = sum(1 for j, s in enumerate(state) if s != REFUSED and done_ms[j] > self.arrivals[j] + self.slo_ms)
        return Outcome(
            candidate=cand,
            jobs=len(state),
            refused=refused,
            late=late,
            heavy=sum(s == HEAVY for s in state),
            degraded=sum(s == DEGRADED for s in state),
            quality=self._quality(state, draw),
        )

    def _quality(self, state: list[int], draw: int) -> float | None:
        """The report's estimate (common/quality.py) over the replayed answers."""
        model = self.model
        if model is None:
            return None
        total = weights = 0.0
        cost = self.costs[draw]
        for jobs, weight in zip(self.windows[draw], self.weights, strict=False):  # most confident first
            answered = [j for j in jobs if state[j] != REFUSED]
            if not answered:
                continue
            light = [cost[j] for j in answered if state[j] in (LIGHT, DEGRADED)]
            total += weight * model.window(len(answered), light, [cost[j] for j in answered])[1]
            weights += weight
        return total / weights if weights else None


def better(a: Outcome, b: Outcome, lower_is_better: bool, tie: float) -> bool:
    """Is ``a`` better than ``b`` (both within the miss allowance)?  Quality first; within ``tie`` of
    each other, fewer misses."""
    qa, qb = a.quality, b.quality
    if qa is None or qb is None:
        return a.misses < b.misses
    gain = (qb - qa) if lower_is_better else (qa - qb)
    if abs(gain) > tie:
        return gain > 0
    return a.misses < b.misses


def search(
    replay: Replay,
    base: Candidate,
    *,
    thresholds: Iterable[float],
    light_batches: Sequence[int],
    heavy_batches: Sequence[int],
    miss_allowance: float = 0.002,
    tie: float = 1e-4,
) -> tuple[Outcome, int]:
    """The best candidate near ``base`` (returned with the number of replays run): every threshold
    with ``base``'s batches, then every batch pair at the best threshold, then the thresholds next to
    it again.  A candidate counts only when its misses are within ``miss_allowance`` of the fewest any
    candidate had (a burst no plan could serve does not make every plan look equally bad); among
    those the best quality wins, and ``base`` keeps ties."""
    lower = replay.model.curve.lower_is_better if replay.model else True
    tried: dict[Candidate, Outcome] = {}

    def run(c: Candidate) -> Outcome:
        if c not in tried:
            tried[c] = replay.run(c)
        return tried[c]

    def best() -> Outcome:
        floor = min(o.misses for o in tried.values())
        ok = [o for o in tried.values() if o.misses <= floor + miss_allowance]
        top = tried[base] if tried[base] in ok else ok[0]
        for o in ok:
            if better(o, top, lower, tie):
                top = o
        return top

    def with_(c: Candidate, **kw: float) -> Candidate:
        fields = {
            "threshold": c.threshold,
            "light_workers": c.light_workers,
            "light_batch": c.light_batch,
            "heavy_workers": c.heavy_workers,
            "heavy_batch": c.heavy_batch,
        }
        fields.update(kw)
        return Candidate(**fields)  # type: ignore[arg-type]

    run(base)
    grid = sorted({round(t, 4) for t in thresholds} | {base.threshold})
    for t in grid:
        run(with_(base, threshold=t))
    top = best().candidate
    for lb in light_batches:
        for hb in heavy_batches:
            run(with_(top, light_batch=lb, heavy_batch=hb))
    top = best().candidate
    k = grid.index(top.threshold) if top.threshold in grid else 0
    for t in grid[max(0, k - 2) : k + 3]:
        run(with_(top, threshold=t))
    return best(), len(tried)
