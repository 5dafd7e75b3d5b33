"""A model that returns fewer outputs than it was given fails the whole batch with model_error:
no job is silently dropped while its entry is acked."""

from __future__ import annotations

import asyncio

from common.messages import E_MODEL, Completion, LightResult, RoutedJob
from common.service import Service
from services.discriminator import Discriminator, DiscriminatorConfig
from services.worker import Worker, WorkerConfig


class ShortModel:
    name = "short"

    def generate(self, prompts, seeds, *, negative_prompts=None, on_step=None):
        return []  # a backend bug: nothing back for a batch of three

    def score(self, prompts, images, prompt_indices=None):
        return [0.9]  # one score for three images


def _jobs(n: int = 3) -> list[RoutedJob]:
    return [RoutedJob(job_id=f"j{i}", prompt="a cat", arrival_ms=0.0, deadline_ms=1e15, seed=i) for i in range(n)]


def _failures(outputs, keys):
    assert [stream for stream, _ in outputs] == [keys.completions] * 3
    done = [Completion.decode(payload) for _, payload in outputs]
    assert sorted(c.job_id for c in done) == ["j0", "j1", "j2"]
    assert all(c.status == "error" and c.error_code == E_MODEL for c in done)
    assert "outputs for a batch of 3" in done[0].error_message


def test_worker_answers_every_job_of_a_short_batch(redis_server):
    async def scenario():
        svc = Service("worker", WorkerConfig(redis_url=redis_server.url, backend="profiled", instance_id="w"))
        worker = Worker(svc)
        worker.model = ShortModel()
        try:
            _failures(await worker._run(_jobs()), svc.keys)
        finally:
            worker.encoder.close()
            await svc.redis.aclose()

    asyncio.run(scenario())


def test_discriminator_answers_every_job_of_a_short_batch(redis_server):
    async def scenario():
        svc = Service(
            "discriminator", DiscriminatorConfig(redis_url=redis_server.url, backend="profiled", instance_id="d")
        )
        disc = Discriminator(svc)
        disc.model = ShortModel()
        results = [LightResult(job=job, image=b"png", image_format="png") for job in _jobs()]
        try:
            _failures((await disc.route(results))[0], svc.keys)
        finally:
            await svc.redis.aclose()

    asyncio.run(scenario())
