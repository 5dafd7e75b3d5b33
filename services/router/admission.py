"""Admission: each submitted job validated, checked against its id's earlier use (a duplicate, or the same
request retried), routed (direct routing of split policies) and admitted into the stage it joins when
its predicted wait there fits its deadline (common/admission.py); every job of a batch is counted into
its stage before the next is decided, whichever stream it came from."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import redis.asyncio as aioredis

from common import admission, metrics
from common.admission import FairShare
from common.backends import effective_slo_ms, latency_scale, load_profile
from common.messages import (
    E_CANCELLED,
    E_DUPLICATE,
    E_OVERLOADED,
    Admitted,
    Cancel,
    DeadLetter,
    FinalResult,
    Job,
    MessageError,
    Plan,
    Role,
    RoutedBy,
    RoutedJob,
    Status,
)
from common.plan_store import PlanWatcher, StageWatcher, record_arrivals
from common.profiles import CascadeProfile, uniform_from_text
from common.routing import Decision, Stage, batch_times, degrades_late, direct_decision
from common.service import Service, now_ms
from common.stage import cancelled_ids
from common.streams import Entry, notify
from common.tenants import client_job_id, scoped_id
from services.router.config import RouterConfig
from services.router.delivery import Delivery, count_replaced, dead_letter
from services.router.sources import Source, Sources
from services.router.validate import JOB_ID_RE, parse_entry, refusal, reply_of


@dataclass
class Claim:
    """An ``admitted`` marker: the entry admitted under a job id, and what that request was (Job.digest)."""

    entry_id: str
    digest: str

    @classmethod
    def parse(cls, raw: bytes | str | None) -> Claim | None:
        if raw is None:
            return None
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        entry_id, _space, digest = text.partition(" ")  # a marker from before digests: no digest
        return cls(entry_id, digest)

    def encode(self) -> str:
        return f"{self.entry_id} {self.digest}"


@dataclass(frozen=True, kw_only=True)
class Candidate:
    """A valid job read in this batch: its entry, its source and what makes a retry of it the same request."""

    entry: Entry
    source: Source
    job: Job
    digest: str

    @property
    def key(self) -> str:
        return self.entry.id + self.entry.stream


@dataclass(frozen=True, kw_only=True)
class Stages:
    """The deadline rule's view of the stages for one batch: the heavy one as every stage predicts it
    (direct routing), both at the admission headroom (admission by predicted wait)."""

    heavy_now: Stage
    light: Stage
    heavy: Stage
    discriminator_ms: float


@dataclass(kw_only=True)
class Batch:
    """What one admission pass decides, step by step."""

    arrival: float
    now_s: float
    plan: Plan
    errors: list[tuple[str | None, FinalResult | DeadLetter]] = field(default_factory=list)
    outputs: list[tuple[str, bytes]] = field(default_factory=list)
    cancels: list[str] = field(default_factory=list)  # scoped ids a Cancel entry of this batch names
    claims: dict[str, Claim | None] = field(default_factory=dict)
    flags: dict[str, int] = field(default_factory=dict)  # cancel flags to set: scoped id -> ttl
    routes: dict[str, tuple[RoutedJob, Decision]] = field(default_factory=dict)  # Candidate.key -> route
    waiting: dict[str, Admitted] = field(default_factory=dict)  # Candidate.key -> what it is told
    notices: list[tuple[str, bytes]] = field(default_factory=list)  # (reply stream, Admitted)
    admitted_ids: list[str] = field(default_factory=list)
    offered: int = 0  # demand, as the controller's replay sees it: every valid job read
    retried: int = 0


class Admission:
    def __init__(self, svc: Service[RouterConfig], sources: Sources, delivery: Delivery):
        self.svc, self.cfg, self.keys, self.r = svc, svc.config, svc.keys, svc.redis
        self.sources, self.delivery = sources, delivery
        self.default_slo_ms = effective_slo_ms(self.cfg, self.cfg.slo_ms)
        self.fair = FairShare()
        self.plans = PlanWatcher(self.r, self.keys)
        self.stages = StageWatcher(self.r, self.keys, self.cfg.worker_timeout_s)
        self._profile: CascadeProfile | None = None
        self._times: dict[str, Callable[[int], float]] = {}
        self._rng = random.Random()

    @property
    def profile(self) -> CascadeProfile:
        """Loaded when the first job arrives (a router that only delivers never needs it)."""
        if self._profile is None:
            self._profile = load_profile(self.cfg)
        return self._profile

    def times(self, role: str) -> Callable[[int], float]:
        """A model's batch time (light, heavy or discriminator): the one estimate every stage uses
        (common/routing.batch_times)."""
        if role not in self._times:
            self._times[role] = batch_times(self.profile, role, latency_scale(self.cfg))
        return self._times[role]

    async def admit_batch(self) -> None:
        """Admit one batch read from every submission stream at once: the one admission point, so every
        job of the batch is counted into the stage it joins before the next is decided, whichever
        stream it came from. A tenant's job ids are scoped to it (``scoped_id``) from here on, so every
        key named after one is the tenant's own."""
        async with self.sources.lock:
            entries = await self.sources.reader.read(self.cfg.batch, block_ms=1000)
            if entries:
                await self._admit(entries)

    async def _admit(self, entries: list[Entry]) -> None:
        plan = await self.plans.current()
        # The deadline rule as this deployment applies it (--late-policy may override the plan's).
        plan = replace(plan, degrade_late=degrades_late(self.cfg.late_policy, plan.degrade_late))
        stages = await self._stages(plan)
        batch = Batch(arrival=now_ms(), now_s=time.monotonic(), plan=plan)
        jobs = self._parse(entries, batch)
        batch.offered = len(jobs)
        fresh = await self._not_cancelled(await self._unclaimed(jobs, batch), batch)
        self._route(fresh, stages, batch)
        await self._queue([c for c in fresh if c.key in batch.routes], batch)
        replies = await self.sources.reader.write_and_ack(entries, batch.outputs, lambda pipe: self._write(pipe, batch))
        count_replaced(replies[len(batch.outputs) : len(batch.outputs) + len(batch.errors)])
        metrics.PROCESSED.labels("router", "admitted").inc(len(batch.outputs))
        if batch.retried:
            metrics.PROCESSED.labels("router", "retried").inc(batch.retried)

    async def _stages(self, plan: Plan) -> Stages:
        headroom = self.cfg.admission_headroom
        heavy_now = await self.stages.stage(Role.HEAVY, plan, self.times(Role.HEAVY))
        light = await self.stages.stage(Role.LIGHT, plan, self.times(Role.LIGHT), joining=True)
        return Stages(
            heavy_now=heavy_now,
            light=admission.at_headroom(light, headroom),
            heavy=admission.at_headroom(heavy_now, headroom),
            discriminator_ms=self.times("discriminator")(plan.light_batch) / headroom,
        )

    def _parse(self, entries: list[Entry], batch: Batch) -> list[Candidate]:
        """The valid jobs of the batch; the invalid ones answered (or dead-lettered), cancels noted."""
        jobs: list[Candidate] = []
        for entry in entries:
            source = self.sources.get(entry.stream)
            if source is None:  # its tenant was removed since the read: acked below, answered to nobody
                continue
            try:
                message = parse_entry(entry, self.cfg, self.keys, source.tenant)
            except MessageError as exc:
                metrics.ERRORS.labels("router", exc.code).inc()
                batch.errors.append(self._invalid(entry, source, exc, batch.arrival))
                continue
            if isinstance(message, Cancel):
                batch.cancels.append(scoped_id(source.tenant, message.job_id, source.epoch))
                continue
            digest = message.digest()
            message.job_id = scoped_id(source.tenant, message.job_id, source.epoch)
            jobs.append(Candidate(entry=entry, source=source, job=message, digest=digest))
        return jobs

    def _invalid(
        self, entry: Entry, source: Source, exc: MessageError, arrival: float
    ) -> tuple[str | None, FinalResult | DeadLetter]:
        """The answer to an invalid entry: only a valid id may name a key (result list, reply), anything
        else is a dead letter."""
        if exc.job_id and JOB_ID_RE.match(exc.job_id):
            reply_to, token = reply_of(entry, self.keys, source.tenant, exc.job_id)
            job_id = scoped_id(source.tenant, exc.job_id, source.epoch)
            return reply_to, refusal(job_id, exc.code, str(exc), arrival, reply_token=token)
        dead = DeadLetter(
            stream=entry.stream,
            entry_id=entry.id,
            error_code=exc.code,
            error_message=str(exc),
            raw=(entry.payload or b"")[:4096],
        )
        return None, dead

    async def _unclaimed(self, jobs: list[Candidate], batch: Batch) -> list[Candidate]:
        """The jobs whose id is free. A job id admitted before: the same entry read again (a router crash
        before its ack) goes on; the same request again (its submitter retrying a submission whose reply it
        lost) is already served and is answered once, where the first one is (same reply target); anything
        else is a duplicate."""
        ids = [c.job.job_id for c in jobs] + batch.cancels
        raw_claims = await self.r.mget([self.keys.admitted(i) for i in ids]) if ids else []
        batch.claims = {i: Claim.parse(raw) for i, raw in zip(ids, raw_claims, strict=True)}
        fresh: list[Candidate] = []
        in_batch: dict[str, str] = {}  # job id -> digest of its first entry in this batch
        for c in jobs:
            claim = batch.claims.get(c.job.job_id)
            if c.job.job_id in in_batch:  # a second entry of this batch under this id
                claim = Claim("", in_batch[c.job.job_id])
            else:
                in_batch[c.job.job_id] = c.digest
            if claim is None or claim.entry_id == c.entry.id:
                fresh.append(c)
            elif claim.digest == c.digest:
                batch.retried += 1
            else:
                batch.errors.append((c.job.reply_to, self._duplicate(c.job, batch.arrival)))
        return fresh

    async def _not_cancelled(self, fresh: list[Candidate], batch: Batch) -> list[Candidate]:
        """The jobs not cancelled before admission (those are answered here, never queued); the cancel flags
        this batch's Cancel entries set."""
        ids = {c.job.job_id for c in fresh}
        cancelled = await cancelled_ids(self.r, self.keys, [c.job.job_id for c in fresh])
        cancelled |= set(batch.cancels) & ids
        # A Cancel sets the job's flag, always with a TTL: as long as the job's markers live for a job
        # admitted earlier, --refused-ttl-s for one not seen yet (cancelled before it is submitted).
        batch.flags = {
            i: self.cfg.result_ttl_s if batch.claims.get(i) is not None else self.cfg.refused_ttl_s
            for i in batch.cancels
            if i not in cancelled
        }
        for c in fresh:
            if c.job.job_id in cancelled:
                why = "cancelled by the client before it ran"
                answer = refusal(
                    c.job.job_id, E_CANCELLED, why, batch.arrival, Status.CANCELLED, reply_token=c.job.reply_token
                )
                batch.errors.append((c.job.reply_to, answer))
        return [c for c in fresh if c.job.job_id not in cancelled]

    def _routed(self, job: Job, source: Source, arrival: float) -> RoutedJob:
        return RoutedJob(
            job_id=job.job_id,
            prompt=job.prompt,
            arrival_ms=arrival,
            deadline_ms=arrival + (job.slo_ms or self.default_slo_ms),
            seed=job.seed if job.seed is not None else int(uniform_from_text(client_job_id(job.job_id)) * 2**31),
            image_format=job.image_format,
            image_quality=job.image_quality,
            reply_to=job.reply_to,
            partials=job.partials,
            prompt_index=job.prompt_index,
            image_ref=job.image_ref and source.tenant is None,  # a tenant's ACL reaches no image-store key
            reply_token=job.reply_token,
            negative_prompt=job.negative_prompt,
            progress=job.progress,
        )

    def _route(self, fresh: list[Candidate], stages: Stages, batch: Batch) -> None:
        """Each job's route and admission verdict, counted into its stage at once (a duplicate found later
        included: erring towards refusing) so the rest of the batch sees the queue with it in it."""
        for c in fresh:
            self.fair.arrived(c.source.share_key, batch.now_s)
        active = self.fair.active(batch.now_s)
        for c in fresh:
            routed = self._routed(c.job, c.source, batch.arrival)
            decision = Decision.LIGHT
            if batch.plan.heavy_fraction > 0:
                decision = direct_decision(
                    self._rng.random(),
                    batch.plan.heavy_fraction,
                    degrade_late=batch.plan.degrade_late,
                    on_time=stages.heavy_now.on_time(batch.arrival, routed.deadline_ms),
                )
            over_share = self.fair.over_share(c.source.share_key, batch.now_s, active)
            verdict = admission.admit(
                batch.plan,
                decision,
                batch.arrival,
                routed.deadline_ms,
                light=stages.light,
                heavy=stages.heavy,
                discriminator_ms=stages.discriminator_ms,
                max_light_backlog=self.cfg.max_light_backlog,
                budget=1.0 - self.cfg.fair_reserve if over_share else 1.0,
            )
            if not verdict.admitted:  # refused before admission: the id stays free for the retry
                metrics.ERRORS.labels("router", E_OVERLOADED).inc()
                reason = f"{verdict.reason} (over this client's fair share)" if over_share else verdict.reason
                answer = refusal(
                    c.job.job_id,
                    E_OVERLOADED,
                    f"overloaded: {reason}; retry later",
                    batch.arrival,
                    retry_after_ms=verdict.retry_after_ms,
                    reply_token=c.job.reply_token,
                )
                batch.errors.append((c.job.reply_to, answer))
                continue
            self._join(c, decision, stages, batch)
            batch.routes[c.key] = (routed, decision)

    def _join(self, c: Candidate, decision: Decision, stages: Stages, batch: Batch) -> None:
        """Count an admitted job into the stage it joins (and tell it where it stands, when it asked)."""
        stage = stages.heavy if decision == Decision.HEAVY else stages.light
        if c.job.progress and c.job.reply_to:  # where it stands, for whoever shows a waiting user
            batch.waiting[c.key] = Admitted(
                job_id=client_job_id(c.job.job_id),
                queue=Role.HEAVY if decision == Decision.HEAVY else Role.LIGHT,
                ahead=stage.backlog,
                wait_ms=stage.wait_ms(),
                reply_token=c.job.reply_token,
            )
        stage.admit()
        if decision == Decision.HEAVY:
            stages.heavy_now.admit()
        self.fair.admitted(c.source.share_key, batch.now_s)

    async def _queue(self, admitted: list[Candidate], batch: Batch) -> None:
        """Claim each admitted job's id and queue it; one whose id another entry claimed meanwhile is a
        retry of the same request or a duplicate."""
        owners = await self._claim_ids(admitted)
        for c in admitted:
            owner = owners.get(c.job.job_id)
            if owner is not None and owner.entry_id != c.entry.id:
                if owner.digest == c.digest:
                    batch.retried += 1
                else:
                    batch.errors.append((c.job.reply_to, self._duplicate(c.job, batch.arrival)))
                continue
            routed, decision = batch.routes[c.key]
            if decision == Decision.HEAVY:
                routed.routed_by = RoutedBy.DIRECT
                batch.outputs.append((self.keys.heavy_queue, routed.encode()))
            else:
                routed.routed_by = RoutedBy.FALLBACK if decision == Decision.LATE else RoutedBy.CASCADE
                batch.outputs.append((self.keys.light_queue, routed.encode()))
            batch.admitted_ids.append(c.job.job_id)
            notice = batch.waiting.get(c.key)
            if notice is not None and c.job.reply_to:
                batch.notices.append((c.job.reply_to, notice.encode()))

    def _write(self, pipe: aioredis.client.Pipeline, batch: Batch) -> None:
        """Everything else the batch writes, in its admission transaction."""
        for reply_to, message in batch.errors:
            if isinstance(message, DeadLetter):
                dead_letter(pipe, self.keys, message)
            else:  # refused before admission: the id stays free for a retry
                self.delivery.queue(pipe, message, reply_to, admitted=False)
        for job_id in batch.admitted_ids:  # after the refusals above: one in this batch may share the id
            pipe.delete(self.keys.done(job_id))
        for job_id, ttl in batch.flags.items():
            pipe.set(self.keys.cancel(job_id), 1, ex=ttl)
        for reply_to, payload in batch.notices:
            notify(pipe, reply_to, payload, maxlen=self.cfg.reply_maxlen, ttl_s=self.cfg.result_ttl_s)
        if batch.offered:  # last: the replies before these are counted by position
            record_arrivals(pipe, self.keys, batch.arrival, batch.offered)

    def _duplicate(self, job: Job, arrival: float) -> FinalResult:
        metrics.ERRORS.labels("router", E_DUPLICATE).inc()
        message = (
            f"a different job with this id was admitted in the last {self.cfg.result_ttl_s} s (in flight or "
            "answered); use a new id"
        )
        return refusal(job.job_id, E_DUPLICATE, message, arrival, reply_token=job.reply_token)

    async def _claim_ids(self, jobs: list[Candidate]) -> dict[str, Claim]:
        """Mark each job's id admitted under its entry; returns the claims that were there before (an id
        admitted under another entry: a duplicate or a retry). The marker names the admitted entry, so the
        same entry read again after a router crash (before its ack) is admitted again, not refused."""
        if not jobs:
            return {}
        async with self.r.pipeline(transaction=False) as pipe:
            for c in jobs:
                marker = Claim(c.entry.id, c.digest).encode()
                pipe.set(self.keys.admitted(c.job.job_id), marker, nx=True, get=True, ex=self.cfg.result_ttl_s)
            owners: list[Any] = await pipe.execute()
        return {
            c.job.job_id: claim
            for c, owner in zip(jobs, owners, strict=True)
            if (claim := Claim.parse(owner)) is not None
        }
