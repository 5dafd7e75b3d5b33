"""A worker encodes and writes a batch while its model runs the next (common/stage.Overlap): a worker that
stops right after a batch ran still writes that batch's outputs and acks it before it exits."""

from __future__ import annotations

import asyncio

from common.messages import LightResult, Plan, Role, RoutedJob
from common.service import now_ms
from common.streams import backlog


def _job(name: str) -> RoutedJob:
    now = now_ms()
    return RoutedJob(job_id=name, prompt=f"prompt of {name}", arrival_ms=now, deadline_ms=now + 60_000, seed=1)


async def _one_batch_then_stop(redis_url: str, make_worker) -> tuple[list[str], int, bool]:
    """A light worker runs one batch of three and is closed at once: the light results written, the light
    queue's backlog after, and whether the batch's tail was still running when the step returned."""
    plan = Plan(version=1, threshold=0.2, light_batch=4, roles={"w": Role.LIGHT})
    worker = await make_worker(redis_url, "overlap", "w", "light", plan, 0.01)
    r, keys = worker.r, worker.keys
    release = asyncio.Event()
    answer = worker._answer

    async def slow_answer(done):  # an encoder slower than the step: the tail outlives it
        await release.wait()
        return await answer(done)

    worker._answer = slow_answer
    try:
        await worker.start()
        for name in ("a", "b", "c"):
            await r.xadd(keys.light_queue, {"m": _job(name).encode()})
        await worker.step()
        pending_after_step = await r.xlen(keys.light_results) == 0
        asyncio.get_running_loop().call_later(0.1, release.set)
    finally:
        await worker.close()  # as serve() does once the stop signal ends the batch loop
    written = [LightResult.decode(f[b"m"]).job.job_id for _id, f in await r.xrange(keys.light_results)]
    left = await backlog(r, keys.light_queue, "workers")
    await r.aclose()
    return sorted(written), left, pending_after_step


def test_a_stopping_worker_writes_the_batch_it_ran_before_it_exits(redis_server, profiled_worker):
    written, left, pending_after_step = asyncio.run(_one_batch_then_stop(redis_server.url, profiled_worker))
    assert pending_after_step  # the step returned while the batch's encoding and writes went on
    assert written == ["a", "b", "c"]
    assert left == 0  # and acked
