"""The controller driving a real profiled stack through a demand step (low -> high -> low):
workers switch roles, the threshold moves, and no job is lost or duplicated meanwhile."""

from __future__ import annotations

import asyncio
import random
import time

import redis

from common.cascades import cascade
from common.client import Client
from common.config import Keys
from common.localstack import LocalStack, StackSpec
from common.plan_store import load_plan
from common.profiles import load_prompts

TIME_SCALE = 0.2
PHASES = [(2.0, 40.0), (40.0, 40.0), (2.0, 50.0)]  # (full-speed queries/s, full-speed seconds)


def test_demand_step_moves_roles_and_threshold_without_losing_jobs(redis_server, tmp_path):
    r = redis.Redis.from_url(redis_server.url)
    spec = StackSpec(redis_url=redis_server.url, light_workers=3, heavy_workers=3, controller=True,
                     time_scale=TIME_SCALE, controller_args=["--interval-s", str(10 * TIME_SCALE)],
                     env={"DIFFSERVE_SLO_MS": str(cascade("sdturbo-sdv15").slo_ms * TIME_SCALE)})
    prompts = load_prompts()
    rng = random.Random(7)
    with LocalStack(spec, str(tmp_path / "logs")) as stack:
        async def scenario():
            samples = []  # (phase, plan)
            async with Client(redis_url=redis_server.url) as client:
                tasks = []
                for phase, (rate, seconds) in enumerate(PHASES):
                    end = time.monotonic() + seconds * TIME_SCALE
                    while time.monotonic() < end:
                        tasks.append(asyncio.create_task(client.submit(prompts[len(tasks)], timeout=120)))
                        await asyncio.sleep(rng.expovariate(rate / TIME_SCALE))
                        if len(tasks) % 10 == 0:
                            plan = await load_plan(client.redis, Keys())
                            if plan:
                                samples.append((phase, plan))
                results = await asyncio.gather(*tasks)
                await asyncio.sleep(0.5)
                return results, samples, await client.redis.xlen(client.reply_stream)

        results, samples, delivered = asyncio.run(scenario())
        switched = sum((tmp_path / "logs" / f"{n}.log").read_text().count("role switched")
                       for n in stack.procs if n.startswith("worker"))
        assert all(stack.alive().values())
    assert delivered == len(results) and len({x.job_id for x in results}) == len(results)
    assert all(x.status == "ok" for x in results), {x.error_code for x in results}
    assert switched >= 1
    def settled(phase):  # plans of the second half of a phase
        plans = [p for ph, p in samples if ph == phase]
        return plans[len(plans) // 2:]

    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    low, high = settled(0), settled(1)
    assert mean([p.light_workers for p in high]) > mean([p.light_workers for p in low])
    assert mean([p.threshold for p in high]) < mean([p.threshold for p in low])
    assert r.get(Keys().plan) is not None
