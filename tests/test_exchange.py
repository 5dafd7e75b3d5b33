"""The deadline rule's exchange: a job the heavy stage cannot take in time takes the place of an easier one
that still waits for a heavy worker. The rule (common/routing.exchange_for), then the discriminator doing it
against a real Redis: exactly one answer per job, also when a heavy worker takes the waiting job first."""

from __future__ import annotations

import asyncio

from common.messages import Completion, LightReason, LightResult, Plan, Role, RoutedJob
from common.routing import Stage, exchange_for
from common.service import Service, now_ms
from common.streams import backlog, ensure_group, undelivered
from services.discriminator import HEAVY_GROUP, Discriminator, DiscriminatorConfig

# One heavy worker, one job a batch of a second: a job joining behind ``backlog`` finishes after backlog + 1 s.
ONE_PER_SECOND = dict(workers=1, batch=1, batch_ms=1000.0)


def test_the_late_job_takes_the_place_of_the_most_confident_waiting_one():
    heavy = Stage(backlog=3, **ONE_PER_SECOND)
    # late behind 3 (done at 4 s), in time behind 2 (3 s): the deadline at 3.5 s
    assert not heavy.on_time(0.0, 3500.0)
    assert exchange_for(heavy, 0.0, 3500.0, 0.02, [0.15, 0.05, 0.19]) == 2
    assert heavy.backlog == 3  # the rule only looks


def test_no_exchange_with_harder_jobs_unknown_ones_or_when_one_fewer_is_still_late():
    heavy = Stage(backlog=3, **ONE_PER_SECOND)
    assert exchange_for(heavy, 0.0, 3500.0, 0.10, [0.05, 0.08]) is None  # every waiting job is harder
    assert exchange_for(heavy, 0.0, 3500.0, 0.10, [None, None]) is None  # sent straight to heavy: no light image
    assert exchange_for(heavy, 0.0, 3500.0, 0.02, [None, 0.04, None]) == 1
    assert exchange_for(heavy, 0.0, 2500.0, 0.02, [0.15, 0.19]) is None  # behind 2 it is still late
    assert exchange_for(heavy, 0.0, 3500.0, 0.02, []) is None


class FixedScore:
    name = "fixed"

    def __init__(self, score: float):
        self.value = score

    def score(self, prompts, images, prompt_indices=None):
        return [self.value] * len(prompts)


def _waiting_job(name: str, confidence: float) -> RoutedJob:
    return RoutedJob(
        job_id=name,
        prompt=f"prompt of {name}",
        arrival_ms=0.0,
        deadline_ms=now_ms() + 60_000,
        confidence=confidence,
        light_image=b"light png of " + name.encode(),
        light_image_format="png",
        seed=1,
    )


def _answers(entries: list[tuple[str, dict]]) -> list[Completion]:
    return [Completion.decode(fields[b"m"]) for _id, fields in entries]


def _exchange_scenario(redis_url: str, *, worker_takes_first: bool) -> tuple[list[Completion], list[str], list[str]]:
    """Three jobs in the heavy queue (one already with a worker), then a late job with confidence 0.02 and a
    deadline it meets only behind one fewer. Returns the answers, the job ids the heavy queue still holds
    undelivered, and the ids a heavy worker was handed."""

    async def scenario() -> tuple[list[Completion], list[str], list[str]]:
        svc = Service("discriminator", DiscriminatorConfig(redis_url=redis_url, backend="profiled", instance_id="d"))
        disc, r, keys = Discriminator(svc), svc.redis, svc.keys
        disc.model = FixedScore(0.02)
        try:
            await ensure_group(r, keys.heavy_queue, HEAVY_GROUP)
            for name, confidence in [("running", 0.15), ("hard", 0.05), ("easy", 0.19)]:
                await r.xadd(keys.heavy_queue, {"m": _waiting_job(name, confidence).encode()})
            handed = await r.xreadgroup(HEAVY_GROUP, "heavy-1", {keys.heavy_queue: ">"}, count=1)

            async def stage(role, plan, times):
                return Stage(backlog=3, **ONE_PER_SECOND)  # what the watcher would measure: 2 waiting + 1 running

            disc.heavy.stage = stage  # type: ignore[method-assign]
            disc.plans.current = lambda: _plan()  # type: ignore[method-assign]
            late = RoutedJob(job_id="late", prompt="hard", arrival_ms=0.0, deadline_ms=now_ms() + 3500, seed=2)
            processed = await disc._process([], [LightResult(job=late, image=b"late light png", image_format="png")])
            if worker_takes_first:  # between the discriminator's look and its transaction
                handed += await r.xreadgroup(HEAVY_GROUP, "heavy-2", {keys.heavy_queue: ">"}, count=10)
            async with r.pipeline(transaction=True) as pipe:
                for stream, payload in processed.outputs:
                    pipe.xadd(stream, {"m": payload})
                assert processed.extra is not None
                processed.extra(pipe)
                await pipe.execute()
            answers = _answers(await r.xrange(keys.completions))
            still = [
                RoutedJob.decode(e.payload or b"").job_id
                for e in await undelivered(r, keys.heavy_queue, HEAVY_GROUP, 10)
            ]
            taken = [RoutedJob.decode(f[b"m"]).job_id for _s, entries in handed for _id, f in entries]
            # the deadline rule's view of the queue: the three jobs left (running or waiting), not Redis's lag
            # (7.0 counts a deleted entry as still to read), then none once workers took and acked them all
            assert await backlog(r, keys.heavy_queue, HEAVY_GROUP) == 3
            rest = await r.xreadgroup(HEAVY_GROUP, "heavy-3", {keys.heavy_queue: ">"}, count=10)
            await r.xack(keys.heavy_queue, HEAVY_GROUP, *[i for _s, entries in handed + rest for i, _f in entries])
            assert await backlog(r, keys.heavy_queue, HEAVY_GROUP) == 0
            return answers, still, taken
        finally:
            await r.aclose()

    return asyncio.run(scenario())


async def _plan() -> Plan:
    return Plan(threshold=0.21, target_threshold=0.21, degrade_late=True)


def test_the_discriminator_exchanges_in_the_heavy_queue_exactly_once(redis_server):
    answers, still, taken = _exchange_scenario(redis_server.url, worker_takes_first=False)
    assert taken == ["running"]
    assert still == ["hard", "late"]  # the easy one yielded its place; the late one joined at the end
    assert [(a.job_id, a.answered_by, a.light_reason) for a in answers] == [("easy", Role.LIGHT, LightReason.DEADLINE)]
    assert answers[0].degraded


def test_a_waiting_job_a_worker_took_first_is_not_exchanged_and_the_late_job_is_answered_light(redis_server):
    answers, still, taken = _exchange_scenario(redis_server.url, worker_takes_first=True)
    assert sorted(taken) == ["easy", "hard", "running"]  # every waiting job runs on heavy
    assert still == []  # the late job did not join
    assert [(a.job_id, a.answered_by, a.light_reason) for a in answers] == [("late", Role.LIGHT, LightReason.DEADLINE)]
