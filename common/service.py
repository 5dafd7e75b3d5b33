"""What every service process does around its own loop: logs, metrics, uvloop,
a Redis client, the pipeline's consumer groups, and a clean stop on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import uvloop

from common import logs, metrics
from common.config import Keys, ServiceConfig
from common.streams import TRANSIENT_ERRORS, Backoff, connect, ensure_pipeline_groups


def now_ms() -> float:
    return time.time() * 1000.0


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
                return
            except TRANSIENT_ERRORS as exc:
                delay = await backoff.wait()
                self.log.warning("waiting for redis", extra={"error": str(exc)[:200], "retry_in_s": round(delay, 2)})

    async def sleep(self, seconds: float) -> None:
        """Sleep, but wake at once when the service is asked to stop."""
        try:
            await asyncio.wait_for(self.stop.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    def ready(self) -> None:
        metrics.READY.labels(self.name).set(1)
        self.log.info("ready", extra={"instance": self.config.instance_id})


def run(name: str, config: C, serve: Callable[[Service[C]], Awaitable[None]]) -> None:
    logs.setup(name, config.log_level)
    metrics.serve(name, config.metrics_port, config.metrics_addr)

    async def main() -> None:
        service = Service(name, config)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, service.stop.set)
        try:
            await service.wait_for_redis()
            if not service.stop.is_set():
                await serve(service)
        finally:
            await service.redis.aclose()
            service.log.info("stopped")

    uvloop.run(main())
