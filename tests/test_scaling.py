"""The autoscaler's signal (common/scaling.py) against the planner itself, and the controller's gauge
``diffserve_workers_wanted`` against a real redis-server."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis.asyncio as aioredis

from common import metrics
from common import planner as P
from common.config import Keys
from common.control import ControlSettings
from common.localstack import RedisServer
from common.profiles import load_cascade_profile
from common.scaling import workers_wanted
from common.service import Service, now_ms
from services.controller import Controller, ControllerConfig


@pytest.fixture(scope="module")
def sdturbo():
    return load_cascade_profile("sdturbo-sdv15", "a100")


@pytest.fixture(scope="module")
def settings(sdturbo):
    return ControlSettings(slo_ms=sdturbo.slo_ms)


def full_plan(profile, settings, demand, workers, **kw):
    """The planner over its whole threshold grid, as the controller calls it."""
    return P.plan(
        profile,
        demand,
        workers,
        policy=settings.policy,
        slo_ms=settings.slo_ms,
        headroom=settings.headroom,
        spare_util=settings.spare_util,
        drain_s=settings.drain_intervals * settings.interval_s,
        **kw,
    )


def test_more_demand_wants_more_workers_up_to_the_quality_target(sdturbo, settings):
    best = full_plan(sdturbo, settings, 0.0, 64)  # what the SLO allows when capacity is no limit
    assert best.objective == "quality" and best.feasible
    demands = [0.5, 2, 5, 10, 20, 40, 60]
    wanted = [workers_wanted(sdturbo, settings, d, max_workers=64) for d in demands]
    counts = [w.workers for w in wanted]
    assert counts == sorted(counts) and counts[0] < counts[3] < counts[-1], counts
    for w in wanted:
        assert w.reached and w.estimated_quality == pytest.approx(best.estimated_quality)
    # beyond what 64 workers carry at that quality: all 64, at the quality they reach, and it is worse
    over = workers_wanted(sdturbo, settings, 1000.0, max_workers=64)
    assert over.workers == 64 and not over.reached
    assert over.estimated_quality > best.estimated_quality  # FID: lower is better
    assert over.estimated_quality == pytest.approx(full_plan(sdturbo, settings, 1000.0, 64).estimated_quality)


@pytest.mark.parametrize("demand", [1.0, 8.0, 25.0])
def test_wanted_is_the_fewest_workers_whose_plan_reaches_the_target(sdturbo, settings, demand):
    """Checked by the planner over its whole grid, one cluster size at a time."""
    target = full_plan(sdturbo, settings, 0.0, 64).estimated_quality
    w = workers_wanted(sdturbo, settings, demand, max_workers=64)
    at = full_plan(sdturbo, settings, demand, w.workers)
    assert at.feasible and at.estimated_quality == pytest.approx(target)
    below = full_plan(sdturbo, settings, demand, w.workers - 1)
    assert not below.feasible or below.estimated_quality > target + 1e-9, (w, below.estimated_quality)


def test_backlog_and_peak_demand_want_more(sdturbo, settings):
    calm = workers_wanted(sdturbo, settings, 10.0)
    backlog = workers_wanted(sdturbo, settings, 10.0, queues=P.QueueStats(heavy_backlog=200))
    peak = workers_wanted(sdturbo, settings, 10.0, light_demand_qps=60.0)
    assert backlog.workers > calm.workers and peak.workers > calm.workers


def test_the_threshold_objective_and_single_model_policies(sdturbo):
    paper = ControlSettings(slo_ms=sdturbo.slo_ms, policy="diffserve-threshold")
    w = workers_wanted(sdturbo, paper, 10.0)
    assert w.reached and w.objective == "threshold" and w.threshold == full_plan(sdturbo, paper, 0.0, 64).threshold
    light = ControlSettings(slo_ms=sdturbo.slo_ms, policy="clipper-light")
    heavy = ControlSettings(slo_ms=sdturbo.slo_ms, policy="clipper-heavy")
    assert workers_wanted(sdturbo, light, 10.0).workers < workers_wanted(sdturbo, heavy, 10.0).workers
    with pytest.raises(ValueError):
        workers_wanted(sdturbo, paper, 1.0, max_workers=0)


def test_controller_publishes_workers_wanted(sdturbo):
    """Each tick exports what workers_wanted says for the demand the controller measured."""
    server = RedisServer().start()
    ns = "t" + uuid.uuid4().hex[:8]
    keys = Keys(ns)

    async def scenario() -> list[float]:
        r = aioredis.from_url(server.url)
        cfg = ControllerConfig(redis_url=server.url, namespace=ns, interval_s=0.5, backend="profiled")
        svc = Service("controller", cfg)
        await svc.wait_for_redis()
        controller = Controller(svc)
        seen = []
        try:
            for tick in range(6):
                for w in ("w0", "w1"):
                    await r.zadd(keys.workers, {w: now_ms()})
                    await r.hset(keys.worker_info(w), mapping={"role": "light" if w == "w0" else "heavy"})
                if tick >= 2:  # from the third tick on, 40 jobs a tick: demand rises
                    async with r.pipeline(transaction=False) as pipe:
                        for i in range(40):
                            pipe.xadd(keys.jobs, {"job_id": f"j{tick}-{i}", "prompt": "a cat"})
                        await pipe.execute()
                await controller.tick()
                seen.append(metrics.registry("controller").get_sample_value("diffserve_workers_wanted"))
                demand = controller.last.demand_qps
                expect = workers_wanted(
                    sdturbo,
                    controller.loop.cfg,
                    demand,
                    light_demand_qps=max(demand, controller.loop.peak.value),
                    queues=await controller.queue_stats(),
                )
                assert seen[-1] == expect.workers
                assert metrics.registry("controller").get_sample_value(
                    "diffserve_estimated_quality", {"workers": "wanted"}
                ) == (pytest.approx(expect.estimated_quality))
                live = metrics.registry("controller").get_sample_value(
                    "diffserve_estimated_quality", {"workers": "live"}
                )
                assert live == pytest.approx(controller.last_result.estimated_quality)
                await asyncio.sleep(0.1)
        finally:
            await svc.redis.aclose()
            await r.aclose()
        return seen

    try:
        seen = asyncio.run(scenario())
    finally:
        server.stop()
    assert seen[1] <= 3 and seen[-1] > seen[1], seen
