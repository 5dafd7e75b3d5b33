"""Discriminator: scores light images; confident ones are answers, the rest go to the heavy model."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import redis.asyncio as aioredis
from PIL import Image

from common import metrics
from common.backends import BackendSettings, latency_scale, load_profile, make_discriminator, require_backend
from common.blobs import BlobUnavailable, open_store
from common.config import ConsumerSettings, ServiceConfig, WorkerRegistrySettings, option
from common.imaging import decode, from_thumbnail
from common.messages import (
    E_INTERNAL,
    E_MODEL,
    BlobRef,
    Completion,
    LightReady,
    LightReason,
    LightResult,
    MessageError,
    Plan,
    Role,
    RoutedBy,
    RoutedJob,
)
from common.plan_store import PlanWatcher, StageWatcher
from common.planner import default_plan
from common.replay import RECENT_CONFIDENCES
from common.routing import (
    Decision,
    LatePolicySettings,
    ShareKeeper,
    Stage,
    batch_times,
    cascade_decision,
    decision_order,
    degrades_late,
    exchange_for,
    light_reason,
)
from common.service import Service, now_ms, run
from common.stage import DISCRIMINATOR_BATCH, Outputs, Processed, failures, light_answer, one_per_input, run_batch
from common.streams import (
    PIPELINE_GROUPS,
    Entry,
    Exchange,
    StreamConsumer,
    exchange_waiting,
    run_forever,
    undelivered,
)
from common.tenants import client_job_id

HEAVY_GROUP = dict(PIPELINE_GROUPS)["heavy_queue"]
# The exchange looks this far into the heavy queue's undelivered jobs (a queue the deadline rule keeps short).
EXCHANGE_SCAN = 256


@dataclass(kw_only=True)
class DiscriminatorConfig(ServiceConfig, BackendSettings, ConsumerSettings, LatePolicySettings, WorkerRegistrySettings):
    """diffserve discriminator: routes each light image to the client or to the heavy model."""

    batch: int = option(DISCRIMINATOR_BATCH, "light results scored per batch", env="DIFFSERVE_DISCRIMINATOR_BATCH")
    threshold: float | None = option(
        None, "fixed threshold (default: the plan's, 0.5 without a plan)", env="DIFFSERVE_THRESHOLD"
    )


class Discriminator:
    def __init__(self, svc: Service[DiscriminatorConfig]):
        self.svc, self.cfg, self.keys, self.r = svc, svc.config, svc.keys, svc.redis
        self.model = make_discriminator(self.cfg)
        self.profile = load_profile(self.cfg)
        self.consumer = StreamConsumer(
            self.r,
            self.keys.light_results,
            "discriminator",
            self.cfg.instance_id,
            reclaim_idle_ms=self.cfg.reclaim_idle_ms,
            max_deliveries=self.cfg.max_deliveries,
        )
        self.plans = PlanWatcher(self.r, self.keys, default=default_plan(self.profile))
        self.heavy = StageWatcher(self.r, self.keys, self.cfg.worker_timeout_s)
        self.heavy_times = batch_times(self.profile, Role.HEAVY, latency_scale(self.cfg))
        self.keeper = ShareKeeper(RECENT_CONFIDENCES)  # this replica's recent confidences and decisions
        self.needs_images = self.cfg.backend != "profiled"
        self.blobs = open_store(self.cfg, self.r)

    async def _images(self, results: list[LightResult]) -> list[Image.Image | None]:
        """What the model scores: the thumbnail, else the image (from the image store when stored there,
        one read for the batch; BlobUnavailable, or ValueError for one that is gone)."""
        if not self.needs_images:
            return [None] * len(results)
        stored = [r.thumbnail_ref or r.image_ref for r in results if r.thumbnail is None and r.image is None]
        read = iter(await self.blobs.read([ref for ref in stored if ref is not None]))
        images: list[Image.Image | None] = []
        for r in results:
            ref = r.thumbnail_ref or r.image_ref if r.thumbnail is None and r.image is None else None
            data = next(read) if ref is not None else r.thumbnail or r.image
            if data is None:
                raise ValueError(f"the light image of {r.job.job_id} is gone from the image store")
            thumb = r.thumbnail is not None or (ref is not None and ref is r.thumbnail_ref)
            images.append(from_thumbnail(data, r.thumbnail_size) if thumb else decode(data))
        return images

    async def step(self) -> None:
        scored = await run_batch(
            self.consumer,
            self.cfg.batch,
            LightResult.decode,
            self._process,
            keys=self.keys,
            service="discriminator",
            job_of=LightResult.routed,
        )
        # Scored: the thumbnails are done with (one that is left behind expires).
        await self.blobs.discard([r.thumbnail_ref.key for r in scored if r.thumbnail_ref])

    async def _process(self, _entries: list[Entry], results: list[LightResult]) -> Processed:
        outputs, scores, exchanges = await self.route(results)

        def publish_scores_and_exchange(pipe: aioredis.client.Pipeline) -> None:
            # The controller's replay draws confidences from the recent ones (common/replay.py).
            if scores:
                pipe.rpush(self.keys.confidences, *(round(c, 4) for c in scores))
                pipe.ltrim(self.keys.confidences, -RECENT_CONFIDENCES, -1)
            for swap in exchanges:
                exchange_waiting(
                    pipe, queue=self.keys.heavy_queue, completions=self.keys.completions, group=HEAVY_GROUP, swap=swap
                )

        return Processed(outputs=outputs, extra=publish_scores_and_exchange)

    async def route(self, results: list[LightResult]) -> tuple[Outputs, list[float], list[Exchange]]:
        """Score one batch: the outputs it sends on, the confidences, and the exchanges in the heavy queue
        (each either sends a late job on in the place of an easier waiting one, or answers it with its light
        image: common/streams.exchange_waiting)."""
        plan = await self.plans.current()
        start = time.perf_counter()
        try:
            images = await self._images(results)
        except (BlobUnavailable, ValueError) as exc:  # answered: nothing to score them on
            self.svc.log.error("light images unavailable", extra={"batch": len(results), "error": str(exc)[:200]})
            metrics.ERRORS.labels("discriminator", E_INTERNAL).inc(len(results))
            return (
                failures(self.keys, [r.routed() for r in results], E_INTERNAL, str(exc), self.cfg.instance_id),
                [],
                [],
            )
        try:
            scores = one_per_input(
                await asyncio.to_thread(
                    self.model.score, [r.job.prompt for r in results], images, [r.job.prompt_index for r in results]
                ),
                results,
                "the discriminator",
            )
        except Exception as exc:
            self.svc.log.exception("discriminator failed", extra={"batch": len(results)})
            metrics.ERRORS.labels("discriminator", E_MODEL).inc(len(results))
            message = f"{type(exc).__name__}: {exc}"
            return failures(self.keys, [r.routed() for r in results], E_MODEL, message, self.cfg.instance_id), [], []
        metrics.BATCH_LATENCY.labels("discriminator", "discriminator").observe(time.perf_counter() - start)
        metrics.BATCH_SIZE.labels("discriminator", "discriminator").observe(len(results))
        if self.cfg.threshold is not None:
            thresholds = [self.cfg.threshold] * len(scores)
        else:  # the plan's, or the share keeper's around it
            thresholds = self.keeper.thresholds(plan, now_ms(), scores)
        if thresholds:
            metrics.DISCRIMINATOR_THRESHOLD.set(thresholds[-1])
        outputs, exchanges = await self._decide(plan, results, scores, thresholds)
        return outputs, scores, exchanges

    async def _decide(
        self, plan: Plan, results: list[LightResult], scores: list[float], thresholds: list[float]
    ) -> tuple[Outputs, list[Exchange]]:
        """Each scored light image: the answer, or the job on to the heavy model (least confident first); a
        job the heavy stage cannot take in time may take the place of an easier waiting one (the exchange)."""
        degrade_late = degrades_late(self.cfg.late_policy, plan.degrade_late)
        heavy = await self.heavy.stage(Role.HEAVY, plan, self.heavy_times) if degrade_late else None
        now = now_ms()
        outputs: Outputs = []
        exchanges: list[Exchange] = []
        waiting: list[tuple[str, RoutedJob | None]] | None = None  # the heavy queue's undelivered jobs, read once
        previews = await self._previews(results, scores, thresholds)
        for i in decision_order(scores):
            result, confidence = results[i], scores[i]
            job = result.routed()
            on_time = heavy is None or heavy.on_time(now, job.deadline_ms, self.cfg.clock_skew_ms)
            decision = cascade_decision(
                confidence,
                thresholds[i],
                discriminator_routes=plan.discriminator_routes,
                degrade_late=degrade_late,
                fallback=job.routed_by == RoutedBy.FALLBACK,
                on_time=on_time,
            )
            metrics.ROUTED.labels(decision).inc()
            if decision == Decision.HEAVY:
                if heavy is not None:
                    heavy.admit()
                job.confidence = confidence
                outputs.append((self.keys.heavy_queue, job.encode()))
            else:
                answer = Completion.answer(
                    job,
                    result.image_ref or result.image or b"",
                    image_format=result.image_format,
                    answered_by=Role.LIGHT,
                    model=result.model,
                    confidence=confidence,
                    worker_id=self.cfg.instance_id,
                    light_reason=light_reason(decision, confidence, plan),
                )
                swap = None
                if decision == Decision.LATE and heavy is not None and job.routed_by != RoutedBy.FALLBACK:
                    waiting = await self._waiting() if waiting is None else waiting
                    swap = self._exchange(heavy, now, job, confidence, answer, waiting)
                if swap is None:
                    outputs.append((self.keys.completions, answer.encode()))
                    continue
                exchanges.append(swap)
            preview = previews.get(i)
            if preview is not None and job.reply_to:  # the client shows the light image while heavy runs
                ready = LightReady(  # under the id the client submitted (a tenant's job is scoped)
                    job_id=client_job_id(job.job_id),
                    image=preview if isinstance(preview, bytes) else None,
                    image_ref=preview if isinstance(preview, BlobRef) else None,
                    image_format=result.image_format,
                    model=result.model,
                    confidence=confidence,
                    ready_ms=now_ms(),
                    reply_token=job.reply_token,
                )
                outputs.append((job.reply_to, ready.encode()))
        return outputs, exchanges

    def _exchange(
        self,
        heavy: Stage,
        now: float,
        job: RoutedJob,
        confidence: float,
        answer: Completion,
        waiting: list[tuple[str, RoutedJob | None]],
    ) -> Exchange | None:
        """The late ``job`` in the place of an easier waiting one, when the rule allows it
        (common/routing.exchange_for), else None. The script does it only if no heavy worker took the
        waiting job meanwhile; otherwise ``answer`` is the answer."""
        confidences = [w.confidence if w is not None else None for _id, w in waiting]
        k = exchange_for(heavy, now, job.deadline_ms, confidence, confidences, self.cfg.clock_skew_ms)
        if k is None:
            return None
        (waiting_id, yielded), waiting[k] = waiting[k], ("", None)
        assert yielded is not None  # exchange_for picks a job with a confidence
        job.confidence = confidence
        metrics.HEAVY_EXCHANGES.inc()
        return Exchange(
            waiting_id=waiting_id,
            waiting_answer=light_answer(
                yielded, self.profile.spec.light, self.cfg.instance_id, LightReason.DEADLINE
            ).encode(),
            late_job=job.encode(),
            late_answer=answer.encode(),
        )

    async def _waiting(self) -> list[tuple[str, RoutedJob | None]]:
        """The heavy queue's jobs no heavy worker has taken yet (None for one that does not decode)."""
        waiting: list[tuple[str, RoutedJob | None]] = []
        for entry in await undelivered(self.r, self.keys.heavy_queue, HEAVY_GROUP, EXCHANGE_SCAN):
            try:
                waiting.append((entry.id, RoutedJob.decode(entry.payload or b"")))
            except MessageError:
                waiting.append((entry.id, None))
        return waiting

    async def _previews(
        self, results: list[LightResult], scores: list[float], thresholds: list[float]
    ) -> dict[int, bytes | BlobRef]:
        """The light image each job that asked for partials gets in its LightReady, should it go on to the
        heavy model (a LightReady is sent only then): the reference when the job asked for references, else
        the bytes, read from the image store in one round. A preview the store cannot give is skipped (the
        final answer still comes)."""
        wanted = {i for i, r in enumerate(results) if r.job.partials and r.job.reply_to and scores[i] < thresholds[i]}
        previews: dict[int, bytes | BlobRef] = {}
        fetch: list[int] = []
        for i in sorted(wanted):
            r = results[i]
            if r.image_ref is None or r.job.image_ref:
                previews[i] = r.image_ref or r.image or b""
            else:
                fetch.append(i)
        if fetch:
            try:
                read = await self.blobs.read([ref for i in fetch if (ref := results[i].image_ref) is not None])
            except BlobUnavailable as exc:
                self.svc.log.warning("light previews skipped", extra={"count": len(fetch), "error": str(exc)[:200]})
                return previews
            previews.update({i: data for i, data in zip(fetch, read, strict=False) if data is not None})
        return previews


async def serve(svc: Service[DiscriminatorConfig]) -> None:
    disc = Discriminator(svc)
    await asyncio.to_thread(disc.model.load)
    svc.ready()
    await run_forever("batches", disc.step, svc.stop)


def main(argv: list[str] | None = None) -> None:
    config = DiscriminatorConfig.from_args(argv, prog="diffserve discriminator")
    require_backend(config.backend)  # before waiting for Redis
    run("discriminator", config, serve)


if __name__ == "__main__":
    main()
