"""Tenants: named Redis-direct clients whose keys nobody else can touch.

A tenant ``NAME`` is an ACL user ``NAME`` that may only XADD to its own submission stream
(``<ns>:in:NAME``, write-only: jobs, and cancel requests for them) and XREAD its own reply streams
(``<ns>:out:NAME:*``, read-only); it has no command on any shared key.  The router reads every tenant's
stream, scopes the tenant's job ids (``NAME.<epoch>/<job_id>`` inside the pipeline: '/' is not allowed in
a submitted id, so no one can name another's) and answers only under the tenant's ``out`` prefix.  The
epoch is given when the name is added: a name removed and added again is a new tenant, and nothing of
the old one (markers, cancel flags, answers still in flight) reaches it.

``diffserve tenant add|remove|list`` (an admin Redis user: ACL SETUSER needs it) manages them.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import secrets
import sys

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from common.config import Keys, RedisSettings

TENANT_RE = re.compile(r"^[a-z0-9_-]{1,32}$")
ROUTER_GROUP = "router"  # the router's consumer group on every submission stream


def scoped_id(tenant: str | None, job_id: str, epoch: int = 0) -> str:
    """The pipeline's id of a job: its own id on the shared stream, ``tenant.epoch/job_id`` for a tenant's
    (``tenant/job_id`` for a tenant added before epochs, epoch 0)."""
    if tenant is None:
        return job_id
    return f"{tenant}.{epoch}/{job_id}" if epoch else f"{tenant}/{job_id}"


def tenant_of(job_id: str) -> tuple[str, int] | None:
    """(tenant, epoch) of a scoped id; None for a job of the shared stream."""
    scope, slash, _rest = job_id.partition("/")
    if not slash:
        return None
    name, _dot, epoch = scope.partition(".")
    return name, int(epoch or 0)


def client_job_id(job_id: str) -> str:
    """The id the submitter used (what it sees in its answers)."""
    return job_id.rpartition("/")[2]


def default_reply(keys: Keys, tenant: str, job_id: str) -> str:
    """Where a tenant's job without ``reply_to`` is answered (a stream: the tenant may only read)."""
    return f"{keys.tenant_out(tenant)}job:{job_id}"


def acl_rules(keys: Keys, tenant: str, password: str) -> list[str]:
    """The whole ACL of a tenant: ``reset`` first, so re-adding a tenant replaces its password and rules."""
    return [
        "reset",
        "on",
        f">{password}",
        f"%W~{keys.tenant_in(tenant)}",
        f"%R~{keys.tenant_out(tenant)}*",
        "+xadd",
        "+xread",
        "+ping",
        "+client|setname",
    ]


async def tenant_names(r: aioredis.Redis, keys: Keys) -> set[str]:
    """Registered tenants; a malformed name (someone SADDed it by hand) is ignored."""
    return {name for raw in await r.smembers(keys.tenants) if TENANT_RE.match(name := _s(raw))}


async def tenant_epochs(r: aioredis.Redis, keys: Keys) -> dict[str, int]:
    """Registered tenants and their epochs (0: added before epochs existed)."""
    names = await tenant_names(r, keys)
    epochs = {_s(k): _s(v) for k, v in (await r.hgetall(keys.tenant_epochs)).items()}
    return {name: int(epochs[name]) if epochs.get(name, "").isdigit() else 0 for name in names}


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def check_name(name: str) -> str:
    if not TENANT_RE.match(name):
        raise ValueError(f"tenant name {name!r} must be 1-32 characters of a-z 0-9 _ -")
    return name


async def add(r: aioredis.Redis, keys: Keys, tenant: str, password: str | None = None) -> str:
    """Create (or re-create, with a new password) a tenant; returns its password."""
    check_name(tenant)
    if await r.acl_getuser(tenant) and not await r.sismember(keys.tenants, tenant):
        raise ValueError(f"ACL user {tenant!r} exists and is not a tenant: choose another name")
    password = password or secrets.token_urlsafe(24)
    # Raw rules: redis-py's acl_setuser cannot say %W~/%R~ (read- or write-only key patterns).
    await r.execute_command("ACL", "SETUSER", tenant, *acl_rules(keys, tenant, password))  # type: ignore[no-untyped-call]
    try:  # the stream and the router's group exist before the tenant's first XADD
        await r.xgroup_create(keys.tenant_in(tenant), ROUTER_GROUP, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise
    if not await r.sismember(keys.tenants, tenant):  # new (or removed before): a new epoch
        epoch = await r.incr(keys.tenant_epoch_counter)
        async with r.pipeline(transaction=True) as pipe:
            pipe.hset(keys.tenant_epochs, tenant, epoch)
            pipe.sadd(keys.tenants, tenant)
            await pipe.execute()
    return password


async def remove(r: aioredis.Redis, keys: Keys, tenant: str) -> None:
    """Delete the user (Redis closes its connections), stop the router serving it, and drop its
    queued jobs, answers, markers and cancel flags: nobody could read those any more, and a tenant
    added later under the same name must inherit nothing (it gets a new epoch as well)."""
    check_name(tenant)
    if not await r.sismember(keys.tenants, tenant):
        raise ValueError(f"no tenant {tenant!r}")
    async with r.pipeline(transaction=True) as pipe:
        pipe.srem(keys.tenants, tenant)
        pipe.hdel(keys.tenant_epochs, tenant)
        await pipe.execute()
    await r.acl_deluser(tenant)
    doomed = [keys.tenant_in(tenant)]
    patterns = [f"{keys.tenant_out(tenant)}*"]
    for prefix in (keys.cancel_prefix, keys.admitted_prefix, keys.done_prefix):
        patterns += [f"{prefix}{tenant}/*", f"{prefix}{tenant}.*"]  # epoch 0, and every other epoch
    for pattern in patterns:
        async for key in r.scan_iter(match=pattern, count=1000):
            doomed.append(key)
    for start in range(0, len(doomed), 1000):
        await r.delete(*doomed[start : start + 1000])


async def _main(args: argparse.Namespace) -> None:
    from common.streams import connect

    settings = RedisSettings.from_namespace(args, local_stack=True)  # flags, env, else `diffserve up`'s stack
    keys, r = Keys(settings.namespace), connect(settings, client_name="tenant-admin")
    try:
        if args.action == "add":
            password = await add(r, keys, args.name, args.password)
            print(
                f"tenant {args.name}: REDIS_USERNAME={args.name} REDIS_PASSWORD={password} DIFFSERVE_TENANT={args.name}"
            )
        elif args.action == "remove":
            await remove(r, keys, args.name)
            print(f"tenant {args.name} removed")
        else:
            for name in sorted(await tenant_names(r, keys)):
                print(name)
        if args.action != "list":
            try:  # an aclfile keeps the change over a restart; without one Redis says so
                await r.acl_save()
            except ResponseError as exc:
                print(f"note: ACL SAVE failed ({exc}): persist the ACL yourself or it ends with Redis", file=sys.stderr)
    finally:
        await r.aclose()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="diffserve tenant",
        description="manage tenants (Redis-direct clients with their own keys); needs an admin Redis user",
    )
    parser.add_argument("action", choices=("add", "remove", "list"))
    parser.add_argument("name", nargs="?", help="tenant name: 1-32 of a-z 0-9 _ -")
    parser.add_argument("--password", default=None, help="add: this password instead of a generated one")
    RedisSettings.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.action != "list" and not args.name:
        parser.error(f"{args.action} needs a tenant name")
    try:
        asyncio.run(_main(args))
    except ValueError as exc:
        raise SystemExit(f"diffserve tenant: {exc}") from None
