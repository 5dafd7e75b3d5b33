"""Cancel that reaches the model, and progress, on the tiny real models (diffusers' callback_on_step_end)
with a real Redis: a heavy batch watches its jobs' cancel flags while it runs, stops at the next
denoising step once every job in it is cancelled, drops the result of a job cancelled alongside others,
and sends the jobs that asked the step reached."""

from __future__ import annotations

import asyncio
import threading

import pytest
import redis.asyncio as aioredis

from common.backends import Interrupted
from common.config import Keys
from common.messages import ENTRY_FIELD, Progress, RoutedJob
from services.worker import RunningBatch, WorkerConfig

KEYS = Keys()


def _jobs(n: int) -> list[RoutedJob]:
    return [
        RoutedJob(
            job_id=f"j{i}",
            prompt=f"a lighthouse number {i}",
            arrival_ms=0.0,
            deadline_ms=1e15,
            seed=i,
            reply_to=f"{KEYS.reply_prefix}t{i}",
            progress=True,
        )
        for i in range(n)
    ]


async def _progress(r: aioredis.Redis, job: RoutedJob) -> list[tuple[int, int]]:
    entries = await r.xrange(job.reply_to or "")
    return [(p.step, p.steps) for p in (Progress.decode(fields[ENTRY_FIELD]) for _id, fields in entries)]


def test_a_batch_stops_at_the_next_step_once_all_its_jobs_are_cancelled(redis_server, tiny_models):
    from common.backends.diffusion import DiffusersModel, tiny_spec
    from common.cascades import MODELS

    model = DiffusersModel(tiny_spec(MODELS["sdv15"], tiny_models), "heavy", "cpu")
    model.load()
    steps = model.spec.steps
    jobs = _jobs(2)

    async def go() -> None:
        r = aioredis.Redis.from_url(redis_server.url)
        running = RunningBatch(r, KEYS, WorkerConfig(instance_id="w"), jobs, "sdv15")
        first, resume = threading.Event(), threading.Event()

        def on_step(step: int, total: int) -> None:
            running.on_step(step, total)  # raises once the batch is stopped
            if step == 1:  # hold the model after its first step while the test cancels
                first.set()
                resume.wait(30)

        run = asyncio.ensure_future(
            asyncio.to_thread(model.generate, [j.prompt for j in jobs], [j.seed for j in jobs], on_step=on_step)
        )
        try:
            assert await asyncio.to_thread(first.wait, 30)
            await running.poll()
            assert [await _progress(r, j) for j in jobs] == [[(1, steps)], [(1, steps)]]
            await r.set(KEYS.cancel("j0"), 1)
            await running.poll()  # one of two cancelled: the batch runs on, that job's result will be dropped
            assert running.cancelled == {"j0"} and not running.stop.is_set()
            await running.poll()  # nothing moved: no second progress entry
            assert await _progress(r, jobs[1]) == [(1, steps)]
            await r.set(KEYS.cancel("j1"), 1)
            await running.poll()
            assert running.cancelled == {"j0", "j1"} and running.stop.is_set()
        finally:
            resume.set()
        with pytest.raises(Interrupted) as caught:
            await run
        assert (caught.value.step, caught.value.steps) == (2, steps)
        await r.aclose()

    asyncio.run(go())
