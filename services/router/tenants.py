"""The router's side of tenants: their submission streams served from the moment they are added (and
forgotten when removed), and their Redis connections held to ``--tenant-max-connections``."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from common import metrics
from common.lua import script
from common.service import Service
from common.tenants import tenant_epochs
from services.router.config import RouterConfig
from services.router.sources import Source, Sources

FORGET_TENANT = script("services", "router/forget_tenant.lua")
TENANT_POLL_S = 2.0  # how often the router looks for tenants added or removed
CONNECTION_POLL_S = 0.5  # how often it counts tenants' connections


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def over_connection_cap(listing: str, tenants: set[str], cap: int) -> list[str]:
    """Ids of the connections (``CLIENT LIST`` output) that put a tenant user over ``cap``, newest first."""
    held: dict[str, list[int]] = {}
    for line in listing.splitlines():
        fields = dict(part.split("=", 1) for part in line.split() if "=" in part)
        if fields.get("user") in tenants and fields.get("id", "").isdigit():
            held.setdefault(fields["user"], []).append(int(fields["id"]))
    return [str(i) for ids in held.values() for i in sorted(ids, reverse=True)[: max(0, len(ids) - cap)]]


class TenantWatcher:
    def __init__(self, svc: Service[RouterConfig], sources: Sources):
        self.svc, self.cfg, self.keys, self.r = svc, svc.config, svc.keys, svc.redis
        self.sources = sources
        self._guard_connections = self.cfg.tenant_max_connections > 0

    async def watch_tenants(self) -> None:
        """Read the tenants registered since the last look (and their epochs); drop removed tenants' streams."""
        wanted = {
            self.keys.tenant_in(name): Source(self.keys.tenant_in(name), name, epoch)
            for name, epoch in (await tenant_epochs(self.r, self.keys)).items()
        }
        ready: dict[str, Source] = {}
        for stream, source in sorted(wanted.items()):
            if self.sources.get(stream) is None:
                try:
                    await self.sources.reader.ensure_group(stream)
                except ResponseError as exc:  # e.g. a key of another type under that name: the others still start
                    self.svc.log.error("cannot serve tenant", extra={"tenant": source.tenant, "error": str(exc)[:200]})
                    continue
                self.svc.log.info("serving tenant", extra={"tenant": source.tenant, "epoch": source.epoch})
            ready[stream] = source
        gone = [s for s in self.sources.tenants() if s.stream not in wanted]
        await self.sources.set_tenants(ready)
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
            try:
                await self._close_excess({s.tenant for s in self.sources.tenants() if s.tenant is not None})
            except ResponseError as exc:
                self._guard_connections = False
                self.svc.log.error(
                    "cannot enforce --tenant-max-connections: this Redis user needs +client|list +client|kill",
                    extra={"error": str(exc)[:200]},
                )
        await self.svc.sleep(CONNECTION_POLL_S)

    async def _close_excess(self, tenants: set[str]) -> None:
        listing = await self.r.execute_command("CLIENT", "LIST", "TYPE", "normal")  # type: ignore[no-untyped-call]
        excess = over_connection_cap(_s(listing), tenants, self.cfg.tenant_max_connections)
        if excess:
            async with self.r.pipeline(transaction=False) as pipe:
                for client_id in excess:
                    pipe.execute_command("CLIENT", "KILL", "ID", client_id)
                await pipe.execute(raise_on_error=False)
            metrics.ERRORS.labels("router", "tenant_connections_closed").inc(len(excess))
            self.svc.log.warning("closed tenant connections over the cap", extra={"closed": len(excess)})


async def trim_tenant_streams(r: aioredis.Redis, log: Any, streams: list[str], cap: int) -> None:
    """Cut each tenant's submission stream to its newest ``cap`` entries (the older ones are never read)."""
    if not streams:
        return
    async with r.pipeline(transaction=False) as pipe:
        for stream in streams:
            pipe.xtrim(stream, maxlen=cap, approximate=False)
        cut = await pipe.execute()
    for stream, n in zip(streams, cut, strict=True):
        if n:
            metrics.ERRORS.labels("router", "tenant_stream_cut").inc(n)
            log.warning("tenant stream cut to its cap", extra={"stream": stream, "dropped": n})
