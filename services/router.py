"""Router: admits jobs (validate, stamp arrival and deadline, enqueue for the light model)
and delivers each job's final result exactly once."""

from __future__ import annotations

import asyncio
import random
import re
import time
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, NoReturn

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from common import metrics
from common.cascades import cascade
from common.backends import BackendSettings, latency_scale, load_profile
from common.config import Keys, ReplySettings, ServiceConfig, option
from common.messages import (
    Admitted,
    E_CANCELLED,
    E_DUPLICATE,
    E_INVALID,
    E_MALFORMED,
    E_OVERLOADED,
    E_PROMPT_TOO_LONG,
    E_UNKNOWN_MODEL,
    IMAGE_FORMATS,
    Completion,
    DeadLetter,
    FinalResult,
    Job,
    MessageError,
    RoutedBy,
    Role,
    RoutedJob,
    Status,
    unpack,
)
from common import admission
from common.plan_store import PlanWatcher, StageWatcher
from common.routing import Decision, direct_decision
from common.profiles import CascadeProfile, uniform_from_text
from common.service import Service, now_ms, run
from common.stage import cancelled_ids
from common.streams import (
    PIPELINE_GROUPS,
    Entry,
    StreamConsumer,
    backlog,
    notify,
    run_forever,
    trim_processed,
)
from common.tenants import client_job_id, default_reply, scoped_id, tenant_names

# Atomic "deliver once": the done marker and the result are written together or not at all,
# so a completion retried after a crash can never produce a second result. ARGV[5] '0': the answer
# to a job refused before admission. It is always delivered, and leaves a short-lived marker (which
# the gateway reads as "out of flight") only when no job with this id is in flight (KEYS[3]); an
# admitted retry under the same id deletes that marker in its admission transaction.
# The target is checked before anything is written: a key of another type there (put by whoever can
# write that name) would make the write fail after the marker was set, swallowing the answer. Such a
# key holds no answer anyone is owed, and the reader waits on this name, so it is replaced (returns 2).
DELIVER_ONCE = """
local want = ARGV[3] == 'stream' and 'stream' or 'list'
local kind = redis.call('TYPE', KEYS[2])['ok']
local admitted = ARGV[5] == '1'
if admitted then
  if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[2]) then return 0 end
elseif redis.call('EXISTS', KEYS[3]) == 0 then
  redis.call('SET', KEYS[1], '0', 'EX', ARGV[2])
end
local delivered = 1
if kind ~= 'none' and kind ~= want then
  redis.call('DEL', KEYS[2])
  delivered = 2
end
if ARGV[3] == 'stream' then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'm', ARGV[1])
  -- A client's reply stream: a short-lived answer must not shorten the life of the others.
  redis.call('EXPIRE', KEYS[2], ARGV[2], 'NX')
  redis.call('EXPIRE', KEYS[2], ARGV[2], 'GT')
else
  redis.call('RPUSH', KEYS[2], ARGV[1])
  redis.call('EXPIRE', KEYS[2], ARGV[2])
end
return delivered
"""
REPLACED = 2  # DELIVER_ONCE's reply when it replaced a wrong-typed target
# A removed tenant's stream, deleted once its loop has stopped (that loop's last read may have recreated
# it), unless the tenant was added again meanwhile.
FORGET_TENANT = """
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 0 then return redis.call('DEL', KEYS[2]) end
return 0
"""
TENANT_POLL_S = 2.0  # how often the router looks for tenants added or removed

QUEUE_POLL_S = 0.5
JOB_ID_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
PLAIN_FIELDS = {
    "job_id": str,
    "prompt": str,
    "slo_ms": float,
    "seed": int,
    "image_format": str,
    "image_quality": int,
    "reply_to": str,
    "cascade": str,
    "negative_prompt": str,
}


@dataclass
class RouterConfig(ServiceConfig, BackendSettings, ReplySettings):
    """diffserve router: admission, validation and exactly-once delivery of results."""

    slo_ms: float | None = option(None, "default SLO in ms (default: the cascade's)", env="DIFFSERVE_SLO_MS")
    max_prompt_chars: int = option(2000, "longest prompt accepted", env="DIFFSERVE_MAX_PROMPT_CHARS")
    max_entry_bytes: int = option(65536, "largest job entry accepted", env="DIFFSERVE_MAX_ENTRY_BYTES")
    max_light_backlog: int = option(
        5000,
        "hard cap of the light queue: new jobs for the light model are refused as overloaded at it "
        "(below it, jobs are refused when their predicted wait does not fit their deadline)",
        env="DIFFSERVE_MAX_LIGHT_BACKLOG",
    )
    admission_headroom: float = option(
        0.85,
        "admission predicts each stage at this share of its profiled speed (the profile leaves out "
        "per-batch overheads: a queue packed to exactly the deadline would miss it)",
        env="DIFFSERVE_ADMISSION_HEADROOM",
    )
    refused_ttl_s: int = option(
        300, "how long the answer to a job refused before admission is kept", env="DIFFSERVE_REFUSED_TTL_S"
    )
    batch: int = option(128, "entries read per pull", env="DIFFSERVE_ROUTER_BATCH")
    reclaim_idle_ms: int = option(
        10000, "take over entries idle this long on a dead router", env="DIFFSERVE_RECLAIM_IDLE_MS"
    )
    trim_interval_s: float = option(
        5.0, "how often processed stream entries are trimmed", env="DIFFSERVE_TRIM_INTERVAL_S"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.admission_headroom <= 1:
            raise ValueError(f"admission_headroom must be in (0, 1], not {self.admission_headroom}")


def parse_job(entry: Entry, cfg: RouterConfig, keys: Keys, tenant: str | None = None) -> Job:
    """Decode and validate one entry of the shared jobs stream (``tenant`` None) or of a tenant's
    stream; MessageError (with the job id when one could be read) for anything unacceptable.
    A tenant's job without ``reply_to`` is answered on its default reply stream."""
    if entry.oversized:  # left in Redis by the read: only its job id (and reply stream) came back
        job_id = entry.fields.get(b"job_id", b"").decode("utf-8", "replace")
        raise MessageError(E_INVALID, f"job entry larger than {cfg.max_entry_bytes} bytes", job_id or None)
    if entry.payload is not None:
        if len(entry.payload) > cfg.max_entry_bytes:
            raise MessageError(E_INVALID, f"job entry larger than {cfg.max_entry_bytes} bytes")
        body = unpack(entry.payload)
    elif entry.fields:  # plain XADD fields, e.g. from redis-cli
        if sum(len(k) + len(v) for k, v in entry.fields.items()) > cfg.max_entry_bytes:
            job_id = entry.fields.get(b"job_id", b"").decode("utf-8", "replace")
            raise MessageError(E_INVALID, f"job entry larger than {cfg.max_entry_bytes} bytes", job_id)
        body = {}
        for raw_key, raw_value in entry.fields.items():
            key = raw_key.decode("utf-8", "replace")
            if key in PLAIN_FIELDS:
                try:
                    body[key] = PLAIN_FIELDS[key](raw_value.decode("utf-8"))
                except (UnicodeDecodeError, ValueError):
                    raise MessageError(
                        E_INVALID, f"field {key!r} is not a valid {PLAIN_FIELDS[key].__name__}", body.get("job_id")
                    ) from None
    else:
        raise MessageError(E_MALFORMED, "empty entry")
    job = Job.from_dict({**body, "type": Job.TYPE})
    validate_job(job, cfg, keys, tenant)
    if tenant is not None and job.reply_to is None:
        job.reply_to = default_reply(keys, tenant, job.job_id)
    return job


def reply_prefix(keys: Keys, tenant: str | None) -> str:
    """The only names a job from this stream may ask to be answered on."""
    return keys.reply_prefix if tenant is None else keys.tenant_out(tenant)


def validate_job(job: Job, cfg: RouterConfig, keys: Keys, tenant: str | None = None) -> None:
    def bad(code: str, message: str) -> NoReturn:
        raise MessageError(code, message, job.job_id if JOB_ID_RE.match(job.job_id) else None)

    if not JOB_ID_RE.match(job.job_id):
        bad(E_INVALID, "job_id must be 1-128 characters of letters, digits, _ . : -")
    if not job.prompt.strip():
        bad(E_INVALID, "prompt is empty")
    if len(job.prompt) > cfg.max_prompt_chars:
        bad(E_PROMPT_TOO_LONG, f"prompt longer than {cfg.max_prompt_chars} characters")
    if "\x00" in job.prompt:
        bad(E_INVALID, "prompt contains a NUL character")
    if job.negative_prompt is not None and (
        len(job.negative_prompt) > cfg.max_prompt_chars or "\x00" in job.negative_prompt
    ):
        bad(E_INVALID, f"negative_prompt must be at most {cfg.max_prompt_chars} characters, without NUL")
    if job.slo_ms is not None and not (0 < job.slo_ms <= 600_000):
        bad(E_INVALID, "slo_ms must be in (0, 600000]")
    if job.seed is not None and not (0 <= job.seed < 2**63):
        bad(E_INVALID, "seed must be in [0, 2**63)")
    if job.image_format not in IMAGE_FORMATS:
        bad(E_INVALID, f"image_format must be one of {', '.join(IMAGE_FORMATS)}")
    if not (1 <= job.image_quality <= 100):
        bad(E_INVALID, "image_quality must be in [1, 100]")
    prefix = reply_prefix(keys, tenant)
    if job.reply_to is not None and not (job.reply_to.startswith(prefix) and len(job.reply_to) <= 200):
        bad(E_INVALID, f"reply_to must be a stream named {prefix}<id>")
    if job.cascade is not None and job.cascade != cfg.cascade:
        bad(E_UNKNOWN_MODEL, f"this deployment serves cascade {cfg.cascade!r}, not {job.cascade!r}")


def refusal(
    job_id: str,
    code: str,
    message: str,
    finished_ms: float,
    status: Status = Status.ERROR,
    *,
    retry_after_ms: float | None = None,
) -> FinalResult:
    """The answer to a job the router does not admit (invalid, cancelled, overloaded, duplicate)."""
    return FinalResult(
        job_id=job_id,
        status=status,
        error_code=code,
        error_message=message,
        finished_ms=finished_ms,
        retry_after_ms=retry_after_ms,
    )


@dataclass
class JobSource:
    """A stream the router admits jobs from: the shared jobs stream (``tenant`` None) or a tenant's own."""

    consumer: StreamConsumer
    tenant: str | None = None


@dataclass
class TenantLoop:
    source: JobSource
    stop: asyncio.Event
    task: asyncio.Task[None]


class Router:
    def __init__(self, svc: Service[RouterConfig]):
        self.svc, self.cfg, self.keys, self.r = svc, svc.config, svc.keys, svc.redis
        self.default_slo_ms = self.cfg.slo_ms or cascade(self.cfg.cascade).slo_ms
        # Entries over the size limit stay in Redis (the consumer gets a stub): one read holds at most
        # about batch x max_entry_bytes, whatever clients put on the stream.
        self.jobs = self._consumer(self.keys.jobs, self.cfg.max_entry_bytes)
        self.shared = JobSource(self.jobs)
        self.tenants: dict[str, TenantLoop] = {}  # one admit loop per tenant stream
        self.completions = self._consumer(self.keys.completions)
        self.plans = PlanWatcher(self.r, self.keys)
        self.stages = StageWatcher(self.r, self.keys)
        self._profile: CascadeProfile | None = None
        self._next_trim = 0.0
        self._rng = random.Random()

    def _consumer(self, stream: str, max_entry_bytes: int | None = None) -> StreamConsumer:
        return StreamConsumer(
            self.r,
            stream,
            "router",
            self.cfg.instance_id,
            reclaim_idle_ms=self.cfg.reclaim_idle_ms,
            max_entry_bytes=max_entry_bytes,
        )

    def batch_ms(self, role: str, batch: int) -> float:
        """A model's batch time (light, heavy or discriminator) as admission and direct routing
        predict it: profiled, in this deployment's clock, at ``--admission-headroom`` of its speed
        (the profile is loaded when the first job arrives)."""
        if self._profile is None:
            self._profile = load_profile(self.cfg)
        return self._profile.table(role).latency_ms(batch) * latency_scale(self.cfg) / self.cfg.admission_headroom

    # ---------- admission ----------
    async def admit_batch(self, source: JobSource | None = None) -> None:
        """Admit one batch from ``source`` (default: the shared jobs stream). A tenant's job ids are
        scoped to it (``scoped_id``) from here on, so every key named after one is the tenant's own."""
        source = source or self.shared
        tenant = source.tenant
        entries = await source.consumer.read(self.cfg.batch, block_ms=1000)
        if not entries:
            return
        plan = await self.plans.current()
        # The deadline rule's view of both stages, for routing and admission by predicted wait.
        light = await self.stages.stage(Role.LIGHT, plan, self.batch_ms(Role.LIGHT, plan.light_batch))
        heavy = await self.stages.stage(Role.HEAVY, plan, self.batch_ms(Role.HEAVY, plan.heavy_batch))
        discriminator_ms = self.batch_ms("discriminator", plan.light_batch)
        outputs: list[tuple[str, bytes]] = []
        errors: list[tuple[str | None, FinalResult | DeadLetter]] = []
        arrival = now_ms()
        jobs: list[tuple[str, Job]] = []  # (jobs-stream entry id, job)
        for entry in entries:
            try:
                job = parse_job(entry, self.cfg, self.keys, tenant)
            except MessageError as exc:
                metrics.ERRORS.labels("router", exc.code).inc()
                # Only a valid id may name a key (result list, reply): anything else is a dead letter.
                if exc.job_id and JOB_ID_RE.match(exc.job_id):
                    reply_to = _reply_to_of(entry, self.keys, tenant, exc.job_id)
                    errors.append((reply_to, refusal(scoped_id(tenant, exc.job_id), exc.code, str(exc), arrival)))
                else:
                    errors.append(
                        (
                            None,
                            DeadLetter(
                                stream=source.consumer.stream,
                                entry_id=entry.id,
                                error_code=exc.code,
                                error_message=str(exc),
                                raw=(entry.payload or b"")[:4096],
                            ),
                        )
                    )
                continue
            job.job_id = scoped_id(tenant, job.job_id)
            jobs.append((entry.id, job))
        cancelled = await cancelled_ids(self.r, self.keys, [job.job_id for _id, job in jobs])
        for _id, job in jobs:
            if job.job_id in cancelled:  # cancelled before admission: answered here, never queued
                message = "cancelled by the client before it ran"
                errors.append((job.reply_to, refusal(job.job_id, E_CANCELLED, message, arrival, Status.CANCELLED)))
        jobs = [(entry_id, job) for entry_id, job in jobs if job.job_id not in cancelled]
        routes: dict[str, tuple[RoutedJob, Decision]] = {}  # entry id -> the admitted job and its route
        waiting: dict[str, Admitted] = {}  # entry id -> what a job that asked for progress is told
        for entry_id, job in jobs:
            routed = RoutedJob(
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
                negative_prompt=job.negative_prompt,
                progress=job.progress,
            )
            decision = Decision.LIGHT
            if plan.heavy_fraction > 0:
                decision = direct_decision(
                    self._rng.random(),
                    plan.heavy_fraction,
                    degrade_late=plan.degrade_late,
                    on_time=heavy.on_time(arrival, routed.deadline_ms),
                )
            verdict = admission.admit(
                plan,
                decision,
                arrival,
                routed.deadline_ms,
                light=light,
                heavy=heavy,
                discriminator_ms=discriminator_ms,
                max_light_backlog=self.cfg.max_light_backlog,
            )
            if not verdict.admitted:  # refused before admission: the id stays free for the retry
                metrics.ERRORS.labels("router", E_OVERLOADED).inc()
                message = f"overloaded: {verdict.reason}; retry later"
                answer = refusal(job.job_id, E_OVERLOADED, message, arrival, retry_after_ms=verdict.retry_after_ms)
                errors.append((job.reply_to, answer))
                continue
            # Counted now (a duplicate found below included: erring towards refusing), so the
            # rest of this batch sees the queue with this job in it.
            stage = heavy if decision == Decision.HEAVY else light
            if job.progress and job.reply_to:  # where it stands, for whoever shows a waiting user
                joined = Role.HEAVY if decision == Decision.HEAVY else Role.LIGHT
                waiting[entry_id] = Admitted(
                    job_id=client_job_id(job.job_id), queue=joined, ahead=stage.backlog, wait_ms=stage.wait_ms()
                )
            stage.admit()
            routes[entry_id] = (routed, decision)
        jobs = [(entry_id, job) for entry_id, job in jobs if entry_id in routes]
        duplicates = await self._claim_ids(jobs)
        for entry_id, job in jobs:
            if entry_id in duplicates:
                metrics.ERRORS.labels("router", E_DUPLICATE).inc()
                message = (
                    f"a job with this id was admitted in the last {self.cfg.result_ttl_s} s (in flight or answered); "
                    "use a new id"
                )
                errors.append((job.reply_to, refusal(job.job_id, E_DUPLICATE, message, arrival)))
                continue
            routed, decision = routes[entry_id]
            if decision == Decision.HEAVY:
                routed.routed_by = RoutedBy.DIRECT
                outputs.append((self.keys.heavy_queue, routed.encode()))
            else:
                routed.routed_by = RoutedBy.FALLBACK if decision == Decision.LATE else RoutedBy.CASCADE
                outputs.append((self.keys.light_queue, routed.encode()))

        admitted_ids = [job.job_id for entry_id, job in jobs if entry_id not in duplicates]

        def deliver_errors(pipe: aioredis.client.Pipeline) -> None:
            for reply_to, message in errors:
                if isinstance(message, DeadLetter):
                    pipe.xadd(self.keys.dead_letters, {"m": message.encode()}, maxlen=10000, approximate=True)
                else:  # refused before admission: the id stays free for a retry
                    self._deliver(pipe, message, reply_to, admitted=False)
            for job_id in admitted_ids:  # after the refusals above: one in this batch may share the id
                pipe.delete(self.keys.done(job_id))
            for entry_id, job in jobs:
                if entry_id in waiting and entry_id not in duplicates and job.reply_to:
                    payload = waiting[entry_id].encode()
                    notify(pipe, job.reply_to, payload, maxlen=self.cfg.reply_maxlen, ttl_s=self.cfg.result_ttl_s)

        replies = await source.consumer.write_and_ack([e.id for e in entries], outputs, deliver_errors)
        _count_replaced(replies[len(outputs) : len(outputs) + len(errors)])
        metrics.PROCESSED.labels("router", "admitted").inc(len(outputs))

    async def _claim_ids(self, jobs: list[tuple[str, Job]]) -> set[str]:
        """Entry ids whose job id another entry was admitted under (within the result TTL).
        The marker holds the admitted entry's id, so the same entry read again after a router
        crash (before its ack) is admitted again, not refused as its own duplicate."""
        if not jobs:
            return set()
        async with self.r.pipeline(transaction=False) as pipe:
            for entry_id, job in jobs:
                pipe.set(self.keys.admitted(job.job_id), entry_id, nx=True, get=True, ex=self.cfg.result_ttl_s)
            owners = await pipe.execute()
        return {
            entry_id
            for (entry_id, _job), owner in zip(jobs, owners)
            if owner is not None and owner.decode() != entry_id
        }

    # ---------- delivery ----------
    def _deliver(
        self, pipe: aioredis.client.Pipeline, result: FinalResult, reply_to: str | None, *, admitted: bool = True
    ) -> None:
        """Markers under the pipeline's (scoped) id; the answer carries the id its submitter used."""
        target, mode = (reply_to, "stream") if reply_to else (self.keys.result(result.job_id), "list")
        answer = replace(result, job_id=client_job_id(result.job_id))
        # Plain EVAL (not EVALSHA): inside MULTI there is no NOSCRIPT retry, and Redis caches it anyway.
        ttl = self.cfg.result_ttl_s if admitted else min(self.cfg.refused_ttl_s, self.cfg.result_ttl_s)
        pipe.eval(
            DELIVER_ONCE,
            3,
            self.keys.done(result.job_id),
            target,
            self.keys.admitted(result.job_id),
            answer.encode(),
            ttl,
            mode,
            self.cfg.reply_maxlen,
            "1" if admitted else "0",
        )

    async def deliver_batch(self) -> None:
        entries = await self.completions.read(self.cfg.batch, block_ms=1000)
        if not entries:
            return
        finished = now_ms()
        results: list[tuple[Completion, FinalResult]] = []
        bad_ids: list[DeadLetter] = []
        for entry in entries:
            try:
                c = Completion.decode(entry.payload or b"")
            except MessageError as exc:  # a bug upstream; keep the evidence, don't loop on it
                metrics.ERRORS.labels("router", exc.code).inc()
                bad_ids.append(
                    DeadLetter(
                        stream=self.keys.completions,
                        entry_id=entry.id,
                        error_code=exc.code,
                        error_message=str(exc),
                        raw=(entry.payload or b"")[:4096],
                    )
                )
                continue
            latency = finished - c.arrival_ms
            slo_met = c.status == Status.OK and finished <= c.deadline_ms
            results.append(
                (
                    c,
                    FinalResult(
                        job_id=c.job_id,
                        status=c.status,
                        image=c.image,
                        image_format=c.image_format,
                        answered_by=c.answered_by,
                        model=c.model,
                        confidence=c.confidence,
                        degraded=c.degraded,
                        latency_ms=latency,
                        slo_met=slo_met,
                        error_code=c.error_code,
                        error_message=c.error_message,
                        finished_ms=finished,
                    ),
                )
            )

        def deliver(pipe: aioredis.client.Pipeline) -> None:
            for c, result in results:
                self._deliver(pipe, result, c.reply_to)
            for dead in bad_ids:
                pipe.xadd(self.keys.dead_letters, {"m": dead.encode()}, maxlen=10000, approximate=True)

        replies = await self.completions.write_and_ack([e.id for e in entries], [], deliver)
        _count_replaced(replies[: len(results)])
        outcomes = {"slo_hit": 0, "slo_miss": 0}
        for (c, result), fresh in zip(results, replies):
            if not fresh:
                metrics.DUPLICATES.inc()
                continue
            if result.status == Status.CANCELLED:  # not served, so neither an SLO hit nor a miss
                metrics.PROCESSED.labels("router", "cancelled").inc()
                continue
            metrics.PROCESSED.labels("router", "delivered").inc()
            if result.status == Status.OK and result.latency_ms is not None:  # always set on this path
                metrics.E2E_LATENCY.labels(result.answered_by or "").observe(result.latency_ms / 1000)
            metrics.SLO.labels("hit" if result.slo_met else "miss").inc()
            outcomes["slo_hit" if result.slo_met else "slo_miss"] += 1
        # Shared counters for the controller (AIMD batching reacts to misses).
        async with self.r.pipeline(transaction=False) as pipe:
            for field, n in outcomes.items():
                if n:
                    pipe.hincrby(self.keys.stats, field, n)
            await pipe.execute()

    # ---------- housekeeping ----------
    async def housekeeping(self) -> None:
        """Measure every queue often (the queue-depth metrics); trim less often."""
        for attr, group in PIPELINE_GROUPS:
            metrics.QUEUE_DEPTH.labels(attr).set(await backlog(self.r, getattr(self.keys, attr), group))
        if time.monotonic() >= self._next_trim:
            self._next_trim = time.monotonic() + self.cfg.trim_interval_s
            for attr, _group in PIPELINE_GROUPS:
                await trim_processed(self.r, getattr(self.keys, attr))
            for loop in list(self.tenants.values()):
                await trim_processed(self.r, loop.source.consumer.stream)
        await self.svc.sleep(QUEUE_POLL_S)

    # ---------- tenants ----------
    async def watch_tenants(self) -> None:
        """Start an admit loop for each tenant registered since the last look; stop removed tenants'."""
        names = await tenant_names(self.r, self.keys)
        for name in sorted(names - self.tenants.keys()):
            source = JobSource(self._consumer(self.keys.tenant_in(name), self.cfg.max_entry_bytes), name)
            try:
                await source.consumer.ensure_group()
            except ResponseError as exc:  # e.g. a key of another type under that name: the others still start
                self.svc.log.error("cannot serve tenant", extra={"tenant": name, "error": str(exc)[:200]})
                continue
            stop = asyncio.Event()
            task = asyncio.create_task(run_forever(f"admit:{name}", partial(self.admit_batch, source), stop))
            self.tenants[name] = TenantLoop(source, stop, task)
            self.svc.log.info("serving tenant", extra={"tenant": name})
        for name in sorted(self.tenants.keys() - names):
            await self._stop_tenant(name)
            await self.r.eval(FORGET_TENANT, 2, self.keys.tenants, self.keys.tenant_in(name), name)
            self.svc.log.info("tenant removed", extra={"tenant": name})
        await self.svc.sleep(TENANT_POLL_S)

    async def _stop_tenant(self, name: str) -> None:
        loop = self.tenants.pop(name)
        loop.stop.set()  # the loop ends after its current read (at most one BLOCK)
        await loop.task

    async def stop_tenants(self) -> None:
        for name in list(self.tenants):
            await self._stop_tenant(name)


def _count_replaced(replies: list[Any]) -> None:
    """Count the answers DELIVER_ONCE delivered by replacing a key of the wrong type."""
    replaced = sum(1 for reply in replies if reply == REPLACED)
    if replaced:
        metrics.ERRORS.labels("router", "reply_key_replaced").inc(replaced)


def _reply_to_of(entry: Entry, keys: Keys, tenant: str | None, job_id: str) -> str | None:
    """Where to answer an entry that failed validation: its reply stream when that is well-formed,
    else the result list (shared stream) or the tenant's default reply stream."""
    fallback = None if tenant is None else default_reply(keys, tenant, job_id)
    prefix = reply_prefix(keys, tenant)
    try:
        body = (
            unpack(entry.payload)
            if entry.payload is not None
            else {k.decode(): v.decode() for k, v in entry.fields.items()}
        )
    except (MessageError, UnicodeDecodeError):
        return fallback
    reply_to = body.get("reply_to")
    valid = isinstance(reply_to, str) and reply_to.startswith(prefix) and len(reply_to) <= 200
    return reply_to if valid else fallback


async def serve(svc: Service[RouterConfig]) -> None:
    router = Router(svc)
    svc.ready()
    try:
        await asyncio.gather(
            run_forever("admit", router.admit_batch, svc.stop),
            run_forever("deliver", router.deliver_batch, svc.stop),
            run_forever("housekeeping", router.housekeeping, svc.stop),
            run_forever("tenants", router.watch_tenants, svc.stop),
        )
    finally:
        await router.stop_tenants()


def main(argv: list[str] | None = None) -> None:
    run("router", RouterConfig.from_args(argv, prog="diffserve router"), serve)


if __name__ == "__main__":
    main()
