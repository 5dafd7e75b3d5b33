"""Discriminator: scores light images; confident ones are answers, the rest go to the heavy model."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from PIL import Image

from common import metrics
from common.backends import BackendSettings, latency_scale, load_profile, make_discriminator, require_backend
from common.config import ServiceConfig, option
from common.imaging import decode, from_thumbnail
from common.messages import E_MODEL, Completion, LightReady, LightResult, Role, RoutedBy
from common.plan_store import PlanWatcher, StageWatcher
from common.routing import LATE_POLICIES, Decision, cascade_decision, decision_order, degrades_late
from common.service import Service, now_ms, run
from common.stage import one_per_input, split_batch
from common.streams import StreamConsumer, run_forever
from common.tenants import client_job_id


@dataclass
class DiscriminatorConfig(ServiceConfig, BackendSettings):
    """diffserve discriminator: routes each light image to the client or to the heavy model."""

    batch: int = option(32, "light results scored per batch", env="DIFFSERVE_DISCRIMINATOR_BATCH")
    threshold: float | None = option(
        None, "fixed threshold (default: the plan's, 0.5 without a plan)", env="DIFFSERVE_THRESHOLD"
    )
    late_policy: str = option(
        "plan",
        "a job the heavy model cannot finish before its deadline: as the plan "
        "says (plan), answered with its light image (light) or sent on anyway (heavy)",
        env="DIFFSERVE_LATE_POLICY",
        choices=LATE_POLICIES,
    )
    reclaim_idle_ms: int = option(
        10000, "take over entries idle this long on a dead discriminator", env="DIFFSERVE_RECLAIM_IDLE_MS"
    )
    max_deliveries: int = option(
        5, "fail a job whose batch crashed this many discriminators", env="DIFFSERVE_MAX_DELIVERIES"
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
        self.plans = PlanWatcher(self.r, self.keys)
        self.heavy = StageWatcher(self.r, self.keys)
        self.needs_images = self.cfg.backend != "profiled"

    def heavy_ms(self, batch: int) -> float:
        return self.profile.heavy.latency_ms(batch) * latency_scale(self.cfg)

    def _images(self, results: list[LightResult]) -> list[Image.Image | None]:
        if not self.needs_images:
            return [None] * len(results)
        return [from_thumbnail(r.thumbnail, r.thumbnail_size) if r.thumbnail else decode(r.image) for r in results]

    async def step(self) -> None:
        entries = await self.consumer.read(self.cfg.batch, block_ms=250)
        if not entries:
            return
        good, outputs = split_batch(
            entries,
            LightResult.decode,
            keys=self.keys,
            stream=self.consumer.stream,
            service="discriminator",
            max_deliveries=self.consumer.max_deliveries,
            job_of=lambda r: r.job,
        )
        results = [r for _entry, r in good]
        if results:
            outputs += await self.route(results)
        await self.consumer.write_and_ack([e.id for e in entries], outputs)

    async def route(self, results: list[LightResult]) -> list[tuple[str, bytes]]:
        plan = await self.plans.current()
        threshold = self.cfg.threshold if self.cfg.threshold is not None else plan.threshold
        start = time.perf_counter()
        try:
            scores = one_per_input(
                await asyncio.to_thread(
                    self.model.score,
                    [r.job.prompt for r in results],
                    self._images(results),
                    [r.job.prompt_index for r in results],
                ),
                results,
                "the discriminator",
            )
        except Exception as exc:
            self.svc.log.exception("discriminator failed", extra={"batch": len(results)})
            metrics.ERRORS.labels("discriminator", E_MODEL).inc(len(results))
            return [
                (
                    self.keys.completions,
                    Completion.failure(r.job, E_MODEL, f"{type(exc).__name__}: {exc}", self.cfg.instance_id).encode(),
                )
                for r in results
            ]
        metrics.BATCH_LATENCY.labels("discriminator", "discriminator").observe(time.perf_counter() - start)
        metrics.BATCH_SIZE.labels("discriminator", "discriminator").observe(len(results))
        metrics.DISCRIMINATOR_THRESHOLD.set(threshold)
        degrade_late = degrades_late(self.cfg.late_policy, plan.degrade_late)
        heavy = await self.heavy.stage("heavy", plan, self.heavy_ms(plan.heavy_batch)) if degrade_late else None
        now = now_ms()
        outputs: list[tuple[str, bytes]] = []
        for i in decision_order(scores):
            result, confidence = results[i], scores[i]
            job = result.job
            on_time = heavy is None or heavy.on_time(now, job.deadline_ms, self.cfg.clock_skew_ms)
            decision = cascade_decision(
                confidence,
                threshold,
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
                job.light_image, job.light_image_format = result.image, result.image_format
                outputs.append((self.keys.heavy_queue, job.encode()))
                if job.partials and job.reply_to:  # the client shows the light image while heavy runs
                    outputs.append(
                        (
                            job.reply_to,
                            LightReady(  # under the id the client submitted (a tenant's job is scoped)
                                job_id=client_job_id(job.job_id),
                                image=result.image,
                                image_format=result.image_format,
                                model=result.model,
                                confidence=confidence,
                                ready_ms=now_ms(),
                            ).encode(),
                        )
                    )
            else:
                outputs.append(
                    (
                        self.keys.completions,
                        Completion.answer(
                            job,
                            result.image,
                            result.image_format,
                            Role.LIGHT,
                            result.model,
                            confidence,
                            degraded=decision == Decision.LATE,
                            worker_id=self.cfg.instance_id,
                        ).encode(),
                    )
                )
        return outputs


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
