"""The share keeper (common/routing.ShareKeeper): while the heavy stage has room, the discriminator holds the
light share the plan's threshold gives its recent confidences over the plan's window, deciding a batch a job at
a time; then the discriminator doing it against a real Redis."""

from __future__ import annotations

import asyncio
import random
import statistics

from common.messages import LightReason, LightResult, Plan, RoutedJob
from common.routing import SHARE_MAX_SHIFT, Decision, ShareKeeper, light_reason
from common.service import Service, now_ms
from services.discriminator import Discriminator, DiscriminatorConfig

WINDOW_MS = 5000.0
AT_TARGET = Plan(threshold=0.5, target_threshold=0.5, share_window_ms=WINDOW_MS)


def _last_window_shares(plan: Plan, seed: int, keeper: ShareKeeper | None) -> list[float]:
    """The light share of the last ``WINDOW_MS`` of decisions after each batch, for uniform confidences in batches
    of four every 400 ms, decided by ``keeper`` (None: the plan's threshold); from 16 s on (the keeper holds a
    share once it has 50 confidences)."""
    rng = random.Random(seed)
    decisions: list[tuple[float, int]] = []
    shares = []
    for b in range(750):
        now, batch = b * 400.0, [rng.random() for _ in range(4)]
        thresholds = keeper.thresholds(plan, now, batch) if keeper else [plan.threshold] * len(batch)
        decisions += [(now, int(c >= t)) for c, t in zip(batch, thresholds, strict=True)]
        if now >= 16_000:
            shares.append(statistics.mean(light for at, light in decisions if at > now - WINDOW_MS))
    return shares


def test_the_keeper_holds_the_light_share_of_its_window_where_a_fixed_threshold_wanders():
    for seed in range(5):
        fixed = _last_window_shares(AT_TARGET, seed, None)
        held = _last_window_shares(AT_TARGET, seed, ShareKeeper(2000))
        # the draw's share at t = 0.5 (about a half), a third less spread from one window to the next
        assert abs(statistics.mean(held) - statistics.mean(fixed)) < 0.01
        assert statistics.pstdev(held) < 0.8 * statistics.pstdev(fixed), (seed, statistics.pstdev(held))


def test_a_run_of_confident_prompts_sends_some_on_within_the_keepers_bound():
    keeper = ShareKeeper(2000)
    rng = random.Random(3)
    keeper.thresholds(AT_TARGET, 0.0, [rng.random() for _ in range(400)])  # out of the window by the run
    run = [0.5 + 0.2 * rng.random() for _ in range(40)]  # every one at or above the plan's threshold
    thresholds = keeper.thresholds(AT_TARGET, 10_000.0, run)
    assert sum(c >= t for c, t in zip(run, thresholds, strict=True)) < 30  # a fixed threshold: all 40 light
    # never further than SHARE_MAX_SHIFT of light share from the plan's: at most 60 % of the recent ones heavy
    assert max(thresholds) <= keeper.threshold_for(0.5 - SHARE_MAX_SHIFT) + 1e-9
    assert max(thresholds) > 0.55


def test_each_decision_is_held_to_its_own_plans_share():
    keeper = ShareKeeper(2000)
    rng = random.Random(5)
    for i in range(50):  # 500 decisions under t = 0.5, share held at a half
        keeper.thresholds(AT_TARGET, i * 100.0, [rng.random() for _ in range(10)])
    lower = Plan(threshold=0.3, target_threshold=0.3, share_window_ms=WINDOW_MS)  # a new plan: 70 % light
    first = keeper.thresholds(lower, 5000.0, [0.5])[0]
    # no make-up for the old plan's half: the threshold of the new plan's 70 %, not of 70 % + SHARE_MAX_SHIFT
    assert abs(first - 0.3) < 0.03, first


def test_the_plans_threshold_stands_without_a_window_without_room_or_without_routing():
    rng = random.Random(1)
    confident = [0.6 + 0.3 * rng.random() for _ in range(200)]
    for plan in (
        Plan(threshold=0.5, target_threshold=0.5, share_window_ms=0.0),  # a fixed plan, no controller
        Plan(threshold=0.4, target_threshold=0.5, share_window_ms=WINDOW_MS),  # lowered for the heavy stage
        Plan(threshold=0.5, target_threshold=0.5, share_window_ms=WINDOW_MS, discriminator_routes=False),
    ):
        keeper = ShareKeeper(2000)
        keeper.thresholds(plan, 0.0, [rng.random() for _ in range(200)])
        assert set(keeper.thresholds(plan, 100.0, confident)) == {plan.threshold}


def test_a_light_answer_below_the_target_is_the_plans_only_where_the_plan_lowered_its_threshold():
    assert light_reason(Decision.LIGHT, 0.48, AT_TARGET) == LightReason.CONFIDENT  # the keeper's, at the target
    lowered = Plan(threshold=0.4, target_threshold=0.5)
    assert light_reason(Decision.LIGHT, 0.45, lowered) == LightReason.PLAN
    assert light_reason(Decision.LIGHT, 0.55, lowered) == LightReason.CONFIDENT
    assert light_reason(Decision.LIGHT, 0.55, Plan(threshold=0.5, target_threshold=0.6)) == LightReason.PLAN
    no_routing = Plan(threshold=0.5, target_threshold=0.5, discriminator_routes=False)
    assert light_reason(Decision.LIGHT, 0.45, no_routing) == LightReason.PLAN
    assert light_reason(Decision.LATE, 0.45, AT_TARGET) == LightReason.DEADLINE


class Scripted:
    """A discriminator model that returns the next of its confidences."""

    name = "scripted"

    def __init__(self, confidences: list[float]):
        self.left = iter(confidences)

    def score(self, prompts, images, prompt_indices=None):
        return [next(self.left) for _ in prompts]


def _light_answers(redis_url: str, confidences: list[float], fixed_threshold: float | None) -> int:
    """How many of ``confidences`` (scored in batches of eight) the discriminator answers light under a plan at
    the cascade's threshold 0.5 with a window of a minute (every decision inside it)."""

    async def scenario() -> int:
        cfg = DiscriminatorConfig(redis_url=redis_url, backend="profiled", instance_id="d", threshold=fixed_threshold)
        svc = Service("discriminator", cfg)
        disc = Discriminator(svc)
        disc.model = Scripted(confidences)
        plan = Plan(threshold=0.5, target_threshold=0.5, share_window_ms=60_000.0, degrade_late=False)

        async def current() -> Plan:
            return plan

        disc.plans.current = current  # type: ignore[method-assign]
        light = 0
        try:
            for start in range(0, len(confidences), 8):
                jobs = [
                    RoutedJob(job_id=f"j{start + i}", prompt="p", arrival_ms=0.0, deadline_ms=now_ms() + 60_000, seed=1)
                    for i in range(min(8, len(confidences) - start))
                ]
                outputs, _scores, _exchanges = await disc.route(
                    [LightResult(job=job, image=b"png", image_format="png") for job in jobs]
                )
                light += sum(stream == svc.keys.completions for stream, _payload in outputs)
        finally:
            await svc.redis.aclose()
        return light

    return asyncio.run(scenario())


def test_the_discriminator_holds_the_share_and_a_configured_threshold_stays_fixed(redis_server):
    rng = random.Random(11)
    # 100 confidences as the plan expects (half at or above 0.5), then 100 just confident ones
    confidences = [rng.random() for _ in range(100)] + [0.5 + 0.25 * rng.random() for _ in range(100)]
    fixed_light = sum(c >= 0.5 for c in confidences)
    assert _light_answers(redis_server.url, confidences, fixed_threshold=0.5) == fixed_light
    held = _light_answers(redis_server.url, confidences, fixed_threshold=None)
    assert held <= fixed_light - 10, (held, fixed_light)  # 129 against 145
