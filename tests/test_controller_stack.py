"""The controller driving a real profiled stack: at steady demand the threshold holds (small
tick-to-tick changes, never all-light while capacity allows more); a demand step moves the threshold
and it settles; no job is lost or duplicated meanwhile."""

from __future__ import annotations

import asyncio
import json
import random
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from common.cascades import cascade
from common.client import Client
from common.config import Keys
from common.control import ControlSettings
from common.localstack import LocalStack, StackSpec
from common.plan_store import load_plan
from common.planner import quality_threshold
from common.profiles import load_cascade_profile, load_prompts

TIME_SCALE = 0.2
# steady: well inside the heavy capacity (4 heavy workers carry ~3 q/s at the planned utilisation), so
# the demand estimate's noise cannot make t = 0.21 infeasible; then a step far beyond it
# (full-speed queries/s, full-speed seconds). The busy phase is long enough to settle in: with the exchange a
# threshold above what the heavy stage carries costs little, so the replay lowers it only once the level
# shift re-levels its history (four ticks), then it settles.
PHASES = [(2.5, 100.0), (14.0, 100.0), (2.5, 30.0)]
pytestmark = pytest.mark.slow


def _spec(redis_server, *, light: int, heavy: int, scale: float) -> StackSpec:
    """A profiled stack with a controller, its interval and SLO at ``scale`` (10 s and the cascade's SLO)."""
    return StackSpec(
        redis_url=redis_server.url,
        light_workers=light,
        heavy_workers=heavy,
        controller=True,
        time_scale=scale,
        controller_args=["--interval-s", str(10 * scale)],
        env={"DIFFSERVE_SLO_MS": str(cascade("sdturbo-sdv15").slo_ms * scale)},
    )


def test_threshold_holds_at_steady_demand_and_settles_after_a_step(redis_server, tmp_path):
    spec = _spec(redis_server, light=3, heavy=3, scale=TIME_SCALE)
    prompts = [p for p in load_prompts() if p]
    rng = random.Random(7)
    with LocalStack(spec, str(tmp_path / "logs")) as stack:

        async def scenario():
            plans = {}  # version -> (phase, plan)
            async with Client(redis_url=redis_server.url) as client:
                stop = asyncio.Event()
                phase_now = [0]

                async def sample():
                    while not stop.is_set():
                        plan = await load_plan(client.redis, Keys())
                        if plan is not None:
                            plans.setdefault(plan.version, (phase_now[0], plan))
                        await asyncio.sleep(0.1)

                sampler = asyncio.create_task(sample())
                tasks = []
                for phase, (rate, seconds) in enumerate(PHASES):
                    phase_now[0] = phase
                    end = time.monotonic() + seconds * TIME_SCALE
                    while time.monotonic() < end:
                        tasks.append(asyncio.create_task(client.submit(prompts[len(tasks)], timeout=120)))
                        await asyncio.sleep(rng.expovariate(rate / TIME_SCALE))
                results = await asyncio.gather(*tasks)
                stop.set()
                await sampler
                await asyncio.sleep(0.5)
                return results, [plans[v] for v in sorted(plans)], await client.redis.xlen(client.reply_stream)

        results, plans, delivered = asyncio.run(scenario())
        assert all(stack.alive().values())
    assert delivered == len(results) and len({x.job_id for x in results}) == len(results)
    assert all(x.status == "ok" for x in results), {x.error_code for x in results}
    plans = [(phase, p) for phase, p in plans if len(p.roles) == 6]  # plans made before every worker registered
    thresholds = [p.threshold for _phase, p in plans]
    steps = [abs(b - a) for a, b in zip(thresholds, thresholds[1:], strict=False)]
    # smooth: bounded steps, never a flip (a larger step only once the load moved to another level)
    assert max(steps) <= ControlSettings.shift_threshold_step + 1e-9, thresholds

    def phase(i):
        return [p for ph, p in plans if ph == i]

    steady = phase(0)[5:]  # after the first plans have placed the roles (a move is confirmed, then loads)
    assert steady and min(p.threshold for p in steady) > 0, [p.threshold for p in steady]
    assert max(p.threshold for p in steady) - min(p.threshold for p in steady) <= 0.05
    held = [abs(b.threshold - a.threshold) for a, b in zip(steady, steady[1:], strict=False)]
    assert max(held, default=0.0) <= ControlSettings.max_threshold_step + 1e-9, [p.threshold for p in steady]
    high = phase(1)
    assert high[-1].threshold < steady[-1].threshold  # the step moved it
    # and it settled: the last four ticks of the busy phase hold one level, the steady phase's band wide (a
    # tick that finds the heavy stage caught up may lift t by more than a step, the next replay takes it back)
    settled = [p.threshold for p in high[-4:]]
    assert max(settled) - min(settled) <= 0.05 + 1e-9, settled
    assert max(settled) < min(p.threshold for p in steady), (settled, [p.threshold for p in steady])
    assert max(p.light_workers for p in high) >= max(p.light_workers for p in steady)


def test_the_first_plan_has_the_registered_workers_and_heavy_answers_come_from_the_start(redis_server, tmp_path):
    """Before, the first plan was made before any worker registered (t = 0, no roles) and every answer
    of the first interval came from the light model."""
    spec = _spec(redis_server, light=2, heavy=2, scale=TIME_SCALE)
    prompts = [p for p in load_prompts() if p][:20]
    with LocalStack(spec, str(tmp_path / "logs")) as stack:

        async def first_ten_seconds():  # 2 q/s for 10 full-speed seconds, from the moment the stack is up
            async with Client(redis_url=redis_server.url) as client:

                async def one(i, prompt):
                    await asyncio.sleep(i * 0.5 * TIME_SCALE)
                    return await client.submit(prompt, timeout=60)

                return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))

        results = asyncio.run(first_ten_seconds())
        log = (stack.log_dir / "controller.log").read_text().splitlines()
    plans = [json.loads(line) for line in log if '"new plan"' in line]
    first = plans[0]
    assert first["version"] == 1 and first["feasible"], first
    assert first["light_workers"] + first["heavy_workers"] == 4 and first["heavy_workers"] >= 1, first
    assert first["threshold"] > 0, first
    assert all(r.status == "ok" for r in results)
    heavy = sum(r.answered_by == "heavy" for r in results)
    assert heavy >= len(results) // 4, [(r.answered_by, r.light_reason) for r in results]


def _phases(redis_server, tmp_path, phases, *, scale: float, metric: str):
    """Four workers (the stack starts two light, two heavy) and a controller, driven through ``phases``
    ((full-speed q/s, full-speed s), ...): the results, the controller's "new plan" log records and the samples of
    its ``metric``."""
    spec = _spec(redis_server, light=2, heavy=2, scale=scale)
    prompts = [p for p in load_prompts() if p]
    rng = random.Random(3)
    with LocalStack(spec, str(tmp_path / "logs")) as stack:

        async def scenario():
            async with Client(redis_url=redis_server.url) as client:
                tasks = []
                for rate, seconds in phases:
                    end = time.monotonic() + seconds * scale
                    while time.monotonic() < end:
                        tasks.append(asyncio.create_task(client.submit(prompts[len(tasks)], timeout=120)))
                        await asyncio.sleep(rng.expovariate(rate / scale))
                return await asyncio.gather(*tasks)

        results = asyncio.run(scenario())
        assert all(stack.alive().values())
        log = (stack.log_dir / "controller.log").read_text().splitlines()
        page = urllib.request.urlopen(f"http://127.0.0.1:{stack.metrics_ports['controller']}/metrics", timeout=5)
        samples = [
            sample
            for family in text_string_to_metric_families(page.read().decode())
            for sample in family.samples
            if sample.name == metric
        ]
    assert len({r.job_id for r in results}) == len(results)
    # every job answered; on a busy 2-core box the router may still refuse a few at a burst's peak
    assert sum(r.status == "ok" for r in results) >= 0.95 * len(results), {r.error_code for r in results}
    return results, [json.loads(line) for line in log if '"new plan"' in line], samples


def test_a_burst_gets_a_light_worker_between_ticks(redis_server, tmp_path):
    """Four workers at 3 q/s: the controller runs one light worker and three heavy.  A 10x burst that one
    light worker cannot absorb makes it move a heavy worker to the light stage at once, not at its next
    tick (the burst plan's reason says so)."""
    phases = ((3.0, 40.0), (30.0, 8.0), (3.0, 12.0))
    _results, plans, counted = _phases(redis_server, tmp_path, phases, scale=0.5, metric="diffserve_burst_plans_total")
    before = [p for p in plans if p["version"] > 1 and not p["reason"].startswith("burst")]
    assert any((p["light_workers"], p["heavy_workers"]) == (1, 3) for p in before), [
        (p["light_workers"], p["reason"]) for p in plans
    ]
    burst = [p for p in plans if p["reason"].startswith("burst")]
    assert burst and burst[0]["light_workers"] == 2, [(p["light_workers"], p["reason"]) for p in plans]
    assert [s.value for s in counted] == [len(burst)]  # diffserve_burst_plans_total


def test_a_step_nudges_the_threshold_between_ticks(redis_server, tmp_path):
    """Four workers (one light, three heavy) at 2 q/s hold the cascade's threshold.  A step to 10 q/s sends the
    heavy stage more than it runs: the controller takes the threshold a step down between ticks (the heavy batch
    fill turns on), says why in the plan and counts it.  After the load falls to 1 q/s the threshold is back at
    the cascade's (by a nudge up or by a tick, whichever comes first: tests/test_control.py and
    tests/test_simulate.py pin the nudge up), and every nudge logged is counted."""
    phases = ((2.0, 30.0), (10.0, 30.0), (1.0, 25.0))
    _results, plans, samples = _phases(
        redis_server, tmp_path, phases, scale=0.5, metric="diffserve_threshold_nudges_total"
    )
    nudges = {s.labels["direction"]: s.value for s in samples}
    target = quality_threshold(load_cascade_profile("sdturbo-sdv15", "a100"))
    seen = [(p["threshold"], p["reason"].split(":")[0]) for p in plans]
    down = [i for i, p in enumerate(plans) if p["reason"].startswith("heavy pressure")]
    assert down and plans[down[0]]["threshold"] == pytest.approx(target - 0.02), seen
    assert plans[down[0] - 1]["threshold"] == pytest.approx(target), seen
    assert plans[-1]["threshold"] == pytest.approx(target), seen
    up = [p for p in plans if p["reason"].startswith("heavy room")]
    assert (nudges.get("down", 0), nudges.get("up", 0)) == (len(down), len(up)), (nudges, seen)
