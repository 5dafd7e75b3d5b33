"""Delivery: each job's final answer, exactly once (a done marker and the answer written together by one
script), to the job's reply stream or result list; the SLO outcomes the controller's AIMD reads."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import redis.asyncio as aioredis

from common import metrics
from common.blobs import BlobStore, inline_images
from common.config import Keys
from common.lua import script
from common.messages import E_INTERNAL, Completion, DeadLetter, FinalResult, MessageError, Status
from common.service import now_ms
from common.streams import Entry, StreamConsumer
from common.tenants import client_job_id, tenant_of
from services.router.config import RouterConfig

DELIVER_ONCE = script("services", "router/deliver_once.lua")
REPLACED = 2  # DELIVER_ONCE's reply when it replaced a wrong-typed target
TENANT_GONE = 3  # DELIVER_ONCE's reply when the job's tenant was removed (or replaced) since
DEAD_LETTERS_MAXLEN = 10000


def count_replaced(replies: list[Any]) -> None:
    """Count the answers DELIVER_ONCE delivered by replacing a key of the wrong type."""
    replaced = sum(1 for reply in replies if reply == REPLACED)
    if replaced:
        metrics.ERRORS.labels("router", "reply_key_replaced").inc(replaced)


def dead_letter(pipe: aioredis.client.Pipeline, keys: Keys, dead: DeadLetter) -> None:
    pipe.xadd(keys.dead_letters, {"m": dead.encode()}, maxlen=DEAD_LETTERS_MAXLEN, approximate=True)


def final_result(c: Completion, finished: float) -> FinalResult:
    """What the client receives for a stage's completion, delivered at ``finished``."""
    return FinalResult(
        job_id=c.job_id,
        status=c.status,
        image=c.image,
        image_format=c.image_format,
        answered_by=c.answered_by,
        model=c.model,
        confidence=c.confidence,
        degraded=c.degraded,
        light_reason=c.light_reason,
        latency_ms=finished - c.arrival_ms,
        slo_met=c.status == Status.OK and finished <= c.deadline_ms,
        error_code=c.error_code,
        error_message=c.error_message,
        finished_ms=finished,
        image_ref=c.image_ref if c.by_ref else None,
        reply_token=c.reply_token,
    )


class Delivery:
    """The completions stream's consumer, and the one way any answer (a refusal included) is written."""

    def __init__(self, cfg: RouterConfig, keys: Keys, r: aioredis.Redis, blobs: BlobStore):
        self.cfg, self.keys, self.r, self.blobs = cfg, keys, r, blobs
        self.completions = StreamConsumer(
            r,
            keys.completions,
            "router",
            cfg.instance_id,
            reclaim_idle_ms=cfg.reclaim_idle_ms,
            max_deliveries=cfg.max_deliveries,
        )

    def queue(
        self, pipe: aioredis.client.Pipeline, result: FinalResult, reply_to: str | None, *, admitted: bool = True
    ) -> None:
        """Markers under the pipeline's (scoped) id; the answer carries the id its submitter used."""
        target, mode = (reply_to, "stream") if reply_to else (self.keys.result(result.job_id), "list")
        answer = replace(result, job_id=client_job_id(result.job_id))
        tenant, epoch = tenant_of(result.job_id) or ("", 0)
        # Plain EVAL (not EVALSHA): inside MULTI there is no NOSCRIPT retry, and Redis caches it anyway.
        ttl = self.cfg.result_ttl_s if admitted else min(self.cfg.refused_ttl_s, self.cfg.result_ttl_s)
        pipe.eval(
            DELIVER_ONCE,
            5,
            self.keys.done(result.job_id),
            target,
            self.keys.admitted(result.job_id),
            self.keys.tenant_epochs,
            self.keys.tenants,
            answer.encode(),
            ttl,
            mode,
            self.cfg.reply_maxlen,
            "1" if admitted else "0",
            tenant,
            epoch,
        )

    async def deliver_batch(self) -> None:
        entries = await self.completions.read(self.cfg.batch, block_ms=1000)
        if not entries:
            return
        finished = now_ms()
        results, bad = self._decode(entries, finished)
        # The image goes out inline unless the job asked for a reference.
        failed = await inline_images(self.blobs, [(r, c.image_ref) for c, r in results if c.image_ref and not c.by_ref])
        metrics.ERRORS.labels("router", E_INTERNAL).inc(failed)

        def deliver(pipe: aioredis.client.Pipeline) -> None:
            for c, result in results:
                self.queue(pipe, result, c.reply_to)
            for dead in bad:
                dead_letter(pipe, self.keys, dead)

        replies = await self.completions.write_and_ack([e.id for e in entries], [], deliver)
        count_replaced(replies[: len(results)])
        # Delivered: the stored images the client holds no reference to are done with.
        await self.blobs.discard(
            [
                key
                for (c, _r), fresh in zip(results, replies, strict=False)
                if fresh
                for key in c.blobs
                if key not in c.kept_blobs()
            ]
        )
        await self._count(results, replies)

    def _decode(
        self, entries: list[Entry], finished: float
    ) -> tuple[list[tuple[Completion, FinalResult]], list[DeadLetter]]:
        """Each entry's completion and answer; a dead letter for one that does not decode (a bug upstream:
        the evidence is kept, the router does not loop on it)."""
        results: list[tuple[Completion, FinalResult]] = []
        bad: list[DeadLetter] = []
        for entry in entries:
            try:
                c = Completion.decode(entry.payload or b"")
            except MessageError as exc:
                metrics.ERRORS.labels("router", exc.code).inc()
                bad.append(
                    DeadLetter(
                        stream=self.keys.completions,
                        entry_id=entry.id,
                        error_code=exc.code,
                        error_message=str(exc),
                        raw=(entry.payload or b"")[:4096],
                    )
                )
                continue
            if finished - c.arrival_ms > self.cfg.result_ttl_s * 1000:
                # Admitted longer ago than the done marker lives (a worker stalled past --result-ttl-s):
                # the job may have been answered already, and its id may be in use again. Never answered
                # twice: dropped and counted instead.
                metrics.ERRORS.labels("router", "stale_completion").inc()
                continue
            results.append((c, final_result(c, finished)))
        return results, bad

    async def _count(self, results: list[tuple[Completion, FinalResult]], replies: list[Any]) -> None:
        """Metrics per answer, and the SLO outcomes into the shared counters (AIMD batching reacts to misses)."""
        outcomes = {"slo_hit": 0, "slo_miss": 0}
        for (_c, result), fresh in zip(results, replies, strict=False):
            if not fresh:
                metrics.DUPLICATES.inc()
            elif fresh == TENANT_GONE:
                metrics.ERRORS.labels("router", "tenant_gone").inc()
            elif result.status == Status.CANCELLED:  # not served, so neither an SLO hit nor a miss
                metrics.PROCESSED.labels("router", "cancelled").inc()
            else:
                metrics.PROCESSED.labels("router", "delivered").inc()
                if result.status == Status.OK and result.latency_ms is not None:  # always set on this path
                    metrics.E2E_LATENCY.labels(result.answered_by or "").observe(result.latency_ms / 1000)
                if result.light_reason is not None:
                    metrics.LIGHT_ANSWERS.labels(result.light_reason).inc()
                metrics.SLO.labels("hit" if result.slo_met else "miss").inc()
                outcomes["slo_hit" if result.slo_met else "slo_miss"] += 1
        async with self.r.pipeline(transaction=False) as pipe:
            for field, n in outcomes.items():
                if n:
                    pipe.hincrby(self.keys.stats, field, n)
            await pipe.execute()
