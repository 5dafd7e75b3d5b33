"""Router: admits jobs (validate, stamp arrival and deadline, enqueue for the light model)
and delivers each job's final result exactly once."""

from __future__ import annotations

import asyncio
import random
import re
import time
from dataclasses import dataclass

from common import metrics
from common.cascades import cascade
from common.backends import BackendSettings, latency_scale, load_profile
from common.config import Keys, ServiceConfig, option
from common.messages import (
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
    RoutedJob,
    unpack,
)
from common import admission
from common.plan_store import PlanWatcher, StageWatcher
from common.routing import Decision, direct_decision
from common.profiles import uniform_from_text
from common.service import Service, now_ms, run
from common.stage import cancelled_ids
from common.streams import PIPELINE_GROUPS, Entry, StreamConsumer, backlog, run_forever, trim_processed

# Atomic "deliver once": the done marker and the result are written together or not at all,
# so a completion retried after a crash can never produce a second result. ARGV[5] '0': the answer
# to a job refused before admission. It is always delivered, and leaves a short-lived marker (which
# the gateway reads as "out of flight") only when no job with this id is in flight (KEYS[3]); an
# admitted retry under the same id deletes that marker in its admission transaction.
DELIVER_ONCE = """
local admitted = ARGV[5] == '1'
if admitted then
  if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[2]) then return 0 end
elseif redis.call('EXISTS', KEYS[3]) == 0 then
  redis.call('SET', KEYS[1], '0', 'EX', ARGV[2])
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
return 1
"""

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
}


@dataclass
class RouterConfig(ServiceConfig, BackendSettings):
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
    result_ttl_s: int = option(3600, "how long results and done markers are kept", env="DIFFSERVE_RESULT_TTL_S")
    refused_ttl_s: int = option(
        300, "how long the answer to a job refused before admission is kept", env="DIFFSERVE_REFUSED_TTL_S"
    )
    reply_maxlen: int = option(100000, "approximate cap of a client's reply stream", env="DIFFSERVE_REPLY_MAXLEN")
    batch: int = option(128, "entries read per pull", env="DIFFSERVE_ROUTER_BATCH")
    reclaim_idle_ms: int = option(
        10000, "take over entries idle this long on a dead router", env="DIFFSERVE_RECLAIM_IDLE_MS"
    )
    trim_interval_s: float = option(
        5.0, "how often processed stream entries are trimmed", env="DIFFSERVE_TRIM_INTERVAL_S"
    )

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.admission_headroom <= 1:
            raise ValueError(f"admission_headroom must be in (0, 1], not {self.admission_headroom}")


def parse_job(entry: Entry, cfg: RouterConfig, keys: Keys) -> Job:
    """Decode and validate one jobs-stream entry; MessageError (with the job id when one
    could be read) for anything unacceptable."""
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
    validate_job(job, cfg, keys)
    return job


def validate_job(job: Job, cfg: RouterConfig, keys: Keys) -> None:
    def bad(code: str, message: str):
        raise MessageError(code, message, job.job_id if JOB_ID_RE.match(job.job_id) else None)

    if not JOB_ID_RE.match(job.job_id):
        bad(E_INVALID, "job_id must be 1-128 characters of letters, digits, _ . : -")
    if not job.prompt.strip():
        bad(E_INVALID, "prompt is empty")
    if len(job.prompt) > cfg.max_prompt_chars:
        bad(E_PROMPT_TOO_LONG, f"prompt longer than {cfg.max_prompt_chars} characters")
    if "\x00" in job.prompt:
        bad(E_INVALID, "prompt contains a NUL character")
    if job.slo_ms is not None and not (0 < job.slo_ms <= 600_000):
        bad(E_INVALID, "slo_ms must be in (0, 600000]")
    if job.seed is not None and not (0 <= job.seed < 2**63):
        bad(E_INVALID, "seed must be in [0, 2**63)")
    if job.image_format not in IMAGE_FORMATS:
        bad(E_INVALID, f"image_format must be one of {', '.join(IMAGE_FORMATS)}")
    if not (1 <= job.image_quality <= 100):
        bad(E_INVALID, "image_quality must be in [1, 100]")
    if job.reply_to is not None and not (job.reply_to.startswith(keys.reply_prefix) and len(job.reply_to) <= 200):
        bad(E_INVALID, f"reply_to must be a stream named {keys.reply_prefix}<id>")
    if job.cascade is not None and job.cascade != cfg.cascade:
        bad(E_UNKNOWN_MODEL, f"this deployment serves cascade {cfg.cascade!r}, not {job.cascade!r}")


class Router:
    def __init__(self, svc: Service):
        self.svc, self.cfg, self.keys, self.r = svc, svc.config, svc.keys, svc.redis
        self.default_slo_ms = self.cfg.slo_ms or cascade(self.cfg.cascade).slo_ms
        name = self.cfg.instance_id
        # Entries over the size limit stay in Redis (the consumer gets a stub): one read holds at most
        # about batch x max_entry_bytes, whatever clients put on the stream.
        self.jobs = StreamConsumer(
            self.r,
            self.keys.jobs,
            "router",
            name,
            reclaim_idle_ms=self.cfg.reclaim_idle_ms,
            max_entry_bytes=self.cfg.max_entry_bytes,
        )
        self.completions = StreamConsumer(
            self.r, self.keys.completions, "router", name, reclaim_idle_ms=self.cfg.reclaim_idle_ms
        )
        self.plans = PlanWatcher(self.r, self.keys)
        self.stages = StageWatcher(self.r, self.keys)
        self._profile = None
        self._next_trim = 0.0
        self._rng = random.Random()

    def batch_ms(self, role: str, batch: int) -> float:
        """A model's batch time (light, heavy or discriminator) as admission and direct routing
        predict it: profiled, in this deployment's clock, at ``--admission-headroom`` of its speed
        (the profile is loaded when the first job arrives)."""
        if self._profile is None:
            self._profile = load_profile(self.cfg)
        return self._profile.table(role).latency_ms(batch) * latency_scale(self.cfg) / self.cfg.admission_headroom

    # ---------- admission ----------
    async def admit_batch(self) -> None:
        entries = await self.jobs.read(self.cfg.batch, block_ms=1000)
        if not entries:
            return
        plan = await self.plans.current()
        # The deadline rule's view of both stages, for routing and admission by predicted wait.
        light = await self.stages.stage("light", plan, self.batch_ms("light", plan.light_batch))
        heavy = await self.stages.stage("heavy", plan, self.batch_ms("heavy", plan.heavy_batch))
        discriminator_ms = self.batch_ms("discriminator", plan.light_batch)
        outputs: list[tuple[str, bytes]] = []
        errors: list[tuple[str | None, FinalResult | DeadLetter]] = []
        arrival = now_ms()
        jobs: list[tuple[str, Job]] = []  # (jobs-stream entry id, job)
        for entry in entries:
            try:
                job = parse_job(entry, self.cfg, self.keys)
            except MessageError as exc:
                metrics.ERRORS.labels("router", exc.code).inc()
                # Only a valid id may name a key (result list, reply): anything else is a dead letter.
                if exc.job_id and JOB_ID_RE.match(exc.job_id):
                    reply_to = _reply_to_of(entry, self.keys.reply_prefix)
                    errors.append(
                        (
                            reply_to,
                            FinalResult(
                                exc.job_id, "error", error_code=exc.code, error_message=str(exc), finished_ms=arrival
                            ),
                        )
                    )
                else:
                    errors.append(
                        (None, DeadLetter(self.keys.jobs, entry.id, exc.code, str(exc), (entry.payload or b"")[:4096]))
                    )
                continue
            jobs.append((entry.id, job))
        cancelled = await cancelled_ids(self.r, self.keys, [job.job_id for _id, job in jobs])
        for _id, job in jobs:
            if job.job_id in cancelled:  # cancelled before admission: answered here, never queued
                errors.append(
                    (
                        job.reply_to,
                        FinalResult(
                            job.job_id,
                            E_CANCELLED,
                            error_code=E_CANCELLED,
                            error_message="cancelled by the client before it ran",
                            finished_ms=arrival,
                        ),
                    )
                )
        jobs = [(entry_id, job) for entry_id, job in jobs if job.job_id not in cancelled]
        routes: dict[str, tuple[RoutedJob, Decision]] = {}  # entry id -> the admitted job and its route
        for entry_id, job in jobs:
            routed = RoutedJob(
                job.job_id,
                job.prompt,
                arrival,
                arrival + (job.slo_ms or self.default_slo_ms),
                job.seed if job.seed is not None else int(uniform_from_text(job.job_id) * 2**31),
                job.image_format,
                job.image_quality,
                job.reply_to,
                partials=job.partials,
                prompt_index=job.prompt_index,
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
                errors.append(
                    (
                        job.reply_to,
                        FinalResult(
                            job.job_id,
                            "error",
                            error_code=E_OVERLOADED,
                            error_message=f"overloaded: {verdict.reason}; retry later",
                            finished_ms=arrival,
                            retry_after_ms=verdict.retry_after_ms,
                        ),
                    )
                )
                continue
            # Counted now (a duplicate found below included: erring towards refusing), so the
            # rest of this batch sees the queue with this job in it.
            (heavy if decision == Decision.HEAVY else light).admit()
            routes[entry_id] = (routed, decision)
        jobs = [(entry_id, job) for entry_id, job in jobs if entry_id in routes]
        duplicates = await self._claim_ids(jobs)
        for entry_id, job in jobs:
            if entry_id in duplicates:
                metrics.ERRORS.labels("router", E_DUPLICATE).inc()
                errors.append(
                    (
                        job.reply_to,
                        FinalResult(
                            job.job_id,
                            "error",
                            error_code=E_DUPLICATE,
                            finished_ms=arrival,
                            error_message=f"a job with this id was admitted in the last {self.cfg.result_ttl_s} s "
                            "(in flight or answered); use a new id",
                        ),
                    )
                )
                continue
            routed, decision = routes[entry_id]
            if decision == Decision.HEAVY:
                routed.routed_by = "direct"
                outputs.append((self.keys.heavy_queue, routed.encode()))
            else:
                routed.routed_by = "fallback" if decision == Decision.LATE else "cascade"
                outputs.append((self.keys.light_queue, routed.encode()))

        admitted_ids = [job.job_id for entry_id, job in jobs if entry_id not in duplicates]

        def deliver_errors(pipe):
            for reply_to, message in errors:
                if isinstance(message, DeadLetter):
                    pipe.xadd(self.keys.dead_letters, {"m": message.encode()}, maxlen=10000, approximate=True)
                else:  # refused before admission: the id stays free for a retry
                    self._deliver(pipe, message, reply_to, admitted=False)
            for job_id in admitted_ids:  # after the refusals above: one in this batch may share the id
                pipe.delete(self.keys.done(job_id))

        await self.jobs.write_and_ack([e.id for e in entries], outputs, deliver_errors)
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
    def _deliver(self, pipe, result: FinalResult, reply_to: str | None, *, admitted: bool = True) -> None:
        target, mode = (reply_to, "stream") if reply_to else (self.keys.result(result.job_id), "list")
        # Plain EVAL (not EVALSHA): inside MULTI there is no NOSCRIPT retry, and Redis caches it anyway.
        ttl = self.cfg.result_ttl_s if admitted else min(self.cfg.refused_ttl_s, self.cfg.result_ttl_s)
        pipe.eval(
            DELIVER_ONCE,
            3,
            self.keys.done(result.job_id),
            target,
            self.keys.admitted(result.job_id),
            result.encode(),
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
        bad_ids = []
        for entry in entries:
            try:
                c = Completion.decode(entry.payload or b"")
            except MessageError as exc:  # a bug upstream; keep the evidence, don't loop on it
                metrics.ERRORS.labels("router", exc.code).inc()
                bad_ids.append(
                    DeadLetter(self.keys.completions, entry.id, exc.code, str(exc), (entry.payload or b"")[:4096])
                )
                continue
            latency = finished - c.arrival_ms
            slo_met = c.status == "ok" and finished <= c.deadline_ms
            results.append(
                (
                    c,
                    FinalResult(
                        c.job_id,
                        c.status,
                        c.image,
                        c.image_format,
                        c.answered_by,
                        c.model,
                        c.confidence,
                        c.degraded,
                        latency,
                        slo_met,
                        c.error_code,
                        c.error_message,
                        finished,
                    ),
                )
            )

        def deliver(pipe):
            for c, result in results:
                self._deliver(pipe, result, c.reply_to)
            for dead in bad_ids:
                pipe.xadd(self.keys.dead_letters, {"m": dead.encode()}, maxlen=10000, approximate=True)

        replies = await self.completions.write_and_ack([e.id for e in entries], [], deliver)
        outcomes = {"slo_hit": 0, "slo_miss": 0}
        for (c, result), fresh in zip(results, replies):
            if not fresh:
                metrics.DUPLICATES.inc()
                continue
            if result.status == E_CANCELLED:  # not served, so neither an SLO hit nor a miss
                metrics.PROCESSED.labels("router", "cancelled").inc()
                continue
            metrics.PROCESSED.labels("router", "delivered").inc()
            if result.status == "ok":
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
        await self.svc.sleep(QUEUE_POLL_S)


def _reply_to_of(entry: Entry, prefix: str) -> str | None:
    """Best-effort reply stream of an entry that failed validation (only a well-formed one)."""
    try:
        body = (
            unpack(entry.payload)
            if entry.payload is not None
            else {k.decode(): v.decode() for k, v in entry.fields.items()}
        )
    except (MessageError, UnicodeDecodeError):
        return None
    reply_to = body.get("reply_to")
    return reply_to if isinstance(reply_to, str) and reply_to.startswith(prefix) and len(reply_to) <= 200 else None


async def serve(svc: Service) -> None:
    router = Router(svc)
    svc.ready()
    await asyncio.gather(
        run_forever("admit", router.admit_batch, svc.stop),
        run_forever("deliver", router.deliver_batch, svc.stop),
        run_forever("housekeeping", router.housekeeping, svc.stop),
    )


def main(argv: list[str] | None = None) -> None:
    run("router", RouterConfig.from_args(argv, prog="diffserve router"), serve)


if __name__ == "__main__":
    main()
