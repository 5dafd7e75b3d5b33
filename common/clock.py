"""The deployment's one clock: Redis's ``TIME``.

Deadlines are stamped by the router and checked by the discriminator and the workers; heartbeats are
stamped by each worker and checked by the controller, the router and the gateway. Those are different
hosts, so their wall clocks must not be compared with each other: every service reads Redis's clock
instead (one ``TIME`` per sync, every ``SYNC_S``) and follows it between syncs with its own monotonic
clock, which a wall-clock step (NTP, an operator) does not move. What is left of the error is half a
round trip plus the monotonic drift over one sync interval: well under a millisecond on a LAN.

Before the first sync (or where ``TIME`` is refused) the local wall clock is used, as before.
``offset_ms`` (this host's wall clock minus Redis's) is exported as ``diffserve_clock_offset_seconds``
and put in each worker's heartbeat, so a host whose clock is off is visible, though harmless.
"""

from __future__ import annotations

import logging
import time

import redis.asyncio as aioredis
from redis.exceptions import NoPermissionError

from common import metrics

log = logging.getLogger(__name__)

SYNC_S = 5.0  # how often a service re-reads Redis's clock
MAX_RTT_S = 0.25  # a TIME slower than this says little about the clock: keep the last sync


class RedisClock:
    def __init__(self) -> None:
        self._base_ms: float | None = None  # Redis's clock at the last sync...
        self._base_mono = 0.0  # ...and this host's monotonic clock at that moment
        self.offset_ms = 0.0  # this host's wall clock minus Redis's, at the last sync
        self.refused = False  # TIME is not allowed to this user: the local clock it is

    def now_ms(self) -> float:
        if self._base_ms is None:
            return time.time() * 1000.0
        return self._base_ms + (time.monotonic() - self._base_mono) * 1000.0

    async def sync(self, r: aioredis.Redis) -> None:
        """Read Redis's clock once (transient errors are the caller's: it keeps the last sync)."""
        if self.refused:
            return
        before, wall = time.monotonic(), time.time()
        try:
            seconds, micros = await r.time()
        except NoPermissionError:
            self.refused = True
            log.warning("TIME refused to this Redis user: deadlines and heartbeats use the local clock")
            return
        after = time.monotonic()
        if after - before > MAX_RTT_S:
            return
        redis_ms = seconds * 1000.0 + micros / 1000.0
        self._base_ms, self._base_mono = redis_ms, (before + after) / 2
        self.offset_ms = (wall + (after - before) / 2) * 1000.0 - redis_ms
        metrics.CLOCK_OFFSET.set(self.offset_ms / 1000.0)


CLOCK = RedisClock()  # one per process: every service's now_ms() (common.service) reads it
