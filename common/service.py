"""What every service process does around its own loop: logs, metrics, uvloop,
a Redis client, the pipeline's consumer groups, and a clean stop on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import uvloop

from common import logs, metrics
from common.clock import CLOCK, SYNC_S
from common.config import Keys, ServiceConfig
from common.streams import TRANSIENT_ERRORS, Backoff, connect, ensure_pipeline_groups

# After a stop signal, how long a service may take to wind down before what it awaits is cancelled
# (a hung Redis would otherwise hold it for socket timeout x retries, ~40 s); a second after that,
# the process exits whatever it was doing. Entries it held stay pending and are reclaimed.
STOP_GRACE_S = 5.0


def now_ms() -> float:
    """The deployment's clock (Redis's TIME, common/clock.py): what deadlines and heartbeats use."""
    return CLOCK.now_ms()


C = TypeVar("C", bound=ServiceConfig)


class Service(Generic[C]):
    """Context handed to a service's ``serve`` coroutine; ``config`` is that service's own config class."""

    def __init__(self, name: str, config: C):
        self.name, self.config = name, config
        self.keys = Keys(config.namespace)
        self.stop = asyncio.Event()
        self.redis = connect(config, client_name=f"{name}:{config.instance_id}")
        self.log = logging.getLogger(name)

    async def wait_for_redis(self) -> None:
        """Retry Redis on start instead of crashing (compose may start us first)."""
        backoff = Backoff()
        while not self.stop.is_set():
            try:
                await self.redis.ping()
                await ensure_pipeline_groups(self.redis, self.keys)
                await CLOCK.sync(self.redis)
                return
            except TRANSIENT_ERRORS as exc:
                delay = await backoff.wait()
                self.log.warning("waiting for redis", extra={"error": str(exc)[:200], "retry_in_s": round(delay, 2)})

    async def sleep(self, seconds: float) -> None:
        """Sleep, but wake at once when the service is asked to stop."""
        try:
            await asyncio.wait_for(self.stop.wait(), seconds)
        except TimeoutError:
            pass

    async def follow_clock(self) -> None:
        """Re-read Redis's clock every ``SYNC_S`` until stopped; an outage keeps the last reading."""
        while not self.stop.is_set():
            await self.sleep(SYNC_S)
            with contextlib.suppress(*TRANSIENT_ERRORS):
                await CLOCK.sync(self.redis)

    def ready(self) -> None:
        metrics.READY.labels(self.name).set(1)
        self.log.info("ready", extra={"instance": self.config.instance_id})


def run(
    name: str, config: C, serve: Callable[[Service[C]], Awaitable[None]], *, stop_grace_s: float = STOP_GRACE_S
) -> None:
    """Run ``serve`` as service ``name`` until SIGTERM/SIGINT; ``stop_grace_s``: how long it may then take to
    wind down before what it awaits is cancelled (a service that drains open requests asks for more)."""
    logs.setup(name, config.log_level).info("configuration", extra={"config": config.effective()})
    metrics.serve(name, config.metrics_port, config.metrics_addr)

    async def main() -> None:
        service = Service(name, config)
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None

        def give_up() -> None:
            service.log.error("exiting without a clean stop")
            os._exit(1)

        def overdue() -> None:
            service.log.warning("not stopped after the grace period (Redis not answering?): cancelling")
            task.cancel()
            loop.call_later(1.0, give_up)

        def on_signal() -> None:
            if not service.stop.is_set():
                service.stop.set()
                loop.call_later(stop_grace_s, overdue)

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        clock: asyncio.Task[None] | None = None
        try:
            await service.wait_for_redis()
            if not service.stop.is_set():
                clock = asyncio.create_task(service.follow_clock())
                await serve(service)
        finally:
            if clock is not None:
                clock.cancel()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(service.redis.aclose(), 1.0)
            service.log.info("stopped")

    try:
        uvloop.run(main())
    except asyncio.CancelledError:  # cut short by overdue(): not a clean stop
        raise SystemExit(1) from None
