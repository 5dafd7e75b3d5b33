"""The controller's replay of recent arrivals (common/replay.py): the histogram it reads, a fixed plan
replayed as the simulator plays it, and the search keeping the plan in force unless another is better."""

from __future__ import annotations

import pytest

from common.backends.profiled import ProfiledDiscriminator
from common.control import ControlSettings
from common.planner import FixedPlan, quality_threshold
from common.profiles import load_cascade_profile, load_prompts
from common.replay import ArrivalHistory, Candidate, Replay, search
from loadtest.report import summarize
from loadtest.simulation import SimConfig, simulate
from loadtest.traces import generate


@pytest.fixture(scope="module")
def profile():
    return load_cascade_profile("sdturbo-sdv15", "a100")


def test_history_spreads_each_bucket_and_keeps_to_the_window():
    h = ArrivalHistory(bucket_ms=100.0)
    h.add(1050.0, 2)  # bucket 10
    h.add(1990.0)  # bucket 19
    h.add(5000.0)  # bucket 50: after the window's end
    assert h.window(end_ms=2000.0, span_ms=1000.0) == [25.0, 75.0, 950.0]
    h.prune(before_ms=1500.0)
    assert sorted(h.counts) == [19, 50]


def _candidate(text: str) -> Candidate:
    f = FixedPlan.parse(text)
    return Candidate(
        threshold=f.threshold,
        light_workers=f.light_workers,
        light_batch=f.light_batch,
        heavy_workers=f.heavy_workers,
        heavy_batch=f.heavy_batch,
    )


@pytest.mark.parametrize("fill_ms", [0.0, ControlSettings.heavy_fill_ms], ids=["no-fill", "fill"])
@pytest.mark.parametrize("plan", ["t=0.07,light=2x16,heavy=2x2", "t=0.2,light=2x8,heavy=6x2"])
def test_a_fixed_plan_replays_as_the_simulator_plays_it(profile, plan, fill_ms):
    """Same arrivals, same confidences, same plan: the replay's quality and answers agree with the
    simulator's (which models more: per-batch CPU time, plan refresh, a discriminator queue), with the heavy
    batch fill and without."""
    prompts = load_prompts()
    trace = generate("step", duration_s=120, n_prompts=len(prompts), seed=4)
    fixed = FixedPlan.parse(plan)
    workers = fixed.light_workers + fixed.heavy_workers
    cfg = SimConfig(
        policy="static",
        workers=workers,
        slo_ms=5000,
        fixed_plan=fixed,
        light_workers=fixed.light_workers,  # the roles of the plan from the start, as the replay has them
        control={"heavy_fill_ms": fill_ms},
    )
    sim = simulate(profile, trace, prompts, cfg)
    e = summarize(sim, slo_ms=5000, curve=profile.quality, confidence_curve=profile.curve)
    scorer = ProfiledDiscriminator(profile.discriminator, profile.curve, 0.0)
    confidences = [scorer.confidence(prompts[i], i) for i in trace.prompt_indices]
    replay = Replay(
        trace.arrivals_ms,
        profile=profile,
        latency_scale=1.0,
        slo_ms=5000,
        job_confidences=confidences,
        fill_ms=fill_ms,
        target_threshold=quality_threshold(profile),
    )
    out = replay.run(_candidate(plan))
    assert out.quality == pytest.approx(e["quality"]["estimate"], abs=0.05)
    assert out.heavy == pytest.approx(e["answered_heavy"], rel=0.02)
    assert out.misses == pytest.approx(e["slo_violation_ratio"], abs=0.01)


def test_search_keeps_the_plan_in_force_unless_another_is_clearly_better(profile):
    arrivals = [i * 125.0 for i in range(960)]  # 8 q/s for 120 s
    replay = Replay(arrivals, profile=profile, latency_scale=1.0, slo_ms=5000, draws=2)
    # two heavy workers carry ~1 q/s: t=0.21 sends 4.8 q/s on; the exchange lets the hardest of them run,
    # but the queue a worker takes from first holds easier ones too: a lower t is better
    overloaded = _candidate("t=0.21,light=2x8,heavy=2x2")
    best, tried = search(
        replay, overloaded, thresholds=[0.0, 0.05, 0.1, 0.15, 0.21], light_batches=[8], heavy_batches=[2], tie=0.005
    )
    assert tried >= 5 and best.candidate.threshold < 0.21
    assert best.quality < replay.run(overloaded).quality - 0.005
    # a huge tie: nothing beats the plan in force
    kept, _ = search(
        replay, overloaded, thresholds=[0.0, 0.05, 0.1, 0.15, 0.21], light_batches=[8], heavy_batches=[2], tie=10.0
    )
    assert kept.candidate == overloaded
