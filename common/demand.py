"""Demand as the controller measures it, from the jobs counter: the rate to plan for (quick to follow a
rise, slow to believe a fall) and the light stage's floor (the rate the recent minutes exceeded half the time)."""

from __future__ import annotations

from collections import deque


class RateEstimator:
    """Rate of a monotonic counter: EWMA of per-tick deltas, plus a look-ahead of one
    interval's trend while it rises.  Slow to believe a fall, but not after ``settle`` ticks that
    all stayed below it: then the estimate is their largest rate (a burst has ended; an idle
    cluster reports no demand).  Two, not three: the controller's burst watch brings light workers back
    within seconds, and a third tick held the light workers of a busy phase 10 s longer after it ended
    (trace seeds 0-3 at 4 workers: step 18.861 -> 18.848, bursty 18.409 -> 18.382; 8 and 16 workers within 0.001)."""

    def __init__(
        self, alpha: float = 0.5, initial: float | None = None, alpha_down: float | None = None, settle: int = 2
    ):
        self.alpha = alpha
        self.alpha_down = alpha if alpha_down is None else alpha_down
        self.count: int | None = None
        self.at: float | None = None
        self.rate: float | None = initial  # smoothed
        self.previous: float | None = None  # smoothed rate one tick ago
        self.raw: float | None = None
        self.span: float = 0.0  # seconds the last raw rate was measured over
        self.recent: deque[float] = deque(maxlen=max(1, settle))

    def update(self, count: int, at: float) -> None:
        if self.count is not None and self.at is not None and at > self.at:
            delta = count - self.count
            if delta < 0:  # the stream was deleted and recreated: its counter restarted
                delta = count
            self.span = at - self.at
            self.raw = delta / self.span
            self.recent.append(self.raw)
            self.previous = self.rate
            if self.rate is None:
                self.rate = self.raw
            else:  # quick to follow a rise, slow to believe a fall
                alpha = self.alpha if self.raw >= self.rate else self.alpha_down
                self.rate = alpha * self.raw + (1 - alpha) * self.rate
                if len(self.recent) == self.recent.maxlen:
                    self.rate = min(self.rate, max(self.recent))
        self.count, self.at = count, at

    @property
    def smoothed(self) -> float:
        return max(0.0, self.rate or 0.0)

    def forecast(self) -> float:
        """The smoothed rate, extrapolated one interval ahead while it is rising."""
        rate = self.smoothed
        if self.previous is not None and rate > self.previous:
            rate += rate - self.previous
        return rate


class RecurringPeak:
    """The light stage's floor: the highest arrival rate that the last ``window_s`` seconds exceeded
    for at least ``share`` of their length (the controller: half).  A load that stays up counts; a
    burst of a few seconds in a quiet window does not, so it costs no quality once it is over."""

    def __init__(self, window_s: float, share: float):
        self.window_s, self.share = window_s, share
        self.samples: deque[tuple[float, float, float]] = deque()  # (at, rate, seconds)

    def update(self, rate: float, at: float, seconds: float) -> None:
        self.samples.append((at, rate, seconds))
        while self.samples and self.samples[0][0] <= at - self.window_s:
            self.samples.popleft()

    @property
    def span_s(self) -> float:
        """How much of the window the samples cover."""
        return sum(s for _at, _r, s in self.samples)

    @property
    def value(self) -> float:
        need = self.share * min(self.window_s, self.span_s)
        covered = 0.0
        for rate, seconds in sorted(((r, s) for _at, r, s in self.samples), reverse=True):
            covered += seconds
            if covered >= need - 1e-9:
                return rate
        return 0.0
