"""The heavy batch fill: while the plan lowered the threshold for the heavy stage's capacity, a heavy worker that
read fewer jobs than its batch waits a moment for more (a batch of two costs 2160 ms on the A100 table, one
1780 ms). The rule (common/routing.py), the plan that carries it, then a heavy worker against a real Redis."""

from __future__ import annotations

import asyncio

from common.backends.profiled import ProfiledModel
from common.control import ControlLoop, ControlSettings
from common.messages import Completion, Plan, Role, RoutedJob
from common.planner import QueueStats, quality_threshold
from common.profiles import load_cascade_profile
from common.routing import fill_until_ms, heavy_fill_ms
from common.service import now_ms


def test_a_heavy_worker_waits_for_more_only_while_the_heavy_stage_limits_quality():
    assert heavy_fill_ms(0.10, 0.21, 2, 400.0) == 400.0
    assert heavy_fill_ms(0.21, 0.21, 2, 400.0) == 0.0  # at the cascade's threshold the heavy stage has room
    assert heavy_fill_ms(0.10, 0.21, 1, 400.0) == 0.0  # a batch of one has nothing to fill
    assert heavy_fill_ms(0.10, None, 2, 400.0) == 0.0  # no quality curve: no target to be below


def test_the_wait_leaves_a_full_batch_time_before_the_earliest_deadline():
    assert fill_until_ms(1000.0, [10_000.0], 2160.0, 400.0) == 1400.0
    assert fill_until_ms(1000.0, [9_000.0, 3_300.0], 2160.0, 400.0) == 3300.0 - 2160.0
    assert fill_until_ms(1000.0, [2_000.0], 2160.0, 400.0) < 1000.0  # no wait at all: run it now


def test_the_plan_carries_the_fill_while_its_threshold_is_below_the_target():
    profile = load_cascade_profile("sdturbo-sdv15")
    target = quality_threshold(profile)
    loop = ControlLoop(profile, ControlSettings(slo_ms=5000.0, heavy_fill_ms=300.0))
    roles = {f"w{i}": "" for i in range(4)}
    busy = loop.solve(8.0, roles, QueueStats(), None)  # four workers cannot escalate 60 % of 8 q/s
    quiet = loop.solve(1.0, roles, QueueStats(), None)
    assert busy.threshold < target and busy.heavy_batch > 1
    assert busy.to_message(1).heavy_fill_ms == 300.0
    assert quiet.threshold == target and quiet.to_message(1).heavy_fill_ms == 0.0


def _job(name: str) -> RoutedJob:
    return RoutedJob(
        job_id=name,
        prompt=f"prompt of {name}",
        arrival_ms=now_ms(),
        deadline_ms=now_ms() + 60_000,
        confidence=0.05,
        light_image=b"light png of " + name.encode(),
        light_image_format="png",
        seed=1,
    )


async def _heavy_batches(
    redis_url: str, fill_ms: float, monkeypatch, make_worker
) -> tuple[list[int], list[str], float]:
    """A heavy worker under a plan with a batch of two: one job, a second 0.2 s later. The batch sizes its
    model ran, the jobs answered by the heavy model, and how far ahead its ``busy_until_ms`` hint lay 0.1 s
    after the first job."""
    sizes: list[int] = []
    real = ProfiledModel.generate

    def spy(self, prompts, seeds, **kw):
        sizes.append(len(prompts))
        return real(self, prompts, seeds, **kw)

    monkeypatch.setattr(ProfiledModel, "generate", spy)
    plan = Plan(
        version=1, threshold=0.1, target_threshold=0.21, heavy_batch=2, heavy_fill_ms=fill_ms, roles={"h": Role.HEAVY}
    )
    worker = await make_worker(redis_url, f"fill{fill_ms:g}", "h", "heavy", plan, 0.1)
    r, keys = worker.r, worker.keys
    try:
        await worker.start()
        await r.xadd(keys.heavy_queue, {"m": _job("first").encode()})

        ahead_ms: list[float] = []

        async def later() -> None:
            await asyncio.sleep(0.1)
            hint = await r.hget(keys.worker_info("h"), "busy_until_ms")
            ahead_ms.append(float(hint or 0.0) - now_ms())
            await asyncio.sleep(0.1)
            await r.xadd(keys.heavy_queue, {"m": _job("second").encode()})

        second = asyncio.create_task(later())
        await worker.step()
        await second
        if sizes == [1]:
            await worker.step()
        await worker.overlap.drain()  # a batch's answers are written while the model runs the next one
        answered = [Completion.decode(f[b"m"]) for _id, f in await r.xrange(keys.completions)]
        return sizes, sorted(c.job_id for c in answered if c.answered_by == Role.HEAVY), ahead_ms[0]
    finally:
        await worker.close()
        await r.aclose()


def test_a_heavy_worker_under_a_fill_runs_the_job_that_came_a_moment_later_in_the_same_batch(
    redis_server, monkeypatch, profiled_worker
):
    sizes, answered, ahead_ms = asyncio.run(_heavy_batches(redis_server.url, 1000.0, monkeypatch, profiled_worker))
    assert sizes == [2]
    assert answered == ["first", "second"]
    # while it waits it tells the controller it is busy until the fill's end and its batch of two after it
    # (2160 ms x 0.1): a burst does not take it for an idle worker
    assert 1000.0 - 100.0 < ahead_ms < 1000.0 + 216.0 + 50.0


def test_without_a_fill_the_first_job_runs_alone(redis_server, monkeypatch, profiled_worker):
    sizes, answered, _ahead_ms = asyncio.run(_heavy_batches(redis_server.url, 0.0, monkeypatch, profiled_worker))
    assert sizes == [1, 1]
    assert answered == ["first", "second"]
