"""Replays a trace against a DiffServe deployment through Redis and the client, and records
every job, every result and the plan over time.

The load tester never imports the services: it starts them as processes through
:mod:`common.localstack` (one fresh redis-server and stack per policy) or talks to an
already-running deployment at ``--redis-url``.

Times: trace arrivals are full-speed ms.  With ``time_scale`` X the job of an arrival at
``a`` ms is sent ``a·X`` ms after the start, the profiled models sleep X times their profiled
latency and the SLO is X times the cascade's, so a run at X = 0.05 is a 20x-faster replay of
the same system.  Everything recorded here is wall-clock; :mod:`loadtest.report` converts it
back to full-speed units.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
from tqdm import tqdm

from common.client import Client
from common.config import Keys, RedisSettings
from common.messages import FinalResult, Status, new_job_id
from common.plan_store import load_plan
from common.streams import backlog, connect
from loadtest.traces import Trace

if TYPE_CHECKING:
    from common.localstack import StackSpec


MAX_CONCURRENT_SENDS = 32


@dataclass
class JobRecord:
    job_id: str
    prompt_index: int
    arrival_ms: float  # in the trace, full speed
    sent_s: float = 0.0  # wall seconds after the start
    received_s: float | None = None  # wall seconds after the start
    result: FinalResult | None = None
    blank_prompt: bool = False  # its line of the prompt file is empty (answered invalid_request)


@dataclass
class RunRecord:
    """What one replay observed (wall-clock units)."""

    policy: str
    time_scale: float
    trace: Trace
    jobs: list[JobRecord]
    duplicates: int = 0  # results beyond the first for a job id
    unknown_results: int = 0  # results for job ids this run never sent
    reply_entries: int = 0  # entries that reached the reply stream (cross-check of duplicates)
    plan_samples: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0
    send_wall_s: float = 0.0
    max_send_lag_s: float = 0.0
    drained: bool = True


def _strip(result: FinalResult) -> FinalResult:
    """Keep everything but the image bytes (thousands of results stay small in memory)."""
    result.image = None
    return result


class _Progress:
    """tqdm bar: sent (the bar), answered, in flight, SLO-miss ratio so far."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.bar = tqdm(
            total=total, desc=desc, unit="q", disable=not enabled, dynamic_ncols=True, leave=True, mininterval=0.2
        )
        self.gap_s = 0.2 if sys.stderr.isatty() else 5.0  # logs get a line every few seconds, not a flood
        self.shown = 0.0

    def update(self, sent: int, answered: int, misses: int, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.shown < self.gap_s:
            return
        self.shown = now
        self.bar.n = sent
        self.bar.set_postfix(
            answered=answered,
            in_flight=sent - answered,
            slo_miss=f"{misses / answered:.1%}" if answered else "-",
            refresh=False,
        )
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


async def stop_task(task: asyncio.Task[Any] | None, timeout_s: float = 5.0) -> None:
    """Cancel ``task`` and wait until it is really done.  redis-py (8.1) sometimes swallows a
    cancellation that lands inside a command, so one ``cancel()`` is not always enough."""
    if task is None:
        return
    deadline = time.monotonic() + timeout_s
    while not task.done() and time.monotonic() < deadline:
        task.cancel()
        await asyncio.wait({task}, timeout=0.1)
    if task.done() and not task.cancelled():
        task.exception()  # retrieved, so asyncio does not log it


async def close_client(client: Client, timeout_s: float = 10.0) -> None:
    """Client.close (the reader stops on a flag); bounded, so a stuck reader cannot hang a run."""
    task = asyncio.ensure_future(client.close())
    done, _ = await asyncio.wait({task}, timeout=timeout_s)
    if not done:
        await stop_task(task)


async def _sample(r: aioredis.Redis, keys: Keys, t: float) -> dict[str, Any]:
    """One look at the plan and the workers' actual roles."""
    sample: dict[str, Any] = {"t_s": round(t, 4)}
    plan = await load_plan(r, keys)
    if plan is not None:
        sample.update(
            plan_version=plan.version,
            policy=plan.policy,
            threshold=plan.threshold,
            light_workers=plan.light_workers,
            heavy_workers=plan.heavy_workers,
            light_batch=plan.light_batch,
            heavy_batch=plan.heavy_batch,
            heavy_fraction=plan.heavy_fraction,
            demand_qps=plan.demand_qps,
            feasible=plan.feasible,
        )
    members: Any = await r.zrange(keys.workers, 0, -1)
    workers = [w.decode() if isinstance(w, bytes) else str(w) for w in members]
    if workers:
        async with r.pipeline(transaction=False) as pipe:
            for w in workers:
                pipe.hget(keys.worker_info(w), "role")
            roles = await pipe.execute()
        roles = [x.decode() if isinstance(x, bytes) else x for x in roles]
        sample["roles"] = {"light": roles.count("light"), "heavy": roles.count("heavy")}
    sample["backlog"] = {
        "light": await backlog(r, keys.light_queue, "workers"),
        "heavy": await backlog(r, keys.heavy_queue, "workers"),
    }
    return sample


async def wait_for_plan(settings: RedisSettings, timeout_s: float = 15.0) -> bool:
    """True once a controller has stored a plan for live workers (so the replay starts under a real plan)."""
    r = connect(settings, client_name="loadtest-plan-wait")
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            plan = await load_plan(r, Keys(settings.namespace))
            if plan is not None and plan.roles:
                return True
            await asyncio.sleep(0.1)
        return False
    finally:
        await r.aclose()


async def replay(
    settings: RedisSettings,
    trace: Trace,
    prompts: list[str],
    *,
    time_scale: float,
    policy: str = "",
    progress: bool = True,
    drain_timeout_s: float = 120.0,
    sample_interval_s: float = 0.5,
) -> RunRecord:
    """Send every query of ``trace`` at its (scaled) time, collect every result, sample the plan."""
    if time_scale <= 0:
        raise ValueError("time_scale must be > 0 for a trace replay")
    replayer = _Replayer(settings, trace, prompts, time_scale=time_scale, policy=policy, progress=progress)
    return await replayer.run(drain_timeout_s, sample_interval_s)


class _Replayer:
    """One trace replay: the sender, the result collector and the plan sampler, sharing the run's record."""

    def __init__(
        self,
        settings: RedisSettings,
        trace: Trace,
        prompts: list[str],
        *,
        time_scale: float,
        policy: str,
        progress: bool,
    ):
        self.trace, self.prompts, self.time_scale = trace, prompts, time_scale
        self.keys = Keys(settings.namespace)
        self.jobs: list[JobRecord] = []
        self.by_id: dict[str, JobRecord] = {}
        self.run_record = RunRecord(policy, time_scale, trace, self.jobs)
        self.answered = self.misses = 0
        self.all_answered = asyncio.Event()
        self.stopping = asyncio.Event()
        self.sending_done = False
        self.bar = _Progress(len(trace), policy or "replay", progress)
        self.sampler_redis = connect(settings, client_name="loadtest-sampler")
        self.loop = asyncio.get_running_loop()
        self.client = Client(settings)
        self.t0 = self.loop.time()

    async def run(self, drain_timeout_s: float, sample_interval_s: float) -> RunRecord:
        run = self.run_record
        collector = asyncio.create_task(self.collect())
        sampler = asyncio.create_task(self.sample(sample_interval_s))
        try:
            await self.send_all()
            try:
                await asyncio.wait_for(self.all_answered.wait(), drain_timeout_s)
            except TimeoutError:
                run.drained = False
            await asyncio.sleep(0.5)  # a duplicate would arrive by now
            run.wall_s = self.loop.time() - self.t0
            run.duplicates += self.client.rejected  # a second answer for an id: the client drops it, but counts it
            with contextlib.suppress(Exception):
                run.reply_entries = await self.client.redis.xlen(self.client.reply_stream)
        finally:
            self.stopping.set()
            await stop_task(sampler)
            await stop_task(collector)
            self.bar.update(len(self.jobs), self.answered, self.misses, force=True)
            self.bar.close()
            await close_client(self.client)
            await self.sampler_redis.aclose()
        # A duplicate the reader missed (e.g. delivered after we stopped reading) still shows in the stream.
        answered = sum(j.result is not None for j in self.jobs)
        run.duplicates = max(run.duplicates, run.reply_entries - answered - run.unknown_results)
        return run

    async def collect(self) -> None:
        run = self.run_record
        async for result in self.client.results():
            now = self.loop.time() - self.t0
            rec = self.by_id.get(result.job_id)
            if rec is None:
                run.unknown_results += 1
            elif rec.result is not None:
                run.duplicates += 1
            else:
                rec.result, rec.received_s = _strip(result), now
                self.answered += 1
                self.misses += not (result.status == Status.OK and result.slo_met)
                if self.sending_done and self.answered >= len(self.jobs):
                    self.all_answered.set()

    async def sample(self, interval_s: float) -> None:
        while not self.stopping.is_set():
            with contextlib.suppress(Exception):
                self.run_record.plan_samples.append(
                    await _sample(self.sampler_redis, self.keys, self.loop.time() - self.t0)
                )
            self.bar.update(len(self.jobs), self.answered, self.misses)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), interval_s)

    async def send_all(self) -> None:
        """Every query at its time: everything due by now goes out together (concurrent XADDs), so a busy
        machine falls behind the trace as little as possible."""
        self.t0 = self.loop.time()
        pending, scale = list(self.trace), self.time_scale
        i = 0
        while i < len(pending):
            delay = self.t0 + pending[i][0] * scale / 1000 - self.loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            now = self.loop.time() - self.t0
            due: list[tuple[float, int]] = []
            while i < len(pending) and len(due) < MAX_CONCURRENT_SENDS and pending[i][0] * scale / 1000 <= now + 0.0005:
                due.append(pending[i])
                i += 1
            await self.send(due, now)
        self.run_record.send_wall_s = self.loop.time() - self.t0
        self.sending_done = True
        if self.answered >= len(self.jobs):
            self.all_answered.set()

    async def send(self, due: list[tuple[float, int]], now: float) -> None:
        recs = []
        for arrival_ms, index in due:
            rec = JobRecord(new_job_id(), index, arrival_ms, sent_s=now, blank_prompt=not self.prompts[index])
            self.by_id[rec.job_id] = rec
            self.jobs.append(rec)
            recs.append(rec)
            lag = now - arrival_ms * self.time_scale / 1000
            self.run_record.max_send_lag_s = max(self.run_record.max_send_lag_s, lag)
        # The prompt of the trace's line, and the line itself, so recorded confidences replay per line.
        await asyncio.gather(
            *(
                self.client.enqueue(self.prompts[r.prompt_index], job_id=r.job_id, prompt_index=r.prompt_index)
                for r in recs
            )
        )


def stack_spec(
    *,
    policy: str,
    workers: int,
    backend: str,
    cascade: str,
    hardware: str,
    time_scale: float,
    slo_ms: float,
    confidence_file: str | None = None,
    controller_interval_s: float | None = None,
    model_dir: str | None = None,
    light_workers: int | None = None,
    static_plan: str | None = None,
    extra_env: dict[str, str] | None = None,
) -> StackSpec:
    """The StackSpec of one policy's run: controller on unless ``policy == 'none'`` (fixed roles)."""
    from common.localstack import StackSpec

    light = light_workers if light_workers is not None else max(1, workers // 2)
    env = {"DIFFSERVE_SLO_MS": f"{slo_ms * time_scale:.6g}", "DIFFSERVE_HARDWARE": hardware}
    if static_plan:
        env["DIFFSERVE_STATIC_PLAN"] = static_plan
    if confidence_file:
        env["DIFFSERVE_CONFIDENCE_FILE"] = str(confidence_file)
    env.update(extra_env or {})
    # DIFFSERVE_SLO_MS is wall-clock for every service (router deadlines, controller plans).
    controller_args = ["--interval-s", f"{controller_interval_s:g}"] if controller_interval_s else []
    return StackSpec(
        backend=backend,
        cascade=cascade,
        light_workers=light,
        heavy_workers=max(0, workers - light),
        controller=policy != "none",
        policy=policy,
        time_scale=time_scale,
        model_dir=model_dir,
        env=env,
        controller_args=controller_args,
    )


def default_sample_interval_s(time_scale: float) -> float:
    """Plan samples every 0.5 s wall, denser in time-scaled runs (but not under 0.1 s)."""
    return max(0.1, 0.5 * min(1.0, time_scale))


def run_policy(
    spec: StackSpec,
    trace: Trace,
    prompts: list[str],
    *,
    log_dir: str,
    progress: bool = True,
    drain_timeout_s: float = 120.0,
    plan_wait_s: float = 15.0,
    sample_interval_s: float | None = None,
) -> RunRecord:
    """Start a fresh local stack (own redis-server) for ``spec``, replay, stop it."""
    from common.localstack import LocalStack

    with LocalStack(spec, log_dir) as stack:
        assert stack.redis_url is not None  # started: its own redis-server
        settings = RedisSettings(redis_url=stack.redis_url, namespace=spec.namespace)
        if spec.controller:
            asyncio.run(wait_for_plan(settings, plan_wait_s))
        run = asyncio.run(
            replay(
                settings,
                trace,
                prompts,
                time_scale=spec.time_scale,
                policy=spec.policy if spec.controller else "none",
                progress=progress,
                drain_timeout_s=drain_timeout_s,
                sample_interval_s=sample_interval_s or default_sample_interval_s(spec.time_scale),
            )
        )
        dead = [name for name, alive in stack.alive().items() if not alive]
        if dead:
            print(f"warning: {dead} exited during the {run.policy} run; logs in {log_dir}", flush=True)
    return run
