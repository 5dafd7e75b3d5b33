"""The controller's replay of recent arrivals (common/replay.py): among the thresholds the smoothing
allows and the heavy batches that fit the SLO, the plan that would have served them best, for the roles
the solver chose."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from common.messages import Plan
from common.planner import THRESHOLD_GRID, Objective, PlanResult, policy_spec, quality_threshold
from common.profiles import CascadeProfile
from common.replay import Candidate, Replay, search

if TYPE_CHECKING:
    from common.control import ControlSettings


def rechoose(
    result: PlanResult,
    arrivals: list[float],
    *,
    profile: CascadeProfile,
    settings: ControlSettings,
    center: float,
    steps: tuple[float, float],
    keep: Plan | None,
    confidences: Sequence[float] | None,
) -> str:
    """Replay ``arrivals`` (ms) under candidate plans around ``center`` (``steps``: how far below and above it,
    below the cascade's preferred threshold) and apply the best to ``result``; ``keep``: the plan in force,
    which wins ties.
    Returns what it did, in words."""
    cfg = settings
    replay = Replay(
        [a - arrivals[0] for a in arrivals],
        profile=profile,
        latency_scale=cfg.latency_scale,
        slo_ms=cfg.slo_ms,
        halflife_ms=cfg.hindsight_halflife_s * 1000.0 if cfg.hindsight_halflife_s > 0 else None,
        confidences=confidences,
        draws=cfg.hindsight_draws,
        hop_ms=cfg.hop_ms,
        fill_ms=cfg.heavy_fill_ms,
        target_threshold=quality_threshold(profile),
    )
    target = replay.target_threshold or 1.0
    down, up = steps
    grid = [t for t in THRESHOLD_GRID if center - down - 1e-9 <= t <= min(target, center + up) + 1e-9] or [
        result.threshold
    ]
    first_light = replay.batch_ms("light", 1) + replay.batch_ms("discriminator", 1)
    heavy_batches = [b for b in cfg.batch_grid if first_light + replay.batch_ms("heavy", b) <= cfg.slo_ms]
    base = Candidate(
        threshold=min(max(keep.threshold if keep else result.threshold, grid[0]), grid[-1]),
        light_workers=result.light_workers,
        light_batch=result.light_batch,
        heavy_workers=result.heavy_workers,
        heavy_batch=keep.heavy_batch if keep else result.heavy_batch,
    )
    best, tried = search(
        replay,
        base,
        thresholds=grid,
        # the light batch stays the solver's (the most capacity within the SLO): a quiet replay window
        # cannot tell what a smaller one would cost in the next burst
        light_batches=[result.light_batch],
        heavy_batches=heavy_batches or [result.heavy_batch],
        tie=cfg.hindsight_tie,
    )
    chosen = best.candidate
    quality = profile.quality
    assert quality is not None  # the controller replays only for a cascade with a quality curve
    note = (
        f"hindsight over {len(arrivals)} arrivals ({tried} plans replayed): t={chosen.threshold:g}, "
        f"batches {chosen.light_batch}/{chosen.heavy_batch}, est. {quality.metric} "
        f"{best.quality:.2f}, {100 * best.misses:.1f} % missed"
    )
    result.notes.append(note)
    if (chosen.threshold, chosen.light_batch, chosen.heavy_batch) != (
        result.threshold,
        result.light_batch,
        result.heavy_batch,
    ):
        set_threshold(result, profile, chosen.threshold)
        result.light_batch, result.heavy_batch = chosen.light_batch, chosen.heavy_batch
    return note


def hold_preferred(result: PlanResult, profile: CascadeProfile) -> str:
    """Before the replay has history enough to judge (the first seconds of traffic, after an idle spell): a
    plan that degrades late jobs keeps the cascade's preferred threshold where the solver fitted a lower one
    to the heavy stage's capacity. The exchange (common/routing.exchange_for) gives the heavy stage the
    hardest of what it is sent, so sending more than it can run costs light answers for easier prompts only,
    and a guess made from a few seconds of demand cannot cost the hard ones theirs. Returns what it did."""
    target = result.target_threshold
    if target is None or not policy_spec(result.policy).degrade_late or result.threshold >= target:
        return ""
    note = f"too little history to replay: t={target:g} (the solver's {result.threshold:g}), the exchange rations"
    set_threshold(result, profile, target)
    result.notes.append(note)
    return note


def set_threshold(result: PlanResult, profile: CascadeProfile, threshold: float) -> None:
    """``result`` with threshold ``threshold`` and the light share and estimated quality that go with it."""
    quality = profile.quality
    assert quality is not None  # the controller re-chooses t only for a cascade with a quality curve
    f = profile.curve.f(threshold)
    result.threshold = threshold
    result.light_share = 1.0 - f
    result.estimated_quality = quality.score(1.0 - f)
    if result.objective == Objective.QUALITY:
        result.objective_value = result.estimated_quality
