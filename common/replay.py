"""Receding-horizon hindsight: the controller replays the last minutes of real arrivals through a
small model of the cascade under candidate plans and keeps the one that would have served them
best.  The best fixed plan in hindsight is what a plan chosen after the fact gets; this gives the
controller that plan for the recent past, every interval, before the fact.

The model (:class:`Replay`) is the data plane with a fixed plan, in the caller's clock: the
router's admission (common/admission.admit), light workers pulling up to their batch from one FIFO
queue, the discriminator's decision per scored batch (least confident first, the deadline rule of
common/routing.py on the heavy stage, and its exchange: a late job takes the place of an easier waiting
one), heavy workers pulling up to their batch and answering with
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
from common.routing import Decision, Stage, batch_times, exchange_for, fill_until_ms, heavy_fill_ms

ARRIVAL_BUCKET_MS = 100.0  # the router's arrival histogram: arrivals per 100 ms of its clock
# CPU per batch in each service of a live stack on this machine kind (wall clock, measured by the serving
# bench): the router's pass, a worker's or the discriminator's bookkeeping around its model.
HOP_MS = 1.5
RECENT_CONFIDENCES = 2000  # the discriminator publishes its last scores, the replay draws from them
# Job states after a replay.
REFUSED, LIGHT, HEAVY, DEGRADED = 0, 1, 2, 3
_LIGHT_DONE, _SCORED, _HEAVY_DONE, _FILLED = 0, 1, 2, 3


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

    def rate_qps(self, end_ms: float, span_ms: float) -> float:
        """Arrivals per second in [end - span, end)."""
        return len(self.window(end_ms, span_ms)) * 1000.0 / span_ms


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
        fill_ms: float = 0.0,
        target_threshold: float | None = None,
    ):
        self.arrivals = list(arrivals_ms)
        # the heavy batch fill a candidate's plan gets (common/routing.heavy_fill_ms)
        self.fill_ms, self.target_threshold = fill_ms, target_threshold
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
        run = _Run(self, cand, self.draws[draw])
        run.replay()
        return self._outcome(cand, run.state, run.done_ms, draw)

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


class _Run:
    """One replay of every arrival under a candidate plan and one confidence draw: discrete events, the
    stages as the router, the discriminator and the heavy workers see them."""

    def __init__(self, replay: Replay, cand: Candidate, conf: list[float]):
        self.r, self.cand, self.conf = replay, cand, conf
        n = len(replay.arrivals)
        self.state = [REFUSED] * n
        self.done_ms = [math.inf] * n
        self.b1, self.b2 = max(1, cand.light_batch), max(1, cand.heavy_batch)
        self.plan = Plan(threshold=cand.threshold, light_batch=self.b1, heavy_batch=self.b2)
        # the stages as the router and the discriminator see them (admission at its headroom)
        self.light = at_headroom(replay.stage("light", cand.light_workers, self.b1), DEFAULT_ADMISSION_HEADROOM)
        self.heavy = replay.stage("heavy", cand.heavy_workers, self.b2)  # not admission's: late jobs degrade
        self.fill_ms = heavy_fill_ms(cand.threshold, replay.target_threshold, self.b2, replay.fill_ms)
        self.filling: list[list[int]] = []  # short heavy batches whose workers wait for more, longest first
        self.disc_ms = replay.batch_ms("discriminator", self.b1) / DEFAULT_ADMISSION_HEADROOM
        self.light_q: deque[int] = deque()
        self.heavy_q: deque[int] = deque()
        self.idle = {"light": cand.light_workers, "heavy": cand.heavy_workers}
        self.events: list[tuple[float, int, int, list[int]]] = []
        self.seq = 0

    def replay(self) -> None:
        arrivals, hop, events = self.r.arrivals, self.r.hop_ms, self.events
        n, i = len(arrivals), 0
        while i < n or events:
            if i < n and (not events or arrivals[i] + hop <= events[0][0]):
                self.arrive(i, arrivals[i] + hop)  # the router's pass
                i += 1
                continue
            now, _seq, kind, batch = heapq.heappop(events)
            if kind == _LIGHT_DONE:
                self.light_done(now, batch)
            elif kind == _SCORED:
                self.scored(now, batch)
            elif kind == _FILLED:
                if any(f is batch for f in self.filling):  # else it filled before its time was up
                    self.filling = [f for f in self.filling if f is not batch]
                    self.run_heavy(now, batch)
                    self.start_heavy(now)
            else:
                self.heavy_done(now, batch)

    def at(self, t: float, kind: int, batch: list[int]) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, kind, batch))

    def arrive(self, i: int, now: float) -> None:
        verdict = admit(
            self.plan,
            Decision.LIGHT,
            now,
            self.r.arrivals[i] + self.r.slo_ms,
            light=self.light,
            heavy=self.heavy,
            discriminator_ms=self.disc_ms,
            max_light_backlog=self.r.max_light_backlog,
        )
        if verdict.admitted:
            self.light_q.append(i)
            self.light.admit()
            self.start_light(now)

    def start_light(self, now: float) -> None:
        while self.idle["light"] > 0 and self.light_q:
            batch = [self.light_q.popleft() for _ in range(min(self.b1, len(self.light_q)))]
            self.idle["light"] -= 1
            self.at(now + self.r.batch_ms("light", len(batch)) + self.r.hop_ms, _LIGHT_DONE, batch)

    def start_heavy(self, now: float) -> None:
        r, slo = self.r, self.r.slo_ms
        while self.idle["heavy"] > 0 and self.heavy_q:
            taken = [self.heavy_q.popleft() for _ in range(min(self.b2, len(self.heavy_q)))]
            self.idle["heavy"] -= 1
            if self.fill_ms > 0 and len(taken) < self.b2:
                deadlines = [r.arrivals[j] + slo for j in taken]
                until = fill_until_ms(now, deadlines, r.batch_ms("heavy", self.b2), self.fill_ms)
                if until > now:  # the batch fill: the worker waits for more
                    self.filling.append(taken)
                    self.at(until, _FILLED, taken)
                    continue
            self.run_heavy(now, taken)
        while self.filling and self.heavy_q:  # what the idle workers left goes to those filling a batch
            taken = self.filling[0]
            while self.heavy_q and len(taken) < self.b2:
                taken.append(self.heavy_q.popleft())
            if len(taken) >= self.b2:
                self.filling.pop(0)
                self.run_heavy(now, taken)
        if self.idle["heavy"] > 0 and self.heavy_q:  # a batch whose jobs were all late freed its worker
            self.start_heavy(now)

    def run_heavy(self, now: float, taken: list[int]) -> None:
        """A heavy worker's batch, read: its last check (the deadline rule with nothing ahead of this batch),
        then the model; its worker is free again at once when every job was late."""
        r, slo = self.r, self.r.slo_ms
        check = Stage(workers=1, batch=len(taken), batch_ms=r.batch_ms("heavy", len(taken)))
        batch = []
        for j in taken:
            if check.on_time(now, r.arrivals[j] + slo):
                batch.append(j)
            else:
                self.state[j], self.done_ms[j] = DEGRADED, now + r.hop_ms
                self.heavy.backlog -= 1
        if batch:
            self.at(now + r.batch_ms("heavy", len(batch)) + r.hop_ms, _HEAVY_DONE, batch)
        else:
            self.idle["heavy"] += 1

    def light_done(self, now: float, batch: list[int]) -> None:
        self.idle["light"] += 1
        self.light.backlog -= len(batch)
        self.at(now + self.r.batch_ms("discriminator", len(batch)) + self.r.hop_ms, _SCORED, batch)
        self.start_light(now)

    def scored(self, now: float, batch: list[int]) -> None:
        conf, hop, slo = self.conf, self.r.hop_ms, self.r.slo_ms
        for j in sorted(batch, key=lambda j: conf[j]):  # the least confident claim heavy first
            if conf[j] >= self.cand.threshold:
                self.state[j], self.done_ms[j] = LIGHT, now + hop
            elif self.heavy.on_time(now, self.r.arrivals[j] + slo):
                self.state[j] = HEAVY
                self.heavy_q.append(j)
                self.heavy.admit()
            elif (
                k := exchange_for(self.heavy, now, self.r.arrivals[j] + slo, conf[j], [conf[q] for q in self.heavy_q])
            ) is not None:
                yielded = self.heavy_q[k]
                del self.heavy_q[k]
                self.state[yielded], self.done_ms[yielded] = DEGRADED, now + hop
                self.state[j] = HEAVY
                self.heavy_q.append(j)
            else:
                self.state[j], self.done_ms[j] = DEGRADED, now + hop
        self.start_heavy(now)

    def heavy_done(self, now: float, batch: list[int]) -> None:
        self.idle["heavy"] += 1
        self.heavy.backlog -= len(batch)
        for j in batch:
            self.done_ms[j] = now + self.r.hop_ms
        self.start_heavy(now)
