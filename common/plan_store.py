"""Where the current plan lives: one Redis key (msgpack ``Plan``), announced on a channel.

Services keep using the last plan they read when the controller is gone; without any
plan they use the defaults of ``Plan`` (threshold 0.5, cascade policy)."""

from __future__ import annotations

import time

import redis.asyncio as aioredis

from common.config import Keys
from common.messages import MessageError, Plan


async def load_plan(r: aioredis.Redis, keys: Keys) -> Plan | None:
    raw = await r.get(keys.plan)
    if raw is None:
        return None
    try:
        return Plan.decode(raw)
    except MessageError:
        return None


async def store_plan(r: aioredis.Redis, keys: Keys, plan: Plan) -> None:
    payload = plan.encode()
    async with r.pipeline(transaction=True) as pipe:
        pipe.set(keys.plan, payload)
        pipe.publish(keys.plan_channel, plan.version)
        await pipe.execute()


class PlanWatcher:
    """The plan in force, re-read from Redis at most every ``refresh_s``."""

    def __init__(self, r: aioredis.Redis, keys: Keys, refresh_s: float = 0.5, default: Plan | None = None):
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
