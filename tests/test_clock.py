"""Clock skew between hosts (issue 24.10): deadlines and liveness use Redis's TIME, not each host's wall
clock. The skewed host is a real service process whose wall clock libfaketime moves (LD_PRELOAD, the
Debian ``faketime`` package): nothing in the product reads a test-only setting."""

from __future__ import annotations

import asyncio
import glob
import time

import pytest
import redis

from common.client import Client
from common.clock import RedisClock
from common.config import Keys, RedisSettings
from common.localstack import LocalStack, StackSpec
from common.messages import Plan
from common.streams import connect

KEYS = Keys()


def skewed(offset_s: int) -> dict[str, str]:
    """Environment that moves a process's wall clock by ``offset_s`` (its monotonic clock moves by a
    constant too, which changes no interval)."""
    libs = glob.glob("/usr/lib/*/faketime/libfaketime.so.1")
    assert libs, "libfaketime is missing: apt-get install -y faketime (make test installs it)"
    return {"LD_PRELOAD": libs[0], "FAKETIME": f"{offset_s:+d}"}


def test_the_clock_follows_redis_time_not_the_local_wall_clock(redis_server):
    async def go():
        r = connect(RedisSettings(redis_url=redis_server.url))
        clock = RedisClock()
        try:
            await clock.sync(r)
            seconds, micros = await r.time()
            return clock.now_ms() - (seconds * 1000 + micros / 1000), clock.offset_ms
        finally:
            await r.aclose()

    diff, offset = asyncio.run(go())
    assert abs(diff) < 50 and abs(offset) < 50  # same host: Redis's clock is ours


@pytest.mark.slow
def test_a_heavy_host_one_second_ahead_still_answers_with_the_heavy_model(redis_server, tmp_path):
    """Every job goes to heavy (threshold above 1) with ~0.4 s to spare at the heavy worker; that worker's
    host clock runs 1 s ahead. Comparing its own clock with the router's deadline, it answered every
    job with the degraded light image; on Redis's clock it runs them all."""
    spec = StackSpec(
        redis_url=redis_server.url,
        light_workers=1,
        heavy_workers=0,
        time_scale=0.5,
        env={"DIFFSERVE_THRESHOLD": "1.01", "DIFFSERVE_SLO_MS": "1400", "DIFFSERVE_LATE_POLICY": "light"},
    )
    with LocalStack(spec, str(tmp_path / "logs")) as stack:
        stack.spawn("worker-heavy", "worker", "--role", "heavy", env=skewed(+1))
        stack.wait_ready(["worker-heavy"])

        async def scenario():
            async with Client(redis_url=redis_server.url) as client:
                return [await client.submit(f"a lighthouse {i}", timeout=30) for i in range(3)]

        results = asyncio.run(scenario())
        r = redis.Redis.from_url(redis_server.url)
        offset, busy_until = r.hmget(KEYS.worker_info("worker-heavy"), ["clock_offset_ms", "busy_until_ms"])
        seconds, micros = r.time()
    assert [(r.status, r.answered_by, r.degraded) for r in results] == [("ok", "heavy", False)] * 3
    assert 900 < float(offset) < 1100  # the skew is real, and reported
    # when its last batch was to end, on Redis's clock too (its own would put it ~1 s in the future)
    redis_now_ms = seconds * 1000 + micros / 1000
    assert redis_now_ms - 10_000 < float(busy_until) < redis_now_ms + 500, (busy_until, redis_now_ms)


@pytest.mark.slow
def test_a_worker_ten_seconds_behind_is_live_for_the_controller_and_the_router(redis_server, tmp_path):
    """The only light worker's clock is 10 s behind. On its own clock its heartbeats looked 10 s old: the
    controller left it out of the plan and the router refused every job (no live light worker)."""
    spec = StackSpec(redis_url=redis_server.url, light_workers=0, heavy_workers=0, controller=True, time_scale=0.1)
    with LocalStack(spec, str(tmp_path / "logs")) as stack:
        stack.spawn("worker-late", "worker", "--role", "light", env=skewed(-10))
        stack.wait_ready(["worker-late"])
        r = redis.Redis.from_url(redis_server.url)
        deadline, roles = time.monotonic() + 15, {}
        while time.monotonic() < deadline and "worker-late" not in roles:
            raw = r.get(KEYS.plan)
            roles = Plan.decode(raw).roles if raw else {}
            time.sleep(0.2)

        async def scenario():
            async with Client(redis_url=redis_server.url) as client:
                return await client.submit("a lighthouse", timeout=30)

        result = asyncio.run(scenario())
        offset = r.hget(KEYS.worker_info("worker-late"), "clock_offset_ms")
    assert "worker-late" in roles
    assert result.status == "ok", result.error_message
    assert -10_100 < float(offset) < -9_900
