"""Worker: one GPU, one model at a time. Pulls batches from its role's queue, runs the
model, writes the outputs and acks; switches role (light <-> heavy) when the plan says so."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import redis.asyncio as aioredis

from common import metrics
from common.backends import (
    BackendSettings,
    ImageModel,
    Interrupted,
    latency_scale,
    load_profile,
    make_model,
    require_backend,
)
from common.backends.profiled import fixed_image
from common.blobs import HEAVY, LIGHT, THUMB, BlobUnavailable, blob_key, open_store
from common.clock import CLOCK
from common.config import ConsumerSettings, Keys, ReplySettings, ServiceConfig, option
from common.imaging import Encoded, EncoderPool, PngImage, thumbnail_rgb
from common.messages import (
    E_INTERNAL,
    E_MODEL,
    BlobRef,
    Completion,
    LightReason,
    LightResult,
    Plan,
    Progress,
    Role,
    RoutedBy,
    RoutedJob,
)
from common.plan_store import PlanWatcher
from common.planner import default_plan
from common.routing import LatePolicySettings, Stage, batch_times, degrades_late, fill_until_ms
from common.service import Service, now_ms, run
from common.stage import Outputs, Overlap, Processed, cancelled_ids, failures, light_answer, one_per_input, run_batch
from common.streams import TRANSIENT_ERRORS, Entry, StreamConsumer, notify, run_forever
from common.tenants import client_job_id

if TYPE_CHECKING:
    from PIL import Image

ROLES = tuple(Role)
DEFAULT_THUMBNAIL_SIZE = 224  # EfficientNet-V2-S input size
CLOSE_TIMEOUT_S = 2.0


@dataclass(kw_only=True)
class WorkerConfig(ServiceConfig, BackendSettings, ReplySettings, ConsumerSettings, LatePolicySettings):
    """diffserve worker: runs the light or the heavy model of the cascade."""

    role: str = option(
        "light", "starting role; the controller's plan may change it", env="DIFFSERVE_ROLE", choices=ROLES
    )
    batch: int = option(0, "fixed batch size (0: the plan's)", env="DIFFSERVE_BATCH")
    thumbnail_size: int = option(
        -1,
        "attach an RGB thumbnail of this size to light results, so the "
        "discriminator skips the PNG decode (0: none; -1: 224 with real models, none "
        "with the profiled backend)",
        env="DIFFSERVE_THUMBNAIL_SIZE",
    )
    encode_threads: int = option(4, "image-encoding threads", env="DIFFSERVE_ENCODE_THREADS")
    heartbeat_s: float = option(1.0, "heartbeat interval", env="DIFFSERVE_HEARTBEAT_S")
    watch_s: float = option(
        0.25,
        "while a heavy batch runs: how often its jobs' cancel flags are read and their progress sent",
        env="DIFFSERVE_WATCH_S",
    )


class RunningBatch:
    """A heavy batch on the GPU.  While it runs, its jobs' cancel flags are read every ``watch_s``:
    once every job in it is cancelled it stops at the next denoising step (``on_step`` raises
    Interrupted in the model's thread); a job cancelled alongside others runs to the end and its
    result is dropped.  The jobs that asked (``progress``) are sent the step reached."""

    def __init__(self, r: aioredis.Redis, keys: Keys, cfg: WorkerConfig, jobs: list[RoutedJob], model: str):
        self.r, self.keys, self.cfg, self.jobs, self.model = r, keys, cfg, jobs, model
        self.cancelled: set[str] = set()
        self.stop = threading.Event()
        self.step = self.steps = self._sent = 0

    def on_step(self, step: int, steps: int) -> None:  # in the model's thread
        self.step, self.steps = step, steps
        if self.stop.is_set():
            raise Interrupted(step, steps)

    async def poll(self) -> None:
        """One look at the cancel flags; progress to whoever asked, when it moved."""
        self.cancelled |= await cancelled_ids(
            self.r, self.keys, [j.job_id for j in self.jobs if j.job_id not in self.cancelled]
        )
        if len(self.cancelled) == len(self.jobs):
            self.stop.set()
        step, steps = self.step, self.steps
        asking = [j for j in self.jobs if j.progress and j.reply_to and j.job_id not in self.cancelled]
        if step > self._sent and asking:
            self._sent = step
            async with self.r.pipeline(transaction=False) as pipe:
                for job in asking:
                    payload = Progress(
                        job_id=client_job_id(job.job_id),
                        step=step,
                        steps=steps,
                        model=self.model,
                        reply_token=job.reply_token,
                    )
                    notify(
                        pipe,
                        job.reply_to or "",
                        payload.encode(),
                        maxlen=self.cfg.reply_maxlen,
                        ttl_s=self.cfg.result_ttl_s,
                    )
                await pipe.execute()

    @contextlib.asynccontextmanager
    async def watched(self) -> AsyncIterator[None]:
        done = asyncio.Event()

        async def watch() -> None:
            while not done.is_set():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(done.wait(), self.cfg.watch_s)
                if not done.is_set():
                    with contextlib.suppress(*TRANSIENT_ERRORS):
                        await self.poll()

        # Stopped by a flag, not cancel(): redis-py can swallow a cancel that lands mid-command.
        task = asyncio.create_task(watch())
        try:
            yield
        finally:
            done.set()
            await task


@dataclass(kw_only=True)
class Generated:
    """A batch the model ran, to be encoded and answered (Worker._answer) while the model runs the next."""

    jobs: list[RoutedJob]
    images: list[Image.Image | PngImage]
    role: Role
    model: str
    seconds: float
    dropped: set[str]  # cancelled while it ran, alongside jobs that were not: their results are dropped


class Worker:
    def __init__(self, svc: Service[WorkerConfig]):
        self.svc, self.cfg, self.keys, self.r = svc, svc.config, svc.keys, svc.redis
        self.id = self.cfg.instance_id
        self.role = Role(self.cfg.role)
        self.profile = load_profile(self.cfg)
        self.models: dict[Role, ImageModel] = {}  # the idle one stays in host memory
        self.model: ImageModel | None = None  # set by start()
        self.staging: asyncio.Task[None] | None = None  # the other role's model read into host memory
        self.last_switch_s = 0.0
        self.switches = 0
        self.consumers = {
            role: StreamConsumer(
                self.r,
                self.keys.queue_for(role),
                "workers",
                self.id,
                reclaim_idle_ms=self.cfg.reclaim_idle_ms,
                max_deliveries=self.cfg.max_deliveries,
            )
            for role in ROLES
        }
        self.plans = PlanWatcher(self.r, self.keys, default=default_plan(self.profile))
        fixed = fixed_image(self.cfg.image_kb) if self.cfg.backend == "profiled" and self.cfg.image_kb > 0 else None
        self.encoder = EncoderPool(self.cfg.encode_threads, fixed)
        self.overlap = Overlap()  # the last batch's encoding and writes, while the model runs the next
        self.blobs = open_store(self.cfg, self.r)  # each image is written once; entries carry references
        self.batch_ms: dict[int, float] = {}  # measured, smoothed; the profile until measured
        self.profiled_ms = {role: batch_times(self.profile, role, latency_scale(self.cfg)) for role in ROLES}
        # Measured (benchmarks/thumbnail.py): decoding a 512px PNG and resizing it costs the
        # discriminator ~3.5 ms of CPU per image, which caps one discriminator near 300 images/s;
        # a 224px thumbnail costs the worker ~1.5 ms (off the event loop) and 147 KiB on the wire.
        default_size = 0 if self.cfg.backend == "profiled" else DEFAULT_THUMBNAIL_SIZE
        self.thumbnail_size = default_size if self.cfg.thumbnail_size < 0 else self.cfg.thumbnail_size

    @property
    def loaded(self) -> ImageModel:
        if self.model is None:
            raise RuntimeError("the worker has not started")
        return self.model

    async def start(self) -> None:
        self.model = model = make_model(self.cfg, self.role)
        seconds = await asyncio.to_thread(model.load, "disk")
        metrics.MODEL_LOAD.labels(model.name, "disk").observe(seconds)
        self.models[self.role] = model
        await self.heartbeat()
        if self.cfg.host_cache and self.cfg.stage_other_role:
            other = Role.HEAVY if self.role == Role.LIGHT else Role.LIGHT
            self.staging = asyncio.create_task(self._stage(other))

    async def _stage(self, role: Role) -> None:
        """Read ``role``'s model into host memory while this worker serves: a burst's first switch then
        copies it from there (0.4 s for SD-Turbo on an A100) rather than loading it from disk (2.8 s)."""
        model = make_model(self.cfg, role)
        try:
            seconds = await asyncio.to_thread(model.stage)
        except Exception as exc:  # the switch will load it from disk, and report what goes wrong then
            self.svc.log.warning("staging the other model failed", extra={"model": model.name, "error": repr(exc)})
            return
        metrics.MODEL_LOAD.labels(model.name, "stage").observe(seconds)
        self.models.setdefault(role, model)
        self.svc.log.info(
            "other model staged in host memory", extra={"model": model.name, "seconds": round(seconds, 3)}
        )

    async def switch(self, role: Role) -> None:
        """Free (or park in host memory) the current model, load the other one."""
        start = time.perf_counter()
        if self.staging is not None:  # a switch before the staging ended waits for it: its read is under way
            await self.staging
            self.staging = None
        old = self.loaded
        if self.cfg.host_cache:
            await asyncio.to_thread(old.offload)
        else:
            await asyncio.to_thread(old.unload)
            self.models.pop(self.role, None)
        cached = role in self.models
        self.model = model = self.models.get(role) or make_model(self.cfg, role)
        await asyncio.to_thread(model.load, "host" if cached else "disk")
        self.models[role] = model
        self.last_switch_s = time.perf_counter() - start
        self.switches += 1
        metrics.MODEL_LOAD.labels(model.name, "host" if cached else "disk").observe(self.last_switch_s)
        self.svc.log.info(
            "role switched",
            extra={
                "worker": self.id,
                "from": self.role,
                "to": role,
                "seconds": round(self.last_switch_s, 3),
                "from_host": cached,
            },
        )
        self.role = role
        self.batch_ms.clear()
        await self.heartbeat()

    async def heartbeat(self) -> None:
        now = now_ms()
        async with self.r.pipeline(transaction=False) as pipe:
            pipe.zadd(self.keys.workers, {self.id: now})
            pipe.hset(
                self.keys.worker_info(self.id),
                mapping={
                    "role": self.role,
                    "model": self.model.name if self.model else "",
                    "switch_s": self.last_switch_s,
                    "switches": self.switches,
                    "heartbeat_ms": now,  # Redis's clock (common/clock.py), whatever this host's says
                    "clock_offset_ms": round(CLOCK.offset_ms, 1),
                    "backend": self.cfg.backend,
                },
            )
            pipe.expire(self.keys.worker_info(self.id), 60)
            await pipe.execute()

    async def heartbeat_loop(self) -> None:
        await self.heartbeat()
        await self.svc.sleep(self.cfg.heartbeat_s)

    async def _busy_until(self, at_ms: float) -> None:
        """A hint for the controller: when this worker's batch ends (which worker frees up first)."""
        with contextlib.suppress(*TRANSIENT_ERRORS):
            await self.r.hset(self.keys.worker_info(self.id), "busy_until_ms", at_ms)

    def estimate_ms(self, batch: int) -> float:
        """This worker's time for a batch: measured once it ran one that size, else the estimate every
        stage uses (common/routing.batch_times)."""
        if batch in self.batch_ms:
            return self.batch_ms[batch]
        return self.profiled_ms[self.role](batch)

    async def step(self) -> None:
        plan = await self.plans.current()
        wanted = plan.roles.get(self.id, self.role)
        if wanted != self.role and wanted in ROLES:
            await self.switch(Role(wanted))
        batch = self.cfg.batch or (plan.light_batch if self.role == Role.LIGHT else plan.heavy_batch)
        await run_batch(
            self.consumers[self.role],
            batch,
            RoutedJob.decode,
            lambda entries, jobs: self._process(plan, entries, jobs),
            keys=self.keys,
            service="worker",
            job_of=lambda j: j,
            fill_until=self._fill_until(plan, batch),
            overlap=self.overlap,
        )

    def _fill_until(self, plan: Plan, batch: int) -> Callable[[list[RoutedJob]], Awaitable[float]] | None:
        """The heavy batch fill under ``plan`` (common/routing.fill_until_ms): given a short read's jobs, until
        when to wait for the rest of ``batch``; None when the plan carries no fill (or --batch fixes it)."""
        fill_ms = plan.heavy_fill_ms
        if self.role != Role.HEAVY or self.cfg.batch or fill_ms <= 0:
            return None
        full_ms = self.estimate_ms(batch)
        skew = self.cfg.clock_skew_ms

        async def until(jobs: list[RoutedJob]) -> float:
            at = fill_until_ms(now_ms(), [j.deadline_ms - skew for j in jobs], full_ms, fill_ms)
            # A filling worker runs this batch before anything else, a role switch too: the controller's
            # ``busy_s`` (which worker a burst moves) counts it from now, not from when it starts.
            await self._busy_until(at + full_ms)
            return at

        return until

    async def _process(self, plan: Plan, entries: list[Entry], jobs: list[RoutedJob]) -> Processed:
        """A batch's jobs: those cancelled before it started answered, late heavy ones degraded (the deadline
        rule), the rest run (their entries kept claimed while the model runs)."""
        outputs: Outputs = []
        cancelled = await cancelled_ids(self.r, self.keys, [job.job_id for job in jobs])
        if cancelled:  # cancelled by their clients before this batch started: answered, never run
            outputs += [
                (self.keys.completions, Completion.cancelled(job, self.id).encode())
                for job in jobs
                if job.job_id in cancelled
            ]
            metrics.PROCESSED.labels("worker", "cancelled").inc(len(cancelled))
            # their share of the batch they would have run in
            share_s = self.estimate_ms(len(jobs)) / len(jobs) / 1000
            metrics.CANCEL_FREED.labels(self.loaded.name, "before").inc(share_s * len(cancelled))
            jobs = [job for job in jobs if job.job_id not in cancelled]
        if self.role == Role.HEAVY and degrades_late(self.cfg.late_policy, plan.degrade_late):
            jobs, late = self._split_late(jobs)
            outputs += late
        if not jobs:
            return Processed(outputs=outputs)
        consumer, ids = self.consumers[self.role], [e.id for e in entries]
        async with consumer.keep_claimed(ids):
            ran = await self._run(jobs)
        if not isinstance(ran, Generated):  # failed or cancelled: answered already
            return Processed(outputs=outputs + ran)

        async def tail() -> Outputs:  # while the model runs the next batch (run_batch's overlap)
            async with consumer.keep_claimed(ids):
                return await self._answer(ran)

        return Processed(outputs=outputs, tail=tail)

    def _split_late(self, jobs: list[RoutedJob]) -> tuple[list[RoutedJob], list[tuple[str, bytes]]]:
        """Jobs that would finish after their deadline even if started now (the deadline rule
        with nothing queued ahead) are answered with their light image, marked degraded, instead
        of late; a job a policy sent straight to heavy has no light image yet, so it goes to the
        light model as a fallback."""
        now = now_ms()
        batch = Stage(workers=1, batch=len(jobs), batch_ms=self.estimate_ms(len(jobs)))  # this worker, now
        on_time: list[RoutedJob] = []
        late: list[tuple[str, bytes]] = []
        for job in jobs:
            if batch.on_time(now, job.deadline_ms, self.cfg.clock_skew_ms):
                on_time.append(job)
            elif job.light_ref is not None or job.light_image is not None:
                answer = light_answer(job, self.profile.spec.light, self.id, LightReason.DEADLINE)
                late.append((self.keys.completions, answer.encode()))
            else:
                job.routed_by = RoutedBy.FALLBACK
                late.append((self.keys.light_queue, job.encode()))
        if late:
            metrics.PROCESSED.labels("worker", "degraded").inc(len(late))
        return on_time, late

    async def _run(self, jobs: list[RoutedJob]) -> Generated | Outputs:
        """Run the model on a batch: its images, or the jobs' answers where it failed or every job was cancelled."""
        model_name = self.loaded.name
        running = RunningBatch(self.r, self.keys, self.cfg, jobs, model_name) if self.role == Role.HEAVY else None
        await self._busy_until(now_ms() + self.estimate_ms(len(jobs)))
        start = time.perf_counter()
        try:
            images = await self._generate(jobs, running)
        except Interrupted as stop:  # every job in the batch was cancelled while it ran
            elapsed = time.perf_counter() - start
            metrics.CANCEL_FREED.labels(model_name, "during").inc(elapsed * (stop.steps / stop.step - 1))
            metrics.PROCESSED.labels("worker", "cancelled").inc(len(jobs))
            message = f"cancelled by the client while it ran: stopped after step {stop.step} of {stop.steps}"
            return [(self.keys.completions, Completion.cancelled(j, self.id, message).encode()) for j in jobs]
        except Exception as exc:  # report per job, keep serving
            self.svc.log.exception("model failed", extra={"model": model_name, "batch": len(jobs)})
            metrics.ERRORS.labels("worker", E_MODEL).inc(len(jobs))
            return failures(self.keys, jobs, E_MODEL, f"{type(exc).__name__}: {exc}", self.id)
        elapsed = time.perf_counter() - start
        self.batch_ms[len(jobs)] = 0.7 * self.batch_ms.get(len(jobs), elapsed * 1000) + 0.3 * elapsed * 1000
        metrics.BATCH_SIZE.labels("worker", model_name).observe(len(jobs))
        metrics.BATCH_LATENCY.labels("worker", model_name).observe(elapsed)
        dropped: set[str] = set()
        if running is not None:  # cancelled while it ran, alongside jobs that were not: its result is dropped
            dropped = running.cancelled
            metrics.PROCESSED.labels("worker", "cancelled").inc(len(dropped))
        return Generated(jobs=jobs, images=images, role=self.role, model=model_name, seconds=elapsed, dropped=dropped)

    async def _answer(self, done: Generated) -> Outputs:
        """A run batch's images encoded and written once (the big ones to the image store, in one round for the
        batch), each job answered (heavy) or its light image sent on (light)."""
        jobs, dropped = done.jobs, done.dropped
        encoded, raw_thumbs = await self._encode(done.role, jobs, done.images)
        kind = LIGHT if done.role == Role.LIGHT else HEAVY
        try:
            kept = await self.blobs.keep(
                [
                    (blob_key(j.job_id, kind), e.data, e.format, e.digest)
                    for j, e in zip(jobs, encoded, strict=True)
                    if e.data and j.job_id not in dropped
                ]
            )
            thumbs = await self.blobs.keep(
                [(blob_key(j.job_id, THUMB), t, "rgb", "") for j, t in zip(jobs, raw_thumbs, strict=True) if t]
            )
        except BlobUnavailable as exc:  # the jobs are answered, the worker goes on with the next batch
            self.svc.log.error("image store unavailable", extra={"batch": len(jobs), "error": str(exc)[:200]})
            metrics.ERRORS.labels("worker", E_INTERNAL).inc(len(jobs))
            return failures(self.keys, jobs, E_INTERNAL, str(exc), self.id)
        images_out, thumbs_out = iter(kept), iter(thumbs)
        outputs: Outputs = []
        for job, encoded_job, raw_thumb in zip(jobs, encoded, raw_thumbs, strict=True):
            thumb = next(thumbs_out) if raw_thumb else None
            if job.job_id in dropped:
                message = "cancelled by the client while it ran (with others in its batch): result dropped"
                outputs.append((self.keys.completions, Completion.cancelled(job, self.id, message).encode()))
            elif encoded_job.data is None:  # the encoder failed (and says why)
                message = encoded_job.error or "image encoding failed"
                outputs += failures(self.keys, [job], E_MODEL, message, self.id)
            else:
                outputs.append(self._output(done, job, next(images_out), encoded_job.format, thumb))
        metrics.PROCESSED.labels("worker", done.role).inc(len(jobs) - len(dropped))
        return outputs

    async def _generate(self, jobs: list[RoutedJob], running: RunningBatch | None) -> list[Image.Image | PngImage]:
        """One image per job from the model (in its thread; a heavy batch watched for cancels meanwhile)."""
        model = self.loaded
        async with running.watched() if running else contextlib.nullcontext():
            generated = await asyncio.to_thread(
                model.generate,
                [j.prompt for j in jobs],
                [j.seed for j in jobs],
                negative_prompts=[j.negative_prompt for j in jobs],
                on_step=running.on_step if running else None,
            )
        return one_per_input(generated, jobs, "the model")

    async def _encode(
        self, role: Role, jobs: list[RoutedJob], images: list[Image.Image | PngImage]
    ) -> tuple[list[Encoded], list[bytes | None]]:
        """Each image in the format its job asked for (the encoder's threads), and a light image's thumbnail
        for the discriminator (meanwhile, off the event loop)."""
        futures = self.encoder.submit(images, [(j.image_format, j.image_quality) for j in jobs])
        size = self.thumbnail_size
        raw_thumbs: list[bytes | None] = (
            await asyncio.to_thread(lambda: [thumbnail_rgb(img, size) for img in images])
            if role == Role.LIGHT and size
            else [None] * len(jobs)
        )
        return [await asyncio.wrap_future(future) for future in futures], raw_thumbs

    def _output(
        self, done: Generated, job: RoutedJob, image: bytes | BlobRef, image_format: str, thumb: bytes | BlobRef | None
    ) -> tuple[str, bytes]:
        """A light image on to the discriminator, or a heavy one as the job's answer."""
        model_name = done.model
        if done.role == Role.HEAVY:
            answer = Completion.answer(
                job,
                image,
                image_format=image_format,
                answered_by=Role.HEAVY,
                model=model_name,
                confidence=job.confidence,
                worker_id=self.id,
            )
            return self.keys.completions, answer.encode()
        light = LightResult(
            job=job,
            image=image if isinstance(image, bytes) else None,
            image_ref=image if isinstance(image, BlobRef) else None,
            image_format=image_format,
            thumbnail=thumb if isinstance(thumb, bytes) else None,
            thumbnail_ref=thumb if isinstance(thumb, BlobRef) else None,
            thumbnail_size=self.thumbnail_size if thumb else 0,
            worker_id=self.id,
            model=model_name,
            batch_size=len(done.jobs),
            light_ms=done.seconds * 1000,
        )
        return self.keys.light_results, light.encode()

    async def close(self) -> None:
        if self.staging is not None:
            self.staging.cancel()
        try:  # the last batch's answers, written while the model ran (Overlap)
            await asyncio.wait_for(self.overlap.drain(), CLOSE_TIMEOUT_S)
        except Exception as exc:  # its entries stay pending: another worker, or this one restarted, takes them up
            self.svc.log.warning("last batch not written before stopping", extra={"error": repr(exc)[:200]})
        # Deregistering is a courtesy (the controller stops counting a worker whose heartbeat stops):
        # a hung Redis must not keep a SIGTERMed worker alive.
        with contextlib.suppress(asyncio.TimeoutError, *TRANSIENT_ERRORS):
            await asyncio.wait_for(self.r.zrem(self.keys.workers, self.id), CLOSE_TIMEOUT_S)
        self.encoder.close()
        await self.blobs.close()


async def serve(svc: Service[WorkerConfig]) -> None:
    worker = Worker(svc)
    await worker.start()
    svc.ready()
    try:
        await asyncio.gather(
            run_forever("batches", worker.step, svc.stop), run_forever("heartbeat", worker.heartbeat_loop, svc.stop)
        )
    finally:
        await worker.close()


def main(argv: list[str] | None = None) -> None:
    config = WorkerConfig.from_args(argv, prog="diffserve worker")
    require_backend(config.backend)  # before waiting for Redis
    run("worker", config, serve)


if __name__ == "__main__":
    main()
