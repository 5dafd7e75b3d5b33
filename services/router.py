"""Router: admits jobs (validate, stamp arrival and deadline, enqueue for the light model)
and delivers each job's final result exactly once."""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, NoReturn

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from common import metrics
from common.backends import BackendSettings, SloSettings, effective_slo_ms, latency_scale, load_profile
from common.blobs import inline_images, open_store
from common.config import (
    ConsumerSettings,
    Keys,
    ReplySettings,
    RequestLimits,
    ServiceConfig,
    WorkerRegistrySettings,
    option,
)
from common.messages import (
    Admitted,
    E_CANCELLED,
    E_DUPLICATE,
    E_INTERNAL,
    E_INVALID,
    E_MALFORMED,
    E_OVERLOADED,
    E_PROMPT_TOO_LONG,
    E_UNKNOWN_MODEL,
    IMAGE_FORMATS,
    Cancel,
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
from common.admission import FairShare
from common.plan_store import PlanWatcher, StageWatcher, record_arrivals
from common.routing import Decision, LatePolicySettings, batch_times, degrades_late, direct_decision
from common.profiles import CascadeProfile, uniform_from_text
from common.service import Service, now_ms, run
from common.stage import cancelled_ids
from common.streams import (
    PIPELINE_GROUPS,
    Entry,
    StreamConsumer,
    SubmissionReader,
    backlog,
    notify,
    run_forever,
    trim_processed,
)
from common.tenants import ROUTER_GROUP, client_job_id, default_reply, scoped_id, tenant_epochs, tenant_of

# Atomic "deliver once": the done marker and the result are written together or not at all,
# so a completion retried after a crash can never produce a second result. A tenant's job (ARGV[6] its
# name, ARGV[7] its epoch) is answered only while that tenant is still registered under that epoch
# (KEYS[4] the epochs, KEYS[5] the tenant set): a removed tenant's answers, or ones meant for an earlier
# tenant of the same name, are not written (returns 3). ARGV[5] '0': the answer
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
if ARGV[6] ~= '' then
  local epoch = redis.call('HGET', KEYS[4], ARGV[6]) or '0'
  if redis.call('SISMEMBER', KEYS[5], ARGV[6]) == 0 or epoch ~= ARGV[7] then
    if admitted then redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[2]) end
    return 3
  end
end
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
TENANT_GONE = 3  # DELIVER_ONCE's reply when the job's tenant was removed (or replaced) since
# A removed tenant's stream, deleted once its loop has stopped (that loop's last read may have recreated
# it), unless the tenant was added again meanwhile.
FORGET_TENANT = """
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 0 then return redis.call('DEL', KEYS[2]) end
return 0
"""
TENANT_POLL_S = 2.0  # how often the router looks for tenants added or removed
CONNECTION_POLL_S = 0.5  # how often it counts tenants' connections

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
    "type": str,  # "cancel": a request to cancel the job with this id
    "negative_prompt": str,
}


@dataclass
class RouterConfig(
    ServiceConfig,
    BackendSettings,
    ReplySettings,
    SloSettings,
    RequestLimits,
    ConsumerSettings,
    LatePolicySettings,
    WorkerRegistrySettings,
):
    """diffserve router: admission, validation and exactly-once delivery of results."""

    max_entry_bytes: int = option(65536, "largest job entry accepted", env="DIFFSERVE_MAX_ENTRY_BYTES")
    max_light_backlog: int = option(
        admission.DEFAULT_MAX_LIGHT_BACKLOG,
        "hard cap of the light queue: new jobs for the light model are refused as overloaded at it "
        "(below it, jobs are refused when their predicted wait does not fit their deadline)",
        env="DIFFSERVE_MAX_LIGHT_BACKLOG",
    )
    admission_headroom: float = option(
        admission.DEFAULT_ADMISSION_HEADROOM,
        "admission predicts each stage at this share of its profiled speed (the profile leaves out "
        "per-batch overheads: a queue packed to exactly the deadline would miss it)",
        env="DIFFSERVE_ADMISSION_HEADROOM",
    )
    refused_ttl_s: int = option(
        300, "how long the answer to a job refused before admission is kept", env="DIFFSERVE_REFUSED_TTL_S"
    )
    batch: int = option(128, "entries read per pull", env="DIFFSERVE_ROUTER_BATCH")
    trim_interval_s: float = option(
        5.0, "how often processed stream entries are trimmed", env="DIFFSERVE_TRIM_INTERVAL_S"
    )
    per_stream_read: int = option(
        16,
        "entries a read takes from each submission stream before it takes more from any (fair reading)",
        env="DIFFSERVE_PER_STREAM_READ",
    )
    fair_reserve: float = option(
        0.25,
        "share of each job's slack (and of --max-light-backlog) kept for sources under their fair share of "
        "the recent admissions: a source over its share is admitted only into the rest (0: no fair share)",
        env="DIFFSERVE_FAIR_RESERVE",
    )
    tenant_max_queued: int = option(
        1000,
        "a tenant's submission stream is cut to its newest this many entries (the older ones are never "
        "read or answered): a tenant filling its own stream cannot fill Redis",
        env="DIFFSERVE_TENANT_MAX_QUEUED",
    )
    tenant_max_connections: int = option(
        32,
        "Redis connections one tenant user may hold; the router closes the newest beyond it (needs "
        "+client|list +client|kill; 0: no limit). Size Redis's maxclients for the services plus this x tenants",
        env="DIFFSERVE_TENANT_MAX_CONNECTIONS",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.admission_headroom <= 1:
            raise ValueError(f"admission_headroom must be in (0, 1], not {self.admission_headroom}")
        if self.blob_ttl_s < self.result_ttl_s:  # an answer must not outlive the image it refers to
            raise ValueError(f"blob_ttl_s ({self.blob_ttl_s}) must be at least result_ttl_s ({self.result_ttl_s})")
        if not 0 <= self.fair_reserve < 1:
            raise ValueError(f"fair_reserve must be in [0, 1), not {self.fair_reserve}")


def parse_job(entry: Entry, cfg: RouterConfig, keys: Keys, tenant: str | None = None) -> Job:
    """Decode and validate one job entry of the shared jobs stream (``tenant`` None) or of a tenant's
    stream; MessageError (with the job id when one could be read) for anything unacceptable."""
    message = parse_entry(entry, cfg, keys, tenant)
    if not isinstance(message, Job):
        raise MessageError(E_MALFORMED, f"expected a job, got a {message.TYPE}", message.job_id)
    return message


def parse_entry(entry: Entry, cfg: RouterConfig, keys: Keys, tenant: str | None = None) -> Job | Cancel:
    """Decode and validate one entry of a submission stream: a job, or a request to cancel one
    (``type: cancel``); MessageError (with the job id when one could be read) for anything unacceptable.
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
    if body.get("type") == Cancel.TYPE:
        cancel = Cancel.from_dict(body)
        if not JOB_ID_RE.match(cancel.job_id):
            raise MessageError(E_INVALID, "job_id must be 1-128 characters of letters, digits, _ . : -")
        return cancel
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
    reply_token: str | None = None,
) -> FinalResult:
    """The answer to a job the router does not admit (invalid, cancelled, overloaded, duplicate)."""
    return FinalResult(
        job_id=job_id,
        status=status,
        error_code=code,
        error_message=message,
        finished_ms=finished_ms,
        retry_after_ms=retry_after_ms,
        reply_token=reply_token,
    )


@dataclass
class Source:
    """A stream the router admits jobs from: the shared jobs stream (``tenant`` None) or a tenant's own."""

    stream: str
    tenant: str | None = None
    epoch: int = 0

    @property
    def share_key(self) -> str:
        """Whose fair share its jobs count against (common/admission.FairShare)."""
        return self.tenant or ""


@dataclass
class Claim:
    """An ``admitted`` marker: the entry admitted under a job id, and what that request was (Job.digest)."""

    entry_id: str
    digest: str

    @classmethod
    def parse(cls, raw: bytes | str | None) -> Claim | None:
        if raw is None:
            return None
        entry_id, _space, digest = _s(raw).partition(" ")  # a marker from before digests: no digest
        return cls(entry_id, digest)

    def encode(self) -> str:
        return f"{self.entry_id} {self.digest}"


class Router:
    def __init__(self, svc: Service[RouterConfig]):
        self.svc, self.cfg, self.keys, self.r = svc, svc.config, svc.keys, svc.redis
        self.default_slo_ms = effective_slo_ms(self.cfg, self.cfg.slo_ms)
        # Every submission stream (the shared one and each tenant's) through one reader: one read is at
        # most batch entries of at most max_entry_bytes (bigger ones come back as stubs), and the
        # connections it needs do not grow with the number of tenants.
        self.submissions = SubmissionReader(
            self.r,
            ROUTER_GROUP,
            self.cfg.instance_id,
            max_entry_bytes=self.cfg.max_entry_bytes,
            reclaim_idle_ms=self.cfg.reclaim_idle_ms,
            per_stream=self.cfg.per_stream_read,
        )
        self.sources: dict[str, Source] = {self.keys.jobs: Source(self.keys.jobs)}
        self.submissions.set_streams([self.keys.jobs])
        # Held while a batch is admitted and while the set of sources changes, so no batch sees half a change.
        self._sources_lock = asyncio.Lock()
        self.fair = FairShare()
        self.completions = StreamConsumer(
            self.r,
            self.keys.completions,
            "router",
            self.cfg.instance_id,
            reclaim_idle_ms=self.cfg.reclaim_idle_ms,
            max_deliveries=self.cfg.max_deliveries,
        )
        self.plans = PlanWatcher(self.r, self.keys)
        self.stages = StageWatcher(self.r, self.keys, self.cfg.worker_timeout_s)
        self._profile: CascadeProfile | None = None
        self._times: dict[str, Callable[[int], float]] = {}
        self.blobs = open_store(self.cfg, self.r)
        self._next_trim = 0.0
        self._rng = random.Random()
        self._guard_connections = self.cfg.tenant_max_connections > 0

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

    # ---------- admission ----------
    async def admit_batch(self) -> None:
        """Admit one batch read from every submission stream at once: the one admission point, so every
        job of the batch is counted into the stage it joins before the next is decided, whichever
        stream it came from. A tenant's job ids are scoped to it (``scoped_id``) from here on, so every
        key named after one is the tenant's own."""
        async with self._sources_lock:
            entries = await self.submissions.read(self.cfg.batch, block_ms=1000)
            if entries:
                await self._admit(entries)

    async def _admit(self, entries: list[Entry]) -> None:
        plan = await self.plans.current()
        # The deadline rule as this deployment applies it (--late-policy may override the plan's).
        plan = replace(plan, degrade_late=degrades_late(self.cfg.late_policy, plan.degrade_late))
        # The deadline rule's view of both stages: the heavy one as every stage predicts it (direct
        # routing), both at the admission headroom for admission by predicted wait.
        headroom = self.cfg.admission_headroom
        heavy_now = await self.stages.stage(Role.HEAVY, plan, self.times(Role.HEAVY))
        light = admission.at_headroom(await self.stages.stage(Role.LIGHT, plan, self.times(Role.LIGHT)), headroom)
        heavy = admission.at_headroom(heavy_now, headroom)
        discriminator_ms = self.times("discriminator")(plan.light_batch) / headroom
        outputs: list[tuple[str, bytes]] = []
        errors: list[tuple[str | None, FinalResult | DeadLetter]] = []
        arrival, now_s = now_ms(), time.monotonic()
        jobs: list[tuple[Entry, Source, Job, str]] = []  # (entry, its source, the job, its digest)
        cancels: list[str] = []  # scoped ids a Cancel entry of this batch names
        for entry in entries:
            source = self.sources.get(entry.stream)
            if source is None:  # its tenant was removed since the read: acked below, answered to nobody
                continue
            try:
                message = parse_entry(entry, self.cfg, self.keys, source.tenant)
            except MessageError as exc:
                metrics.ERRORS.labels("router", exc.code).inc()
                # Only a valid id may name a key (result list, reply): anything else is a dead letter.
                if exc.job_id and JOB_ID_RE.match(exc.job_id):
                    reply_to, token = _reply_of(entry, self.keys, source.tenant, exc.job_id)
                    job_id = scoped_id(source.tenant, exc.job_id, source.epoch)
                    errors.append((reply_to, refusal(job_id, exc.code, str(exc), arrival, reply_token=token)))
                else:
                    errors.append(
                        (
                            None,
                            DeadLetter(
                                stream=entry.stream,
                                entry_id=entry.id,
                                error_code=exc.code,
                                error_message=str(exc),
                                raw=(entry.payload or b"")[:4096],
                            ),
                        )
                    )
                continue
            if isinstance(message, Cancel):
                cancels.append(scoped_id(source.tenant, message.job_id, source.epoch))
                continue
            digest = message.digest()
            message.job_id = scoped_id(source.tenant, message.job_id, source.epoch)
            jobs.append((entry, source, message, digest))
        offered = len(jobs)  # demand, as the controller's replay sees it: every valid job read
        ids = [job.job_id for _e, _s, job, _d in jobs]
        raw_claims = await self.r.mget([self.keys.admitted(i) for i in ids + cancels]) if ids or cancels else []
        claims = {i: Claim.parse(raw) for i, raw in zip(ids + cancels, raw_claims)}
        # A job id admitted before: the same entry read again (a router crash before its ack) goes on; the
        # same request again (its submitter retrying a submission whose reply it lost) is already served
        # and is answered once, where the first one is (same reply target); anything else is a duplicate.
        fresh: list[tuple[Entry, Source, Job, str]] = []
        in_batch: dict[str, str] = {}  # job id -> digest of its first entry in this batch
        retried = 0
        for entry, source, job, digest in jobs:
            claim = claims.get(job.job_id)
            if job.job_id in in_batch:  # a second entry of this batch under this id
                claim = Claim("", in_batch[job.job_id])
            else:
                in_batch[job.job_id] = digest
            if claim is None or claim.entry_id == entry.id:
                fresh.append((entry, source, job, digest))
            elif claim.digest == digest:
                retried += 1
            else:
                errors.append((job.reply_to, self._duplicate(job, arrival)))
        cancelled = await cancelled_ids(self.r, self.keys, [job.job_id for _e, _s, job, _d in fresh])
        cancelled |= set(cancels) & {job.job_id for _e, _s, job, _d in fresh}
        # A Cancel sets the job's flag, always with a TTL: as long as the job's markers live for a job
        # admitted earlier, --refused-ttl-s for one not seen yet (cancelled before it is submitted).
        flags = {
            i: self.cfg.result_ttl_s if claims.get(i) is not None else self.cfg.refused_ttl_s
            for i in cancels
            if i not in cancelled
        }
        for _entry, _source, job, _digest in fresh:
            if job.job_id in cancelled:  # cancelled before admission: answered here, never queued
                why = "cancelled by the client before it ran"
                answer = refusal(job.job_id, E_CANCELLED, why, arrival, Status.CANCELLED, reply_token=job.reply_token)
                errors.append((job.reply_to, answer))
        fresh = [item for item in fresh if item[2].job_id not in cancelled]
        for _entry, source, _job, _digest in fresh:
            self.fair.arrived(source.share_key, now_s)
        active = self.fair.active(now_s)
        routes: dict[str, tuple[RoutedJob, Decision]] = {}  # entry id -> the admitted job and its route
        waiting: dict[str, Admitted] = {}  # entry key -> what a job that asked for progress is told
        notices: list[tuple[str, bytes]] = []  # (reply stream, Admitted) of the jobs admitted
        for entry, source, job, _digest in fresh:
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
                image_ref=job.image_ref and source.tenant is None,  # a tenant's ACL reaches no image-store key
                reply_token=job.reply_token,
                negative_prompt=job.negative_prompt,
                progress=job.progress,
            )
            decision = Decision.LIGHT
            if plan.heavy_fraction > 0:
                decision = direct_decision(
                    self._rng.random(),
                    plan.heavy_fraction,
                    degrade_late=plan.degrade_late,
                    on_time=heavy_now.on_time(arrival, routed.deadline_ms),
                )
            over_share = self.fair.over_share(source.share_key, now_s, active)
            verdict = admission.admit(
                plan,
                decision,
                arrival,
                routed.deadline_ms,
                light=light,
                heavy=heavy,
                discriminator_ms=discriminator_ms,
                max_light_backlog=self.cfg.max_light_backlog,
                budget=1.0 - self.cfg.fair_reserve if over_share else 1.0,
            )
            if not verdict.admitted:  # refused before admission: the id stays free for the retry
                metrics.ERRORS.labels("router", E_OVERLOADED).inc()
                reason = f"{verdict.reason} (over this client's fair share)" if over_share else verdict.reason
                answer = refusal(
                    job.job_id,
                    E_OVERLOADED,
                    f"overloaded: {reason}; retry later",
                    arrival,
                    retry_after_ms=verdict.retry_after_ms,
                    reply_token=job.reply_token,
                )
                errors.append((job.reply_to, answer))
                continue
            # Counted now (a duplicate found below included: erring towards refusing), so the
            # rest of this batch sees the queue with this job in it.
            stage = heavy if decision == Decision.HEAVY else light
            if job.progress and job.reply_to:  # where it stands, for whoever shows a waiting user
                joined = Role.HEAVY if decision == Decision.HEAVY else Role.LIGHT
                waiting[entry.id + entry.stream] = Admitted(
                    job_id=client_job_id(job.job_id),
                    queue=joined,
                    ahead=stage.backlog,
                    wait_ms=stage.wait_ms(),
                    reply_token=job.reply_token,
                )
            stage.admit()
            if decision == Decision.HEAVY:
                heavy_now.admit()
            self.fair.admitted(source.share_key, now_s)
            routes[entry.id + entry.stream] = (routed, decision)
        admitted = [item for item in fresh if item[0].id + item[0].stream in routes]
        owners = await self._claim_ids(admitted)
        admitted_ids: list[str] = []
        for entry, _source, job, digest in admitted:
            owner = owners.get(job.job_id)
            if owner is not None and owner.entry_id != entry.id:
                if owner.digest == digest:
                    retried += 1
                else:
                    errors.append((job.reply_to, self._duplicate(job, arrival)))
                continue
            routed, decision = routes[entry.id + entry.stream]
            if decision == Decision.HEAVY:
                routed.routed_by = RoutedBy.DIRECT
                outputs.append((self.keys.heavy_queue, routed.encode()))
            else:
                routed.routed_by = RoutedBy.FALLBACK if decision == Decision.LATE else RoutedBy.CASCADE
                outputs.append((self.keys.light_queue, routed.encode()))
            admitted_ids.append(job.job_id)
            notice = waiting.get(entry.id + entry.stream)
            if notice is not None and job.reply_to:
                notices.append((job.reply_to, notice.encode()))

        def deliver_errors(pipe: aioredis.client.Pipeline) -> None:
            for reply_to, message in errors:
                if isinstance(message, DeadLetter):
                    pipe.xadd(self.keys.dead_letters, {"m": message.encode()}, maxlen=10000, approximate=True)
                else:  # refused before admission: the id stays free for a retry
                    self._deliver(pipe, message, reply_to, admitted=False)
            for job_id in admitted_ids:  # after the refusals above: one in this batch may share the id
                pipe.delete(self.keys.done(job_id))
            for job_id, ttl in flags.items():
                pipe.set(self.keys.cancel(job_id), 1, ex=ttl)
            for reply_to, payload in notices:
                notify(pipe, reply_to, payload, maxlen=self.cfg.reply_maxlen, ttl_s=self.cfg.result_ttl_s)
            if offered:  # last: the replies before these are counted by position
                record_arrivals(pipe, self.keys, arrival, offered)

        replies = await self.submissions.write_and_ack(entries, outputs, deliver_errors)
        _count_replaced(replies[len(outputs) : len(outputs) + len(errors)])
        metrics.PROCESSED.labels("router", "admitted").inc(len(outputs))
        if retried:
            metrics.PROCESSED.labels("router", "retried").inc(retried)

    def _duplicate(self, job: Job, arrival: float) -> FinalResult:
        metrics.ERRORS.labels("router", E_DUPLICATE).inc()
        message = (
            f"a different job with this id was admitted in the last {self.cfg.result_ttl_s} s (in flight or "
            "answered); use a new id"
        )
        return refusal(job.job_id, E_DUPLICATE, message, arrival, reply_token=job.reply_token)

    async def _claim_ids(self, jobs: list[tuple[Entry, Source, Job, str]]) -> dict[str, Claim]:
        """Mark each job's id admitted under its entry; returns the claims that were there before (an id
        admitted under another entry: a duplicate or a retry). The marker names the admitted entry, so the
        same entry read again after a router crash (before its ack) is admitted again, not refused."""
        if not jobs:
            return {}
        async with self.r.pipeline(transaction=False) as pipe:
            for entry, _source, job, digest in jobs:
                marker = Claim(entry.id, digest).encode()
                pipe.set(self.keys.admitted(job.job_id), marker, nx=True, get=True, ex=self.cfg.result_ttl_s)
            owners = await pipe.execute()
        return {
            job.job_id: claim
            for (_entry, _source, job, _digest), owner in zip(jobs, owners)
            if (claim := Claim.parse(owner)) is not None
        }

    # ---------- delivery ----------
    def _deliver(
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
            if finished - c.arrival_ms > self.cfg.result_ttl_s * 1000:
                # Admitted longer ago than the done marker lives (a worker stalled past --result-ttl-s):
                # the job may have been answered already, and its id may be in use again. Never answered
                # twice: dropped and counted instead.
                metrics.ERRORS.labels("router", "stale_completion").inc()
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
                        light_reason=c.light_reason,
                        latency_ms=latency,
                        slo_met=slo_met,
                        error_code=c.error_code,
                        error_message=c.error_message,
                        finished_ms=finished,
                        image_ref=c.image_ref if c.by_ref else None,
                        reply_token=c.reply_token,
                    ),
                )
            )
        # The image goes out inline unless the job asked for a reference.
        failed = await inline_images(self.blobs, [(r, c.image_ref) for c, r in results if c.image_ref and not c.by_ref])
        metrics.ERRORS.labels("router", E_INTERNAL).inc(failed)

        def deliver(pipe: aioredis.client.Pipeline) -> None:
            for c, result in results:
                self._deliver(pipe, result, c.reply_to)
            for dead in bad_ids:
                pipe.xadd(self.keys.dead_letters, {"m": dead.encode()}, maxlen=10000, approximate=True)

        replies = await self.completions.write_and_ack([e.id for e in entries], [], deliver)
        _count_replaced(replies[: len(results)])
        # Delivered: the stored images the client holds no reference to are done with.
        await self.blobs.discard(
            [key for (c, _r), fresh in zip(results, replies) if fresh for key in c.blobs if key not in c.kept_blobs()]
        )
        outcomes = {"slo_hit": 0, "slo_miss": 0}
        for (c, result), fresh in zip(results, replies):
            if not fresh:
                metrics.DUPLICATES.inc()
                continue
            if fresh == TENANT_GONE:
                metrics.ERRORS.labels("router", "tenant_gone").inc()
                continue
            if result.status == Status.CANCELLED:  # not served, so neither an SLO hit nor a miss
                metrics.PROCESSED.labels("router", "cancelled").inc()
                continue
            metrics.PROCESSED.labels("router", "delivered").inc()
            if result.status == Status.OK and result.latency_ms is not None:  # always set on this path
                metrics.E2E_LATENCY.labels(result.answered_by or "").observe(result.latency_ms / 1000)
            if result.light_reason is not None:
                metrics.LIGHT_ANSWERS.labels(result.light_reason).inc()
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
        """Measure every queue often (the queue-depth metrics) and cut tenant streams to their cap; trim
        processed entries less often."""
        for attr, group in PIPELINE_GROUPS:
            metrics.QUEUE_DEPTH.labels(attr).set(await backlog(self.r, getattr(self.keys, attr), group))
        await self.blobs.maybe_sweep()  # S3: what outlived its TTL (Redis expires its own)
        tenant_streams = [s.stream for s in self.sources.values() if s.tenant is not None]
        if tenant_streams:
            async with self.r.pipeline(transaction=False) as pipe:
                for stream in tenant_streams:
                    pipe.xtrim(stream, maxlen=self.cfg.tenant_max_queued, approximate=False)
                cut = await pipe.execute()
            for stream, n in zip(tenant_streams, cut):
                if n:
                    metrics.ERRORS.labels("router", "tenant_stream_cut").inc(n)
                    self.svc.log.warning("tenant stream cut to its cap", extra={"stream": stream, "dropped": n})
        if time.monotonic() >= self._next_trim:
            self._next_trim = time.monotonic() + self.cfg.trim_interval_s
            for attr, _group in PIPELINE_GROUPS:
                await trim_processed(self.r, getattr(self.keys, attr))
            for stream in tenant_streams:
                await trim_processed(self.r, stream)
        await self.svc.sleep(QUEUE_POLL_S)

    # ---------- tenants ----------
    async def watch_tenants(self) -> None:
        """Read the tenants registered since the last look (and their epochs); drop removed tenants' streams."""
        wanted = {
            self.keys.tenant_in(name): Source(self.keys.tenant_in(name), name, epoch)
            for name, epoch in (await tenant_epochs(self.r, self.keys)).items()
        }
        ready: dict[str, Source] = {}
        for stream, source in sorted(wanted.items()):
            known = self.sources.get(stream)
            if known is not None:
                ready[stream] = source
                continue
            try:
                await self.submissions.ensure_group(stream)
            except ResponseError as exc:  # e.g. a key of another type under that name: the others still start
                self.svc.log.error("cannot serve tenant", extra={"tenant": source.tenant, "error": str(exc)[:200]})
                continue
            ready[stream] = source
            self.svc.log.info("serving tenant", extra={"tenant": source.tenant, "epoch": source.epoch})
        gone = [s for s in self.sources.values() if s.tenant is not None and s.stream not in wanted]
        async with self._sources_lock:
            self.sources = {self.keys.jobs: self.sources[self.keys.jobs], **ready}
            self.submissions.set_streams(list(self.sources))
        for source in gone:
            # Its last read may have recreated the stream (a group recreated after its deletion).
            await self.r.eval(FORGET_TENANT, 2, self.keys.tenants, source.stream, source.tenant or "")
            self.svc.log.info("tenant removed", extra={"tenant": source.tenant})
        await self.svc.sleep(TENANT_POLL_S)

    async def guard_connections(self) -> None:
        """Close a tenant's Redis connections beyond ``--tenant-max-connections``, newest first: Redis has no
        per-user connection limit, and one tenant holding every free connection would lock out every new
        client, services included. Needs ``CLIENT LIST``/``CLIENT KILL``; without them it says so once."""
        if self._guard_connections:
            tenants = {s.tenant for s in self.sources.values() if s.tenant is not None}
            try:
                listing = await self.r.execute_command("CLIENT", "LIST", "TYPE", "normal")  # type: ignore[no-untyped-call]
                excess = over_connection_cap(_s(listing), tenants, self.cfg.tenant_max_connections)
                if excess:
                    async with self.r.pipeline(transaction=False) as pipe:
                        for client_id in excess:
                            pipe.execute_command("CLIENT", "KILL", "ID", client_id)
                        await pipe.execute(raise_on_error=False)
                    metrics.ERRORS.labels("router", "tenant_connections_closed").inc(len(excess))
                    self.svc.log.warning("closed tenant connections over the cap", extra={"closed": len(excess)})
            except ResponseError as exc:
                self._guard_connections = False
                self.svc.log.error(
                    "cannot enforce --tenant-max-connections: this Redis user needs +client|list +client|kill",
                    extra={"error": str(exc)[:200]},
                )
        await self.svc.sleep(CONNECTION_POLL_S)


def over_connection_cap(listing: str, tenants: set[str], cap: int) -> list[str]:
    """Ids of the connections (``CLIENT LIST`` output) that put a tenant user over ``cap``, newest first."""
    held: dict[str, list[int]] = {}
    for line in listing.splitlines():
        fields = dict(part.split("=", 1) for part in line.split() if "=" in part)
        if fields.get("user") in tenants and fields.get("id", "").isdigit():
            held.setdefault(fields["user"], []).append(int(fields["id"]))
    return [str(i) for ids in held.values() for i in sorted(ids, reverse=True)[: max(0, len(ids) - cap)]]


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _count_replaced(replies: list[Any]) -> None:
    """Count the answers DELIVER_ONCE delivered by replacing a key of the wrong type."""
    replaced = sum(1 for reply in replies if reply == REPLACED)
    if replaced:
        metrics.ERRORS.labels("router", "reply_key_replaced").inc(replaced)


def _reply_of(entry: Entry, keys: Keys, tenant: str | None, job_id: str) -> tuple[str | None, str | None]:
    """Where to answer an entry that failed validation, and its reply token: its reply stream when that
    is well-formed, else the result list (shared stream) or the tenant's default reply stream."""
    fallback = None if tenant is None else default_reply(keys, tenant, job_id)
    prefix = reply_prefix(keys, tenant)
    try:
        body = (
            unpack(entry.payload)
            if entry.payload is not None
            else {k.decode(): v.decode() for k, v in entry.fields.items()}
        )
    except (MessageError, UnicodeDecodeError):
        return fallback, None
    reply_to, token = body.get("reply_to"), body.get("reply_token")
    valid = isinstance(reply_to, str) and reply_to.startswith(prefix) and len(reply_to) <= 200
    return reply_to if valid else fallback, token if isinstance(token, str) and len(token) <= 64 else None


async def serve(svc: Service[RouterConfig]) -> None:
    router = Router(svc)
    svc.ready()
    await asyncio.gather(
        run_forever("admit", router.admit_batch, svc.stop),
        run_forever("deliver", router.deliver_batch, svc.stop),
        run_forever("housekeeping", router.housekeeping, svc.stop),
        run_forever("tenants", router.watch_tenants, svc.stop),
        run_forever("connections", router.guard_connections, svc.stop),
    )


def main(argv: list[str] | None = None) -> None:
    run("router", RouterConfig.from_args(argv, prog="diffserve router"), serve)


if __name__ == "__main__":
    main()
