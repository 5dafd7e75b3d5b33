"""Estimated quality of a stream of answers without images: the load tester's report and the
controller's replay of recent arrivals (common/replay.py) score answers with this one estimator.

Per window of ``window_s`` (by arrival), the cascade's quality curve gives the score for the
discriminator-picked split at the window's light share (the DiffServe paper's method,
``paper_score``).  That curve was measured with the discriminator answering the most confident
prompts light; a light answer that is not one of them (a degraded answer: a hard prompt whose heavy
answer would have been late; a random split) is charged the difference, in an additive model where
a prompt answered light costs the curve's slope at the light share where the discriminator's split
would just include it (from its confidence and f(t)).  Without degraded answers or random splits
both scores agree.  The estimate is the mean over windows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from common.messages import Role

if TYPE_CHECKING:
    from common.profiles import QualityCurve

QUALITY_WINDOW_S = 5.0
QUALITY_METHOD = (
    "per {w:g}-s window (full-speed time, by arrival): the cascade's quality-vs-light-share curve at the "
    "window's light share (the DiffServe paper's method), plus what answering these prompts light costs "
    "over answering the window's most confident ones light (each light answer costs the curve's "
    "slope at its confidence's place in f(t)), so degraded answers and random splits pay for being "
    "hard prompts; averaged over windows. paper_estimate: the paper's method alone"
)


class QualityModel:
    """The estimator for one cascade: its quality curve and its confidence -> light share map."""

    def __init__(self, curve: QualityCurve, confidence_share: Callable[[float], float]):
        self.curve = curve
        self.confidence_share = confidence_share
        self.all_heavy = curve.score(0.0)
        self.mean_cost = curve.score(1.0) - self.all_heavy  # a light answer of unknown confidence

    def slope(self, share: float, h: float = 0.005) -> float:
        lo, hi = max(0.0, share - h), min(1.0, share + h)
        return (self.curve.score(hi) - self.curve.score(lo)) / (hi - lo)

    def cost(self, confidence: float | None) -> float:
        """What answering this prompt light costs, in the additive model."""
        return self.mean_cost if confidence is None else self.slope(self.confidence_share(confidence))

    def window(
        self, answers: int, light_costs: Iterable[float], best_costs: Sequence[float] | None
    ) -> tuple[float, float]:
        """(paper score, corrected score) of one window with ``answers`` answers whose light answers
        cost ``light_costs``; ``best_costs`` are the costs of every answer's prompt, most confident
        first (None when some prompt was never scored: the population's most confident ones)."""
        light = list(light_costs)
        paper = self.curve.score(len(light) / answers)
        if best_costs is not None:
            best = sum(best_costs[: len(light)])
        else:
            best = (paper - self.all_heavy) * answers
        extra = sum(light) - best
        return paper, paper + max(0.0, extra) / answers

    def window_scores(
        self, answers: list[tuple[float, str | None, float | None]], window_s: float = QUALITY_WINDOW_S
    ) -> list[dict[str, Any]]:
        """``(t_s, answered_by, confidence)`` of every answered job -> per window with answers: the
        light share, the paper's score and the corrected score."""
        windows: dict[int, list[tuple[str | None, float | None]]] = {}
        for t, by, confidence in answers:
            windows.setdefault(int(t // window_s), []).append((by, confidence))
        out = []
        for w in sorted(windows):
            rows = windows[w]
            light = [self.cost(c) for by, c in rows if by == Role.LIGHT]
            known = [c for _by, c in rows if c is not None]
            best = [self.cost(c) for c in sorted(known, reverse=True)] if len(known) == len(rows) else None
            paper, score = self.window(len(rows), light, best)
            out.append(
                {
                    "start_s": w * window_s,
                    "answers": len(rows),
                    "light_share": len(light) / len(rows),
                    "score": round(score, 4),
                    "paper_score": round(paper, 4),
                }
            )
        return out

    def estimate(
        self, answers: list[tuple[float, str | None, float | None]], window_s: float = QUALITY_WINDOW_S
    ) -> dict[str, Any]:
        """Mean over windows of the corrected score, and of the paper's score beside it."""
        windows = self.window_scores(answers, window_s)
        estimate = sum(w["score"] for w in windows) / len(windows) if windows else None
        paper = sum(w["paper_score"] for w in windows) / len(windows) if windows else None
        curve = self.curve
        return {
            "metric": curve.metric,
            "estimate": None if estimate is None else round(estimate, 4),
            "paper_estimate": None if paper is None else round(paper, 4),
            "lower_is_better": curve.lower_is_better,
            "window_s": window_s,
            "windows": len(windows),
            "all_heavy": curve.score(0.0),
            "all_light": curve.score(1.0),
            "curve": curve.source,
            "method": QUALITY_METHOD.format(w=window_s),
            "per_window": windows,
        }
