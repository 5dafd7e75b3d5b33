"""The router process: admission, delivery, housekeeping and the tenants' streams, each its own loop."""

from __future__ import annotations

import asyncio
import time

from common import metrics
from common.blobs import open_store
from common.service import Service, run
from common.streams import PIPELINE_GROUPS, SubmissionReader, backlog, run_forever, trim_processed
from common.tenants import ROUTER_GROUP
from services.router.admission import Admission
from services.router.config import RouterConfig
from services.router.delivery import Delivery
from services.router.sources import Sources
from services.router.tenants import TenantWatcher, trim_tenant_streams

QUEUE_POLL_S = 0.5


class Router:
    def __init__(self, svc: Service[RouterConfig]):
        self.svc, self.cfg, self.keys, self.r = svc, svc.config, svc.keys, svc.redis
        # Every submission stream (the shared one and each tenant's) through one reader: one read is at
        # most batch entries of at most max_entry_bytes (bigger ones come back as stubs), and the
        # connections it needs do not grow with the number of tenants.
        reader = SubmissionReader(
            self.r,
            ROUTER_GROUP,
            self.cfg.instance_id,
            max_entry_bytes=self.cfg.max_entry_bytes,
            reclaim_idle_ms=self.cfg.reclaim_idle_ms,
            per_stream=self.cfg.per_stream_read,
        )
        self.sources = Sources(reader, self.keys.jobs)
        self.blobs = open_store(self.cfg, self.r)
        self.delivery = Delivery(self.cfg, self.keys, self.r, self.blobs)
        self.admission = Admission(svc, self.sources, self.delivery)
        self.tenants = TenantWatcher(svc, self.sources)
        self._next_trim = 0.0

    async def housekeeping(self) -> None:
        """Measure every queue often (the queue-depth metrics) and cut tenant streams to their cap; trim
        processed entries less often."""
        for attr, group in PIPELINE_GROUPS:
            metrics.QUEUE_DEPTH.labels(attr).set(await backlog(self.r, getattr(self.keys, attr), group))
        await self.blobs.maybe_sweep()  # S3: what outlived its TTL (Redis expires its own)
        tenant_streams = [s.stream for s in self.sources.tenants()]
        await trim_tenant_streams(self.r, self.svc.log, tenant_streams, self.cfg.tenant_max_queued)
        if time.monotonic() >= self._next_trim:
            self._next_trim = time.monotonic() + self.cfg.trim_interval_s
            for attr, _group in PIPELINE_GROUPS:
                await trim_processed(self.r, getattr(self.keys, attr))
            for stream in tenant_streams:
                await trim_processed(self.r, stream)
        await self.svc.sleep(QUEUE_POLL_S)


async def serve(svc: Service[RouterConfig]) -> None:
    router = Router(svc)
    svc.ready()
    await asyncio.gather(
        run_forever("admit", router.admission.admit_batch, svc.stop),
        run_forever("deliver", router.delivery.deliver_batch, svc.stop),
        run_forever("housekeeping", router.housekeeping, svc.stop),
        run_forever("tenants", router.tenants.watch_tenants, svc.stop),
        run_forever("connections", router.tenants.guard_connections, svc.stop),
    )


def main(argv: list[str] | None = None) -> None:
    run("router", RouterConfig.from_args(argv, prog="diffserve router"), serve)
