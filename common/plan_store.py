"""What the controller and the data plane share through Redis: where the current plan lives (one key,
msgpack ``Plan``, announced on a channel), the stages as the deadline rule sees them, the router's
arrival histogram and the discriminator's recent confidences (what the controller's replay runs on).

Services keep using the last plan they read when the controller is gone; until a plan exists
they use ``default`` (common/planner.default_plan: the cascade's threshold for low demand)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import redis.asyncio as aioredis

from common.clock import CLOCK
from common.config import Keys
from common.messages import MessageError, Plan, Role
from common.replay import ARRIVAL_BUCKET_MS, ArrivalHistory
from common.routing import Stage, joining_ms
from common.streams import backlog


async def load_plan(r: aioredis.Redis, keys: Keys) -> Plan | None:
    raw = await r.get(keys.plan)
    if not isinstance(raw, bytes):
        return None
    try:
        return Plan.decode(raw)
    except MessageError:
        return None


async def store_plan(r: aioredis.Redis, keys: Keys, plan: Plan) -> None:
    await r.set(keys.plan, plan.encode())


# Every service re-reads the plan at most this often (wall clock); the simulator models the same delay.
PLAN_REFRESH_S = 0.1


class PlanWatcher:
    """The plan in force, re-read from Redis at most every ``refresh_s``."""

    def __init__(self, r: aioredis.Redis, keys: Keys, refresh_s: float = PLAN_REFRESH_S, default: Plan | None = None):
        self.r, self.keys, self.refresh_s = r, keys, refresh_s
        self.plan = default or Plan()
        self._read_at = 0.0

    async def current(self) -> Plan:
        now = time.monotonic()
        if now - self._read_at >= self.refresh_s:
            self._read_at = now
            plan = await load_plan(self.r, self.keys)
            if plan is not None:  # the stored plan wins, even after a controller restart reset versions
                self.plan = plan
        return self.plan


@dataclass(frozen=True, kw_only=True)
class WorkerRecord:
    """What a live worker's heartbeat says about it (its ``worker_info`` hash)."""

    worker_id: str
    role: str  # as it reports it ("" when its info hash is gone)
    switch_s: float  # its last measured role switch (0: none yet)
    busy_until_ms: float = 0.0  # when the batch it runs or fills last ends, on the deployment's clock (0: none yet)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def live_ids(r: aioredis.Redis, keys: Keys, alive_s: float) -> set[str]:
    """The workers whose heartbeat is younger than ``alive_s`` (WorkerRegistrySettings.worker_timeout_s):
    the one worker-alive rule, for the controller, the router, the discriminator and the gateway."""
    cutoff = CLOCK.now_ms() - alive_s * 1000.0
    return {_text(m) for m in await r.zrangebyscore(keys.workers, cutoff, "+inf")}


async def live_workers(r: aioredis.Redis, keys: Keys, alive_s: float) -> list[WorkerRecord]:
    """Every live worker (:func:`live_ids`) with what its info hash says, by id."""
    ids = sorted(await live_ids(r, keys, alive_s))
    if not ids:
        return []
    async with r.pipeline(transaction=False) as pipe:
        for w in ids:
            pipe.hmget(keys.worker_info(w), ["role", "switch_s", "busy_until_ms"])
        infos = await pipe.execute()
    return [
        WorkerRecord(
            worker_id=w,
            role=_text(role) if role is not None else "",
            switch_s=_number(switch),
            busy_until_ms=_number(busy_until),
        )
        for w, (role, switch, busy_until) in zip(ids, infos, strict=True)
    ]


def _number(value: object) -> float:
    """A number a worker wrote to its info hash (0 when missing or not a number)."""
    try:
        return float(_text(value)) if value is not None else 0.0
    except ValueError:
        return 0.0


async def live_roles(r: aioredis.Redis, keys: Keys, alive_s: float) -> dict[str, str]:
    """worker id -> the role it reports, for every live worker."""
    return {w.worker_id: w.role for w in await live_workers(r, keys, alive_s)}


class StageWatcher:
    """A stage as the deadline rule sees it (common/routing.Stage): live workers of its role
    (re-counted at most every ``refresh_s``) and its queue's backlog (read on every call, since
    it is what changes between batches)."""

    def __init__(self, r: aioredis.Redis, keys: Keys, alive_s: float, refresh_s: float = 0.1):
        self.r, self.keys, self.alive_s, self.refresh_s = r, keys, alive_s, refresh_s
        self.records: list[WorkerRecord] = []
        self._counted_at = -1e9

    async def stage(self, role: Role, plan: Plan, times: Callable[[int], float], *, joining: bool = False) -> Stage:
        """``times``: batch size -> ms on this stage (common/routing.batch_times); ``joining``: with the workers
        the plan moves into the stage (common/routing.joining_ms: admission counts them)."""
        now = time.monotonic()
        if now - self._counted_at >= self.refresh_s:
            self._counted_at = now
            self.records = await live_workers(self.r, self.keys, self.alive_s)
        batch = max(1, plan.light_batch if role == "light" else plan.heavy_batch)
        workers = ((w.worker_id, w.role, w.switch_s, w.busy_until_ms) for w in self.records)
        return Stage(
            workers=sum(w.role == role for w in self.records),
            batch=batch,
            batch_ms=times(batch),
            backlog=await backlog(self.r, self.keys.queue_for(role), "workers"),
            times=times,
            joining_ms=joining_ms(role, plan.roles, workers, CLOCK.now_ms()) if joining else (),
        )


# The arrival histogram (common/replay.ArrivalHistory), one hash per minute of the router's clock.
BUCKETS_PER_PAGE = 600
ARRIVAL_PAGE_TTL_S = 900


def record_arrivals(pipe: aioredis.client.Pipeline, keys: Keys, at_ms: float, n: int) -> None:
    """Count ``n`` jobs read at ``at_ms`` (queued on ``pipe``, the router's admission transaction)."""
    bucket = int(at_ms // ARRIVAL_BUCKET_MS)
    page = keys.arrivals(bucket // BUCKETS_PER_PAGE)
    pipe.hincrby(page, str(bucket), n)
    pipe.expire(page, ARRIVAL_PAGE_TTL_S)


async def load_arrivals(r: aioredis.Redis, keys: Keys, since_ms: float, until_ms: float) -> ArrivalHistory:
    """The histogram's buckets between ``since_ms`` and ``until_ms``."""
    first, last = int(since_ms // ARRIVAL_BUCKET_MS), int(until_ms // ARRIVAL_BUCKET_MS)
    pages = range(first // BUCKETS_PER_PAGE, last // BUCKETS_PER_PAGE + 1)
    async with r.pipeline(transaction=False) as pipe:
        for page in pages:
            pipe.hgetall(keys.arrivals(page))
        replies = await pipe.execute()
    history = ArrivalHistory(bucket_ms=ARRIVAL_BUCKET_MS)
    for reply in replies:
        for field, count in (reply or {}).items():
            bucket = int(field)
            if first <= bucket <= last:
                history.counts[bucket] = int(count)
    return history


async def load_confidences(r: aioredis.Redis, keys: Keys) -> list[float]:
    """The discriminator's latest scores (it keeps RECENT_CONFIDENCES of them)."""
    return [float(c) for c in await r.lrange(keys.confidences, 0, -1)]
